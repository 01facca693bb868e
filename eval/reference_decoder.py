"""The baseline decoder for benchmarks: decoding the way ClipCap's predict.py does it.

One image at a time; no KV cache (every step runs the LM over the whole prefix + generated sequence
and computes logits at every position); beam search with ClipCap's length-averaged scores. Only
used by eval/bench.py as the "reference way" to compare against; not part of the library.
With `force` the stop token is never chosen, so every call does exactly `steps` steps (equal work); with
`length` it is forbidden before token `length` and forced there (a caption of scripted length, as
eval/bench.py's realistic-length rows script every system's captions).
"""

from __future__ import annotations

import torch


@torch.no_grad()
def greedy(lm, embed: torch.Tensor, *, steps: int, stop_id: int, force: bool = False, length: int | None = None
           ) -> list[int]:
    """embed (1, Q, D) -> token ids."""
    wte = lm.get_input_embeddings()
    generated, tokens = embed, []
    for t in range(steps):
        logits = lm(inputs_embeds=generated).logits[:, -1]  # the full sequence, every step
        if force:
            logits[:, stop_id] = float("-inf")
        logits = _scripted(logits, t, length, stop_id)
        token = int(logits.argmax(-1))
        tokens.append(token)
        if token == stop_id:
            break
        generated = torch.cat([generated, wte(torch.tensor([[token]], device=embed.device))], dim=1)
    return tokens


@torch.no_grad()
def beam(lm, embed: torch.Tensor, *, beam_size: int = 5, steps: int, stop_id: int, force: bool = False,
         length: int | None = None) -> list[int]:
    """ClipCap's generate_beam: embed (1, Q, D) -> the best beam's token ids."""
    wte = lm.get_input_embeddings()
    generated, tokens, scores = embed, None, None
    lengths = torch.ones(beam_size, device=embed.device)
    stopped = torch.zeros(beam_size, dtype=torch.bool, device=embed.device)
    for t in range(steps):
        logp = lm(inputs_embeds=generated).logits[:, -1].float()  # (beams, V)
        logp = _scripted(logp, t, length, stop_id).log_softmax(-1)
        if force:
            logp[:, stop_id] = float("-inf")
        if scores is None:
            scores, nxt = logp.topk(beam_size, -1)  # (1, K)
            generated = generated.expand(beam_size, *generated.shape[1:])
            tokens, scores = nxt.T, scores.squeeze(0)  # (K, 1), (K,)
        else:
            logp[stopped] = float("-inf")
            logp[stopped, 0] = 0
            total = scores[:, None] + logp
            lengths[~stopped] += 1
            avg, flat = (total / lengths[:, None]).view(-1).topk(beam_size, -1)
            src, nxt = flat // total.shape[1], flat % total.shape[1]
            lengths, stopped = lengths[src], stopped[src]
            tokens = torch.cat([tokens[src], nxt[:, None]], dim=1)
            generated = generated[src]
            scores = avg * lengths
        generated = torch.cat([generated, wte(tokens[:, -1:])], dim=1)
        stopped = stopped | tokens[:, -1].eq(stop_id)
        if stopped.all():
            break
    best = (scores / lengths).argmax()
    return tokens[best].tolist()


def _scripted(logits: torch.Tensor, t: int, length: int | None, stop_id: int) -> torch.Tensor:
    """Token t's logits with the stop token forbidden before token `length` and forced there."""
    if length is None:
        return logits
    if t < length - 1:
        return logits.index_fill(-1, torch.tensor([stop_id], device=logits.device), float("-inf"))
    keep = torch.full_like(logits, float("-inf"))
    keep[:, stop_id] = logits[:, stop_id]
    return keep
