"""Batching for training: pairs of (item row, caption token ids), length-bucketed batches sharded across
processes (`CaptionBatchSampler`), collation with the items' cached features, and modality dropout.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from captioner.config import ConfigError
from captioner.data import CaptionExample
from captioner.model.tokens import pad_id

logger = logging.getLogger(__name__)


class CaptionBatchSampler:
    """Batches of pair indices for one process.

    Each epoch the pairs are shuffled with (seed, epoch); with bucketing, chunks of 50 global batches
    are sorted by caption length before being cut, and the batch order is shuffled again. Each global
    batch is split round-robin across processes; a final global batch smaller than the number of
    processes is merged into the previous one, so every process runs the same number of batches and
    every pair is used exactly once per epoch.
    """

    def __init__(self, lengths: list[int], *, batch_size: int, seed: int, bucket: bool, shuffle: bool = True,
                 rank: int = 0, world: int = 1):
        if len(lengths) < world:
            raise ConfigError(f"{len(lengths)} training captions cannot be split across {world} processes")
        self.lengths, self.batch_size, self.seed, self.bucket, self.shuffle = lengths, batch_size, seed, bucket, shuffle
        self.rank, self.world = rank, world
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's order; skip its first `start` batches (resuming mid-epoch)."""
        self.epoch, self.start = epoch, start

    def global_batches(self) -> list[list[int]]:
        n = len(self.lengths)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(n, generator=g).tolist() if self.shuffle else list(range(n))
        if self.bucket:
            chunk = self.batch_size * 50
            order = [i for s in range(0, n, chunk)
                     for i in sorted(order[s:s + chunk], key=lambda i: self.lengths[i])]
        batches = [order[s:s + self.batch_size] for s in range(0, n, self.batch_size)]
        if len(batches) > 1 and len(batches[-1]) < self.world:
            batches[-2].extend(batches.pop())
        if self.bucket and self.shuffle:
            perm = torch.randperm(len(batches), generator=g).tolist()
            batches = [batches[i] for i in perm]
        return batches

    def __iter__(self):
        for batch in self.global_batches()[self.start:]:
            yield batch[self.rank::self.world]

    def __len__(self) -> int:
        return len(self.global_batches()) - self.start


class _Pairs(torch.utils.data.Dataset):
    """(feature row, caption token ids) pairs; ids are tokenised once, up front."""

    def __init__(self, rows: list[int], ids: list[list[int]]):
        self.rows, self.ids = rows, ids

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i], self.ids[i]


@dataclass
class ItemFeatures:
    """Features of a caption set's items: {modality: (N, F_m)}, rows without that input are zeros and
    marked False in present {modality: (N,) bool}."""

    features: dict[str, torch.Tensor]
    present: dict[str, torch.Tensor]

    def rows(self, index: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        return ({m: f[index] for m, f in self.features.items()}, {m: p[index] for m, p in self.present.items()})


class _Collate:
    def __init__(self, features: ItemFeatures, pad: int):
        self.features, self.pad = features, pad

    def __call__(self, items):
        width = max(len(ids) for _, ids in items)
        ids = torch.full((len(items), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for i, (_, row) in enumerate(items):
            ids[i, :len(row)] = torch.tensor(row)
            mask[i, :len(row)] = 1
        feats, present = self.features.rows(torch.tensor([r for r, _ in items]))  # {m: (B, F_m)}, {m: (B,)}
        return feats, present, ids, mask  # ..., (B, T), (B, T)


def drop_modalities(present: dict[str, torch.Tensor], p: float, generator: torch.Generator
                    ) -> dict[str, torch.Tensor]:
    """Modality dropout: each row holding two or more inputs loses one of them (chosen evenly) with
    probability p; a row never loses its last input."""
    if p <= 0 or len(present) < 2:
        return present
    kinds = list(present)
    held = torch.stack([present[m] for m in kinds], dim=1)  # (B, M)
    eligible = held.sum(1) >= 2
    drop = (torch.rand(held.shape[0], generator=generator) < p) & eligible  # (B,)
    # Which input to drop: uniform among the held ones (random scores, held only, argmax).
    which = torch.where(held, torch.rand(held.shape, generator=generator), -1.0).argmax(1)  # (B,)
    lose = torch.nn.functional.one_hot(which, len(kinds)).bool() & drop[:, None]
    return {m: held[:, j] & ~lose[:, j] for j, m in enumerate(kinds)}


def usable_examples(examples: list[CaptionExample], modalities: list[str], source: str) -> list[CaptionExample]:
    """The examples with at least one input the model takes; the others are counted and skipped."""
    kept = [ex for ex in examples if any(m in ex.inputs for m in modalities)]
    if len(kept) < len(examples):
        logger.warning("%s: %d of %d items have no %s input and are skipped", source, len(examples) - len(kept),
                       len(examples), " or ".join(modalities))
    if not kept:
        raise ConfigError(f"{source}: no item has a {' or '.join(modalities)} input (the model's modalities); "
                          "set --modalities to the inputs the caption set has")
    return kept


def tokenize_pairs(tokenizer, examples: list[CaptionExample], *, max_tokens: int, prompt: str
                   ) -> tuple[list[int], list[list[int]]]:
    """(example row, ids with EOS) for every reference caption."""
    from captioner.model.tokens import caption_text

    texts = [(i, caption_text(c, prompt)) for i, ex in enumerate(examples) for c in ex.captions]
    encoded = tokenizer([t for _, t in texts], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return [i for i, _ in texts], [ids[:max_tokens - 1] + [eos] for ids in encoded]


def make_loader(features, rows, ids, tokenizer, sampler) -> torch.utils.data.DataLoader:
    # Its own generator: creating an iterator must not draw from the global RNG, or a resumed run's
    # dropout masks would differ from an uninterrupted run's.
    return torch.utils.data.DataLoader(_Pairs(rows, ids), batch_sampler=sampler, pin_memory=torch.cuda.is_available(),
                                       collate_fn=_Collate(features, pad_id(tokenizer)),
                                       generator=torch.Generator().manual_seed(0))
