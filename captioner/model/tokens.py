"""Captions -> token ids: EOS appended, right padding, an attention mask that marks real tokens.

Labels are derived in the model (-100 on prefix, prompt and padding). The pad id value never matters
because padded positions are masked and ignored by the loss; GPT-2 has no pad token, so EOS is used.
"""

from __future__ import annotations

from typing import Sequence

import torch


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def caption_text(caption: str, prompt: str) -> str:
    # Byte-level BPE tokenizers (GPT-2) encode a word after a prompt with a leading space.
    caption = " ".join(caption.split())
    return " " + caption if prompt else caption


def encode_captions(tokenizer, captions: Sequence[str], *, max_tokens: int, prompt: str = ""
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (B, T) and mask (B, T) with T = longest caption in the batch (+ EOS), at most max_tokens."""
    eos = tokenizer.eos_token_id
    rows = []
    for caption in captions:
        ids = tokenizer(caption_text(caption, prompt), add_special_tokens=False)["input_ids"]
        rows.append(ids[: max_tokens - 1] + [eos])
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id(tokenizer), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    return tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []


def decode_ids(tokenizer, ids: Sequence[int], stop_ids: Sequence[int] = ()) -> str:
    """Token ids -> caption text, cut at the first EOS (dropped) or stop token (kept, e.g. ClipCap's '.')."""
    ids = list(ids)
    if tokenizer.eos_token_id in ids:
        ids = ids[: ids.index(tokenizer.eos_token_id)]
    stops = [i for i, t in enumerate(ids) if t in set(stop_ids)]
    if stops:
        ids = ids[: stops[0] + 1]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()
