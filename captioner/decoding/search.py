"""Decoding: batched greedy, beam search and nucleus sampling over a prefix of LM embeddings.

The search code talks to the LM only through a small `Stepper` interface (prefill a prefix, step one
token, select/reorder rows), so it is tested against a mock with scripted logits and runs with or
without the KV cache. Beams are folded into the batch: the LM sees (images * beams) rows.

Finished rows leave the computation (compaction): a greedy/sampled row that ended, and a beam image whose
result can no longer change, are dropped from the step's inputs and the KV cache (`select` with the rows
still needed), so a batch of captions that end at different lengths pays per step only for the live ones.
A finished row's outputs are frozen before it leaves, so captions and scores are those of the uncompacted
search (`compact=False`; tested). A stepper may keep some finished rows as padding (`compact_to`), e.g. to
reuse a few fixed batch shapes.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import torch
import torch.nn.functional as F

from captioner.config import DecodeConfig


class Stepper(Protocol):
    def prefill(self, embeds: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """embeds (B, Q, D) -> next-token logits (B, V) and a state."""

    def step(self, tokens: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        """tokens (B,) appended to each row -> next-token logits (B, V) and the new state."""

    def select(self, state: Any, index: torch.Tensor) -> Any:
        """Keep/reorder/duplicate rows: row i of the result is row index[i] of state."""

    # Optional: compact_to(live, now) -> how many of the `now` units (rows; beam: images) to keep when only
    # `live` are still needed (live <= result <= now). Without it every finished unit leaves at once.


def _compact_to(stepper, live: int, now: int) -> int:
    rule = getattr(stepper, "compact_to", None)
    return live if rule is None else min(now, max(live, rule(live, now)))


def _kept(finished: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the n units to keep, in their current order: every live one, then finished ones as padding."""
    return finished.to(torch.uint8).argsort(stable=True)[:n].sort().values


class LMStepper:
    """Stepper over a transformers causal LM. With use_cache the keys/values of earlier positions are
    reused (one token per step); without it the whole sequence is recomputed every step."""

    def __init__(self, lm: torch.nn.Module, *, use_cache: bool = True):
        self.lm, self.use_cache = lm, use_cache
        self.embed = lm.get_input_embeddings()
        # transformers renamed past_key_values -> cache (5.2x); accept both.
        self.cache_kw = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"

    def _cached(self, **kwargs):
        out = self.lm(use_cache=True, **kwargs)
        cache = out.get("cache") if out.get("cache") is not None else out.get("past_key_values")
        return out.logits[:, -1].float(), cache

    def prefill(self, embeds):
        if self.use_cache:
            return self._cached(inputs_embeds=embeds, logits_to_keep=1)
        return self._full(embeds)

    def step(self, tokens, state):
        if self.use_cache:
            return self._cached(input_ids=tokens[:, None], **{self.cache_kw: state})
        return self._full(torch.cat([state, self.embed(tokens)[:, None]], dim=1))

    def _full(self, embeds):
        out = self.lm(inputs_embeds=embeds, use_cache=False, logits_to_keep=1)
        return out.logits[:, -1].float(), embeds

    def select(self, state, index):
        if self.use_cache:
            state.reorder_cache(index)  # in-place index_select on the batch dim of every layer
            return state
        return state.index_select(0, index)


def force_lengths(logits: torch.Tensor, ends: torch.Tensor, t: int, *, eos_id: int,
                  push: float | None = None) -> torch.Tensor:
    """logits (R, V) of token t (0-based) with scripted caption lengths ends (R,) (EOS included): EOS is
    masked before token ends - 1; from there every other token is masked (push None) or EOS's logit is raised
    by `push` (the search still chooses). For tests and benchmarks (a model whose captions end on cue)."""
    early = (t < ends - 1)[:, None]  # (R, 1)
    eos = torch.arange(logits.shape[1], device=logits.device)[None] == eos_id  # (1, V)
    logits = logits.masked_fill(early & eos, float("-inf"))
    if push is None:
        return logits.masked_fill(~early & ~eos, float("-inf"))
    return logits + (~early & eos) * push


class ForcedLengths:
    """Stepper wrapper applying `force_lengths` with per-row lengths ends (B,), the rows followed through
    select (beam expansion, reorders, compaction). The logits are masked, not renormalised: the search's
    log p is that of the masked distribution. rows_seen: the row count of every prefill/step (tests)."""

    def __init__(self, inner: Stepper, ends: torch.Tensor, *, eos_id: int, push: float | None = None):
        self.inner, self.ends, self.eos_id, self.push = inner, torch.as_tensor(ends), eos_id, push
        self.rows_seen: list[int] = []
        if hasattr(inner, "compact_to"):
            self.compact_to = inner.compact_to

    def _force(self, logits, ends, t):
        self.rows_seen.append(logits.shape[0])
        return force_lengths(logits, ends, t, eos_id=self.eos_id, push=self.push)

    def prefill(self, embeds):
        logits, state = self.inner.prefill(embeds)
        ends = self.ends[: embeds.shape[0]].to(logits.device)
        return self._force(logits, ends, 0), (state, ends, 0)

    def step(self, tokens, state):
        inner, ends, t = state
        logits, inner = self.inner.step(tokens, inner)
        return self._force(logits, ends, t + 1), (inner, ends, t + 1)

    def select(self, state, index):
        inner, ends, t = state
        return self.inner.select(inner, index), ends[index], t


@dataclass
class Generated:
    tokens: torch.Tensor  # (B, N, T) generated ids, EOS kept, then pad
    scores: torch.Tensor  # (B, N) beam: length-normalised log-prob; greedy/sample: sum of log-probs


def generate(stepper: Stepper, embeds: torch.Tensor, decode: DecodeConfig, *, eos_id: int, pad_id: int,
             stop_ids: Sequence[int] = (), compact: bool = True) -> Generated:
    """Run the decode strategy for a batch of prefixes embeds (B, Q, D). A caption ends at EOS or at any
    of `stop_ids` (kept in the caption: ClipCap's models end at '.'), in every strategy. compact: finished
    rows leave the computation (same results; False keeps computing them, for tests and benchmarks)."""
    if decode.strategy == "beam":
        return beam_search(stepper, embeds, num_beams=decode.num_beams, num_return=decode.num_captions,
                           length_penalty=decode.length_penalty, max_new_tokens=decode.max_new_tokens,
                           min_new_tokens=decode.min_new_tokens, eos_id=eos_id, pad_id=pad_id,
                           stop_ids=stop_ids, compact=compact)
    n = decode.num_captions if decode.strategy == "sample" else 1
    if n > 1:
        embeds = embeds.repeat_interleave(n, dim=0)  # (B * N, Q, D): independent draws per image
    generator = None
    if decode.strategy == "sample" and decode.seed is not None:
        generator = torch.Generator(device=embeds.device).manual_seed(decode.seed)
    sampler = None
    if decode.strategy == "sample":
        def sampler(logits, rows, total):
            # The noise of every row of the batch is drawn, finished rows' too, and the live rows take theirs:
            # each row's draws are those of the uncompacted search (the generator moves alike).
            noise = torch.empty(total, logits.shape[-1], device=logits.device).exponential_(1, generator=generator)
            return sample_token(logits, temperature=decode.temperature, top_k=decode.top_k,
                                top_p=decode.top_p, noise=noise if rows is None else noise[rows])
    tokens, scores = _left_to_right(stepper, embeds, max_new_tokens=decode.max_new_tokens,
                                    min_new_tokens=decode.min_new_tokens, eos_id=eos_id, pad_id=pad_id,
                                    choose=sampler, stop_ids=stop_ids, compact=compact)
    b = tokens.shape[0] // n
    return Generated(tokens=tokens.view(b, n, -1), scores=scores.view(b, n))


def _no_eos(logits: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    return logits.index_fill(-1, ends, float("-inf"))


def _end_ids(eos_id: int, stop_ids: Sequence[int], device) -> torch.Tensor:
    """(E,) ids that end a caption: EOS and the stop tokens."""
    return torch.tensor(sorted({eos_id, *stop_ids}), dtype=torch.long, device=device)


def _left_to_right(stepper, embeds, *, max_new_tokens, eos_id, pad_id, choose=None, min_new_tokens=0,
                   stop_ids: Sequence[int] = (), compact: bool = True):
    """Greedy (choose=None) or sampled decoding (choose(logits, rows, B) -> tokens; rows: the batch rows
    computed, None for all); finished rows emit pad, and leave the computation when `compact`."""
    logits, state = stepper.prefill(embeds)  # (B, V)
    ends = _end_ids(eos_id, stop_ids, logits.device)
    b = logits.shape[0]
    done = torch.zeros(b, dtype=torch.bool, device=logits.device)
    scores = torch.zeros(b, device=logits.device)
    out = torch.full((b, max_new_tokens), pad_id, dtype=torch.long, device=logits.device)
    rows = None  # (R,) the batch rows still computed, in order; None: all of them
    for t in range(max_new_tokens):
        if t < min_new_tokens:
            logits = _no_eos(logits, ends)
        token = logits.argmax(-1) if choose is None else choose(logits, rows, b)  # (R,)
        # log p(token) = logit - logsumexp: no (R, V) log-softmax is materialised
        logp = logits.gather(1, token[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)
        finished = done if rows is None else done[rows]  # (R,) ended at an earlier step
        token = token.masked_fill(finished, pad_id)
        now = finished | torch.isin(token, ends)
        if rows is None:
            scores += torch.where(finished, 0.0, logp)
            out[:, t], done = token, now
        else:
            scores[rows] += torch.where(finished, 0.0, logp)
            out[rows, t], done[rows] = token, now
        live = int((~now).sum())  # one host sync per step; rows that left the batch are done already
        if live == 0 or t == max_new_tokens - 1:
            break
        if compact and live < now.numel():
            n = _compact_to(stepper, live, now.numel())
            if n < now.numel():
                keep = _kept(now, n)  # (n,) positions among the computed rows
                rows = keep if rows is None else rows[keep]
                token, state = token[keep], stepper.select(state, keep)
        logits, state = stepper.step(token, state)
    return out[:, : t + 1], scores  # (B, T), (B,)


def sample_token(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Sample one token per row from logits (B, V) after temperature, top-k and nucleus filtering. noise:
    (B, V) Exp(1) draws to use (default: drawn from `generator`, as torch.multinomial draws them)."""
    logits = logits / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Keep the smallest set of most likely tokens whose mass reaches top_p (always the top one).
        drop = (probs.cumsum(-1) - probs) >= top_p
        drop[:, 0] = False
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    if noise is None:
        noise = torch.empty_like(probs).exponential_(1, generator=generator)
    # argmax p / Exp(1) is a draw from p (torch.multinomial's own one-sample path, same draws)
    return probs.div(noise).argmax(-1)


def beam_search(stepper: Stepper, embeds: torch.Tensor, *, num_beams: int, num_return: int = 1,
                length_penalty: float = 1.0, max_new_tokens: int = 30, min_new_tokens: int = 0, eos_id: int,
                pad_id: int, stop_ids: Sequence[int] = (), compact: bool = True) -> Generated:
    """Batched beam search with the beams folded into the batch.

    A hypothesis ends when a beam in the top `num_beams` candidates emits EOS; its score is
    sum log p / length ** length_penalty (length counts EOS). An image is done when it holds num_beams
    finished hypotheses and its best running beam, scored at the current length, cannot beat the worst of
    them: transformers' rule with early_stopping=False. With length_penalty <= 0 that is an exact bound
    (log p only falls and the divisor does not grow); with length_penalty > 0 it is that heuristic (a longer
    continuation could score higher). A done image takes no more hypotheses, so its result is final: with
    `compact` its beams leave the computation there and then.
    """
    k, big = num_beams, float("-inf")
    logits, state = stepper.prefill(embeds)  # (B, V)
    b, v = logits.shape
    dev = logits.device
    end_ids = _end_ids(eos_id, stop_ids, dev)
    imgs = torch.arange(b, device=dev)  # (I,) the images still computed, in order
    state = stepper.select(state, imgs.repeat_interleave(k))  # (I * K) rows
    logits = logits.repeat_interleave(k, dim=0)  # (I * K, V)
    beam_scores = torch.full((b, k), big, device=dev)  # (I, K)
    beam_scores[:, 0] = 0.0  # all beams start identical: expand from the first one only
    seqs = torch.empty((b * k, 0), dtype=torch.long, device=dev)  # (I * K, t)
    fin_scores = torch.full((b, k), big, device=dev)  # sorted descending
    fin_seqs = torch.full((b, k, max_new_tokens), pad_id, dtype=torch.long, device=dev)
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    rank = torch.arange(2 * k, device=dev)
    n_cand = min(2 * k, k * v)

    def padded(s):  # (..., t) -> (..., max_new_tokens)
        return F.pad(s, (0, max_new_tokens - s.shape[-1]), value=pad_id)

    def merge(scores, cand_seqs):  # keep the k best of finished + candidates, per computed image
        all_scores = torch.cat([fin_scores[imgs], scores], dim=1)
        all_seqs = torch.cat([fin_seqs[imgs], cand_seqs], dim=1)
        top, idx = all_scores.topk(k, dim=1)
        fin_scores[imgs], fin_seqs[imgs] = top, all_seqs.gather(1, idx[..., None].expand(-1, -1, max_new_tokens))

    for t in range(max_new_tokens):
        n = imgs.numel()
        length = float(t + 1) ** length_penalty
        # The 2K best continuations of an image are among the 2K best of each of its beams, and within a
        # beam log p orders tokens as the logits do: take each beam's top 2K logits and normalise only
        # those (logit - logsumexp), instead of a (I * K, V) log-softmax and a (I, K * V) top-k.
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # (I * K, 1), EOS mass included
        if t < min_new_tokens:
            logits = _no_eos(logits, end_ids)
        row_top, row_tok = logits.topk(min(n_cand, v), dim=-1)  # (I * K, C)
        cand = (beam_scores.view(-1, 1) + (row_top - lse)).view(n, -1)  # (I, K * C)
        top_scores, top_idx = cand.topk(n_cand, dim=1)  # (I, 2K)
        src_beam = top_idx // row_top.shape[1]
        token = row_tok.view(n, -1).gather(1, top_idx)  # (I, 2K)
        src_rows = torch.arange(n, device=dev)[:, None] * k + src_beam  # (I, 2K) row in the (I * K) batch
        cand_seqs = torch.cat([seqs[src_rows.view(-1)], token.view(-1, 1)], dim=1).view(n, -1, t + 1)
        is_eos = torch.isin(token, end_ids)  # EOS or a stop token
        was_done = done[imgs]  # (I,)
        ends = is_eos & (rank[: token.shape[1]] < k) & ~was_done[:, None]
        merge(torch.where(ends, top_scores / length, big), padded(cand_seqs))
        # Running beams: the k best candidates that did not end.
        beam_scores, keep = torch.where(is_eos, big, top_scores).topk(k, dim=1)  # (I, K)
        picked = src_rows.gather(1, keep).view(-1)  # (I * K,)
        seqs = cand_seqs.gather(1, keep[..., None].expand(-1, -1, t + 1)).view(n * k, t + 1)
        worst = fin_scores[imgs, -1]
        now = was_done | ((worst > big) & (beam_scores[:, 0] / length <= worst))  # (I,)
        done[imgs] = now
        live = int((~now).sum())  # one host sync per step; images that left the batch are done already
        if live == 0 or t == max_new_tokens - 1:
            break
        if compact and live < n:
            m = _compact_to(stepper, live, n)
            if m < n:
                kept = _kept(now, m)  # (m,) positions among the computed images
                imgs, beam_scores = imgs[kept], beam_scores[kept]
                seqs = seqs.view(n, k, -1)[kept].view(m * k, -1)
                picked = picked.view(n, k)[kept].view(-1)
        state = stepper.select(state, picked)
        logits, state = stepper.step(seqs[:, -1], state)
    # Images not done by the token limit keep their running beams as (unterminated) hypotheses; every such
    # image is still computed.
    open_scores = torch.where(done[imgs][:, None], big, beam_scores / float(t + 1) ** length_penalty)
    merge(open_scores, padded(seqs.view(imgs.numel(), k, -1)))
    return Generated(tokens=fin_seqs[:, :num_return], scores=fin_scores[:, :num_return])
