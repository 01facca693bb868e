"""Reranking at decode time: several candidate captions per image, reordered by a scorer.

The candidates are all the beam hypotheses (beam search run with num_captions = num_beams) or
`rerank_samples` independent draws (sampling); `candidate_decode` says how they are generated. Each
candidate's final score is

    scorer score (CLIPScore: 2.5 * max(cos(image, "A photo depicts " + caption), 0))
    + rerank_weight * LM score (mean log-probability per generated token, EOS included)

and the best `num_captions` are returned, ties kept in the LM's order. The scorer is any object with
`candidate_scores(images, candidates) -> [[float, ...], ...]` (one list per image), so tests use a scorer
whose preference is known; `CLIPCandidateScorer` wraps a `scoring.clipscore.CLIPScorer`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Protocol, Sequence

import torch

from captioner.config import DecodeConfig


class CandidateScorer(Protocol):
    def candidate_scores(self, images: Sequence, candidates: Sequence[Sequence[str]]) -> list[list[float]]:
        """images[i] (PIL) with its candidate captions candidates[i] -> one score per candidate (higher
        is better)."""


class CLIPCandidateScorer:
    """CLIPScore of every candidate against its image with a `CLIPScorer` (its weight and prompt): each
    image and each distinct text is encoded once."""

    def __init__(self, clip_scorer):
        self.clip = clip_scorer

    def candidate_scores(self, images, candidates):
        image_emb = self.clip.image_embeddings(list(images))  # (N, D), unit length
        texts = sorted({self.clip.prompt + c for row in candidates for c in row})
        index = {t: i for i, t in enumerate(texts)}
        text_emb = self.clip.text_embeddings(texts)  # (T, D), unit length
        return [[self.clip.weight * max(float(text_emb[index[self.clip.prompt + c]] @ image_emb[i]), 0.0)
                 for c in row] for i, row in enumerate(candidates)]


def as_candidate_scorer(scorer) -> CandidateScorer:
    """`scorer` itself when it has `candidate_scores`, a `CLIPScorer` wrapped in `CLIPCandidateScorer`."""
    if hasattr(scorer, "candidate_scores"):
        return scorer
    if hasattr(scorer, "image_embeddings") and hasattr(scorer, "text_embeddings"):
        return CLIPCandidateScorer(scorer)
    raise TypeError(f"a reranking scorer needs candidate_scores(images, candidates) or to be a CLIPScorer, "
                    f"got {type(scorer).__name__}")


def candidate_decode(decode: DecodeConfig) -> DecodeConfig:
    """The decoding that produces the candidates: every beam hypothesis, or rerank_samples draws."""
    n = decode.num_beams if decode.strategy == "beam" else decode.rerank_samples
    return dataclasses.replace(decode, num_captions=n, rerank=None)


def lm_scores(tokens: torch.Tensor, scores: torch.Tensor, *, strategy: str, length_penalty: float,
              end_ids: Sequence[int]) -> torch.Tensor:
    """Mean log-probability per generated token (B, N) of candidates tokens (B, N, T) with their search
    scores (B, N): beam scores are sum log p / length ** length_penalty, sampled ones sum log p."""
    ends = torch.isin(tokens, torch.tensor(sorted(set(end_ids)), device=tokens.device))  # (B, N, T)
    t = tokens.shape[-1]
    first = torch.where(ends.any(-1), ends.float().argmax(-1) + 1, torch.full_like(scores, t, dtype=torch.long))
    length = first.clamp_min(1).to(scores.dtype)  # (B, N): tokens up to and including the end token
    total = scores * length ** length_penalty if strategy == "beam" else scores
    return total / length


def rerank(candidates: Sequence[Sequence[str]], lm: torch.Tensor, scores: Sequence[Sequence[float]], *,
           weight: float, keep: int) -> list[list[str]]:
    """The `keep` best candidates of each row by score + weight * lm (lm (B, N)), best first; a stable
    sort, so equal scores keep the candidates' order."""
    out = []
    for row, lm_row, score_row in zip(candidates, lm.tolist(), scores):
        if len(score_row) != len(row):
            raise ValueError(f"the scorer gave {len(score_row)} scores for {len(row)} candidates")
        final = [s + (weight * p if weight else 0.0) for s, p in zip(score_row, lm_row)]
        # A hypothesis slot beam search could not fill (log p -inf) is never preferred to a real one.
        order = sorted(range(len(row)), key=lambda j: (not math.isfinite(lm_row[j]), -final[j]))
        out.append([row[j] for j in order[:keep]])
    return out
