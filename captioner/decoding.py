"""Decoding: batched greedy, beam search and nucleus sampling over a prefix of LM embeddings.

The search code talks to the LM only through a small `Stepper` interface (prefill a prefix, step one
token, select/reorder rows), so it is tested against a mock with scripted logits and runs with or
without the KV cache. Beams are folded into the batch: the LM always sees (B * beams) rows.
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import weakref
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from .config import DecodeConfig


class Stepper(Protocol):
    def prefill(self, embeds: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """embeds (B, Q, D) -> next-token logits (B, V) and a state."""

    def step(self, tokens: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        """tokens (B,) appended to each row -> next-token logits (B, V) and the new state."""

    def select(self, state: Any, index: torch.Tensor) -> Any:
        """Keep/reorder/duplicate rows: row i of the result is row index[i] of state."""


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


class StaticCacheStepper(LMStepper):
    """KV-cached stepper whose cache is preallocated for the whole caption (prefix + max_new_tokens).

    A growing cache copies itself twice per step in beam search (reorder, then append); here a step
    writes its one new position in place, and a beam reorder is a single gather of the filled positions
    into a second buffer (`index_select(out=)`), the two buffers taking turns. Every step has the same
    shapes, which is what lets the step be compiled (`compile=True`: torch.compile; on CUDA with CUDA
    graphs, so a step is one graph launch instead of hundreds of kernel launches from Python). A compiled
    step always runs on the same buffer (CUDA graphs replay on fixed addresses): a reorder gathers into
    the second buffer and copies back. One instance serves many batches: buffers are kept per (rows,
    length, dtype, device), so compiled graphs are reused.

    The prefix is run uncompiled with a growing cache (its length varies), then gathered into a buffer by
    the first `select` (beam search's expansion to B * K rows) or the first `step`. The buffers of the
    `keep` most recent row counts are kept (a run's full batches and its last one). Not thread-safe: one
    decode at a time per instance."""

    RECOMPILE_LIMIT = 64  # compiled shapes (row counts) per process before new ones run uncompiled

    def __init__(self, lm: torch.nn.Module, *, max_new_tokens: int, compile: bool = False, keep: int = 2):
        super().__init__(lm, use_cache=True)
        self.max_new_tokens, self.keep = max_new_tokens, keep
        self.caches: collections.OrderedDict[tuple, tuple] = collections.OrderedDict()  # key -> two StaticCaches
        self.cuda_graphs = False
        self.fixed_buffers = compile  # compiled steps always run on one buffer per row count
        self.forward = self.compiled = lm.forward
        if compile:
            cuda = next(lm.parameters()).is_cuda
            self.cuda_graphs = cuda
            # Each row count is one more compiled graph; past dynamo's limit a fullgraph compile raises
            # instead of falling back, so the limit is raised and an over-limit shape runs uncompiled.
            import torch._dynamo

            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, self.RECOMPILE_LIMIT)
            self.compiled = torch.compile(lm.forward, mode="reduce-overhead" if cuda else None, fullgraph=True,
                                          dynamic=False)
            from torch._dynamo.exc import FailOnRecompileLimitHit

            self.over_limit = FailOnRecompileLimitHit

    def prefill(self, embeds):
        self.prefix_len = self.length = embeds.shape[1]  # positions filled so far (no GPU sync to learn it)
        return self._cached(inputs_embeds=embeds, logits_to_keep=1)  # a DynamicCache of the prefix

    def _pair(self, rows: int, state) -> tuple:
        from transformers import StaticCache

        like = state.layers[0].keys
        key = (rows, self.prefix_len + self.max_new_tokens, like.dtype, like.device)
        if key not in self.caches:
            while len(self.caches) >= self.keep:  # bounded memory (each pair is 2 x the whole cache)
                self.caches.popitem(last=False)
            self.caches[key] = tuple(StaticCache(config=self.lm.config, max_cache_len=key[1]) for _ in range(2))
        self.caches.move_to_end(key)
        return self.caches[key]

    def select(self, state, index):
        main, other = self._pair(index.numel(), state)
        if not self.fixed_buffers:  # the gather lands in whichever buffer `state` is not
            target = other if state is main else main
            self._gather(state, target, index)
            return target
        # CUDA graphs replay on the addresses they were recorded with: the result always lands in `main`.
        if state is main:
            self._gather(main, other, index)
            self._gather(other, main, None)
        else:
            self._gather(state, main, index)
        return main

    def _gather(self, src, dst, index: torch.Tensor | None) -> None:
        """Rows `index` (None: all, in order) of src's filled positions into dst; dst's next step writes
        position n."""
        n = self.length
        for s, d in zip(src.layers, dst.layers):  # (rows, heads, length, dim) each
            rows = s.keys.shape[0] if index is None else index.numel()
            if not d.is_initialized:  # allocates (rows, heads, prefix + max_new_tokens, dim) zeros
                d.lazy_initialization(*(x.new_empty(rows, x.shape[1], 1, x.shape[3]) for x in (s.keys, s.values)))
            for a, b in ((s.keys, d.keys), (s.values, d.values)):
                if index is None:
                    b[:, :, :n].copy_(a[:, :, :n])
                else:
                    torch.index_select(a[:, :, :n], 0, index, out=b[:, :, :n])
            d.cumulative_length.fill_(n)

    def step(self, tokens, state):
        from transformers import StaticCache

        if not isinstance(state, StaticCache):
            state = self.select(state, torch.arange(tokens.shape[0], device=tokens.device))
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        ids = tokens.reshape(-1, 1).contiguous()  # (rows, 1): same strides every step, or compile re-traces
        kwargs = {"input_ids": ids, "use_cache": True, "logits_to_keep": 1, self.cache_kw: state}
        if self.compiled is self.forward:
            out = self.forward(**kwargs)
        else:
            try:
                out = self.compiled(**kwargs)
            except self.over_limit:
                out = self.forward(**kwargs)  # one shape too many to compile: this one runs eagerly
        self.length += 1
        logits = out.logits[:, -1].float()
        return (logits.clone() if self.cuda_graphs else logits), state  # a graph's next replay overwrites its output


class PackedHead:
    """The LM head (the vocabulary projection: a third of GPT-2 124M's arithmetic per decoded token) run
    as oneDNN's GEMM on a prepacked copy of its weight, on CPU in float32. On this project's AVX2 machine
    that takes 89-94 ms instead of 133-151 ms at 160 rows x 50,257 tokens (a batch of 32 with 5 beams),
    ~10% of a decoding step; logits equal the plain matmul's to ~1e-6 (summation order).

    `applied(lm)` swaps the head's forward for the packed one while decoding; the packed copy is made
    again whenever the weight changes (its version counter moves with every in-place update)."""

    def __init__(self):
        self.weight, self.version, self.packed = None, None, None  # weight: a weakref to what was packed

    @staticmethod
    def usable(lm: torch.nn.Module) -> bool:
        head = lm.get_output_embeddings()
        return (isinstance(head, torch.nn.Linear) and head.weight.device.type == "cpu"
                and head.weight.dtype == torch.float32 and torch.backends.mkldnn.is_available()
                and hasattr(torch.ops.mkldnn, "_linear_pointwise") and not torch.is_grad_enabled())

    @contextlib.contextmanager
    def applied(self, lm: torch.nn.Module):
        if not self.usable(lm):
            yield
            return
        head = lm.get_output_embeddings()
        if self.weight is None or self.weight() is not head.weight or self.version != head.weight._version:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(head.weight.detach(), None)
            self.weight, self.version = weakref.ref(head.weight), head.weight._version

        def forward(x: torch.Tensor) -> torch.Tensor:  # (..., D) -> (..., V)
            flat = x.reshape(-1, x.shape[-1]).contiguous()
            out = torch.ops.mkldnn._linear_pointwise(flat, self.packed, head.bias, "none", [], "")
            return out.view(*x.shape[:-1], out.shape[-1])

        head.forward = forward  # an instance attribute: nn.Module.__call__ finds it first
        try:
            yield
        finally:  # (pop: a concurrent decode may have removed it already; both heads compute the same)
            head.__dict__.pop("forward", None)


@dataclass
class Generated:
    tokens: torch.Tensor  # (B, N, T) generated ids, EOS kept, then pad
    scores: torch.Tensor  # (B, N) beam: length-normalised log-prob; greedy/sample: sum of log-probs


def generate(stepper: Stepper, embeds: torch.Tensor, decode: DecodeConfig, *, eos_id: int, pad_id: int
             ) -> Generated:
    """Run the decode strategy for a batch of prefixes embeds (B, Q, D)."""
    if decode.strategy == "beam":
        return beam_search(stepper, embeds, num_beams=decode.num_beams, num_return=decode.num_captions,
                           length_penalty=decode.length_penalty, max_new_tokens=decode.max_new_tokens,
                           min_new_tokens=decode.min_new_tokens, eos_id=eos_id, pad_id=pad_id)
    n = decode.num_captions if decode.strategy == "sample" else 1
    if n > 1:
        embeds = embeds.repeat_interleave(n, dim=0)  # (B * N, Q, D): independent draws per image
    generator = None
    if decode.strategy == "sample" and decode.seed is not None:
        generator = torch.Generator(device=embeds.device).manual_seed(decode.seed)
    sampler = None
    if decode.strategy == "sample":
        def sampler(logits):
            return sample_token(logits, temperature=decode.temperature, top_k=decode.top_k,
                                top_p=decode.top_p, generator=generator)
    tokens, scores = _left_to_right(stepper, embeds, max_new_tokens=decode.max_new_tokens,
                                    min_new_tokens=decode.min_new_tokens, eos_id=eos_id, pad_id=pad_id,
                                    choose=sampler)
    b = tokens.shape[0] // n
    return Generated(tokens=tokens.view(b, n, -1), scores=scores.view(b, n))


def _no_eos(logits: torch.Tensor, eos_id: int) -> torch.Tensor:
    return logits.index_fill(-1, torch.tensor([eos_id], device=logits.device), float("-inf"))


def _left_to_right(stepper, embeds, *, max_new_tokens, eos_id, pad_id, choose=None, min_new_tokens=0):
    """Greedy (choose=None) or sampled decoding; finished rows emit pad."""
    logits, state = stepper.prefill(embeds)  # (B, V)
    b = logits.shape[0]
    done = torch.zeros(b, dtype=torch.bool, device=logits.device)
    scores = torch.zeros(b, device=logits.device)
    out = []
    for t in range(max_new_tokens):
        if t < min_new_tokens:
            logits = _no_eos(logits, eos_id)
        token = logits.argmax(-1) if choose is None else choose(logits)  # (B,)
        # log p(token) = logit - logsumexp: no (B, V) log-softmax is materialised
        logp = logits.gather(1, token[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)
        scores += torch.where(done, 0.0, logp)
        token = token.masked_fill(done, pad_id)
        out.append(token)
        done |= token == eos_id
        if done.all() or t == max_new_tokens - 1:
            break
        logits, state = stepper.step(token, state)
    return torch.stack(out, dim=1), scores  # (B, T), (B,)


def sample_token(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample one token per row from logits (B, V) after temperature, top-k and nucleus filtering."""
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
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def beam_search(stepper: Stepper, embeds: torch.Tensor, *, num_beams: int, num_return: int = 1,
                length_penalty: float = 1.0, max_new_tokens: int = 30, min_new_tokens: int = 0, eos_id: int,
                pad_id: int) -> Generated:
    """Batched beam search with the beams folded into the batch.

    A hypothesis ends when a beam in the top `num_beams` candidates emits EOS; its score is
    sum log p / length ** length_penalty (length counts EOS). An image is done when it holds num_beams
    finished hypotheses and its best running beam cannot beat the worst of them (the usual heuristic).
    """
    k, big = num_beams, float("-inf")
    logits, state = stepper.prefill(embeds)  # (B, V)
    b, v = logits.shape
    dev = logits.device
    rows = torch.arange(b, device=dev)
    state = stepper.select(state, rows.repeat_interleave(k))  # (B * K) rows
    logits = logits.repeat_interleave(k, dim=0)  # (B * K, V)
    beam_scores = torch.full((b, k), big, device=dev)
    beam_scores[:, 0] = 0.0  # all beams start identical: expand from the first one only
    seqs = torch.empty((b * k, 0), dtype=torch.long, device=dev)
    fin_scores = torch.full((b, k), big, device=dev)  # sorted descending
    fin_seqs = torch.full((b, k, max_new_tokens), pad_id, dtype=torch.long, device=dev)
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    rank = torch.arange(2 * k, device=dev)
    n_cand = min(2 * k, k * v)

    def padded(s):  # (..., t) -> (..., max_new_tokens)
        return F.pad(s, (0, max_new_tokens - s.shape[-1]), value=pad_id)

    def merge(scores, cand_seqs):  # keep the k best of finished + candidates, per image
        nonlocal fin_scores, fin_seqs
        all_scores = torch.cat([fin_scores, scores], dim=1)
        all_seqs = torch.cat([fin_seqs, cand_seqs], dim=1)
        fin_scores, idx = all_scores.topk(k, dim=1)
        fin_seqs = all_seqs.gather(1, idx[..., None].expand(-1, -1, max_new_tokens))

    for t in range(max_new_tokens):
        length = float(t + 1) ** length_penalty
        # The 2K best continuations of an image are among the 2K best of each of its beams, and within a
        # beam log p orders tokens as the logits do: take each beam's top 2K logits and normalise only
        # those (logit - logsumexp), instead of a (B * K, V) log-softmax and a (B, K * V) top-k.
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # (B * K, 1), EOS mass included
        if t < min_new_tokens:
            logits = _no_eos(logits, eos_id)
        row_top, row_tok = logits.topk(min(n_cand, v), dim=-1)  # (B * K, C)
        cand = (beam_scores.view(-1, 1) + (row_top - lse)).view(b, -1)  # (B, K * C)
        top_scores, top_idx = cand.topk(n_cand, dim=1)  # (B, 2K)
        src_beam = top_idx // row_top.shape[1]
        token = row_tok.view(b, -1).gather(1, top_idx)  # (B, 2K)
        src_rows = rows[:, None] * k + src_beam  # (B, 2K) row in the (B * K) batch
        cand_seqs = torch.cat([seqs[src_rows.view(-1)], token.view(-1, 1)], dim=1).view(b, -1, t + 1)
        is_eos = token == eos_id
        ends = is_eos & (rank[: token.shape[1]] < k) & ~done[:, None]
        merge(torch.where(ends, top_scores / length, big), padded(cand_seqs))
        # Running beams: the k best candidates that did not end.
        beam_scores, keep = torch.where(is_eos, big, top_scores).topk(k, dim=1)  # (B, K)
        picked = src_rows.gather(1, keep).view(-1)  # (B * K,)
        seqs = cand_seqs.gather(1, keep[..., None].expand(-1, -1, t + 1)).view(b * k, t + 1)
        done |= (fin_scores[:, -1] > big) & (beam_scores[:, 0] / length <= fin_scores[:, -1])
        if done.all() or t == max_new_tokens - 1:
            break
        state = stepper.select(state, picked)
        logits, state = stepper.step(seqs[:, -1], state)
    # Images not done by the token limit keep their running beams as (unterminated) hypotheses.
    open_scores = torch.where(done[:, None], big, beam_scores / float(t + 1) ** length_penalty)
    merge(open_scores, padded(seqs.view(b, k, -1)))
    return Generated(tokens=fin_seqs[:, :num_return], scores=fin_scores[:, :num_return])
