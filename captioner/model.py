"""The captioning model: frozen image encoder -> mapper -> prefix (+ prompt) -> causal LM -> loss.

One definition used by training, decoding and evaluation alike. The constructor does no I/O and takes
its parts as modules; `CaptionModel.from_config` builds them from a ModelConfig (see encoders.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import ModelConfig
from .encoders import ImageEncoder, build_image_encoder, build_lm
from .mapping import build_mapper

IGNORE_INDEX = -100


@dataclass
class CaptionOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor  # (B, P + Tp + T, V)


class CaptionModel(nn.Module):
    def __init__(self, *, config: ModelConfig, image_encoder: ImageEncoder, mapper: nn.Module, lm: nn.Module,
                 prompt_ids: list[int]):
        super().__init__()
        self.config = config
        self.image_encoder = image_encoder
        self.mapper = mapper
        self.lm = lm
        self.register_buffer("prompt_ids", torch.tensor(prompt_ids, dtype=torch.long), persistent=False)
        self.image_encoder.requires_grad_(False)
        self.lm.requires_grad_(config.finetune_lm)

    @classmethod
    def from_config(cls, config: ModelConfig, *, prompt_ids: list[int], load_weights: bool = True
                    ) -> "CaptionModel":
        """Build all parts. load_weights=False skips fetching pretrained weights for the parts a saved
        captioner carries itself (see checkpoint.saved_parts)."""
        from .checkpoint import saved_parts  # local import: checkpoint imports this module

        parts = saved_parts(config)
        encoder = build_image_encoder(config, load_weights=load_weights or "image_encoder" not in parts)
        lm = build_lm(config, load_weights=load_weights or "lm" not in parts)
        mapper = build_mapper(config, feature_dim=encoder.output_dim, lm_dim=lm.get_input_embeddings().embedding_dim)
        return cls(config=config, image_encoder=encoder, mapper=mapper, lm=lm, prompt_ids=prompt_ids)

    @property
    def prefix_tokens(self) -> int:
        """Number of LM positions before the caption: prefix embeddings + prompt tokens."""
        return self.config.prefix_length + self.prompt_ids.numel()

    def train(self, mode: bool = True) -> "CaptionModel":
        super().train(mode)
        if not self.config.finetune_lm:
            self.lm.eval()  # frozen LM: no dropout, it is a fixed function
        return self

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_encoder(images)  # (B, F)

    def prefix_embeds(self, features: torch.Tensor) -> torch.Tensor:
        """LM input embeddings for everything before the caption: (B, P + Tp, D)."""
        embed = self.lm.get_input_embeddings()
        prefix = self.mapper(features.to(embed.weight.dtype))  # (B, P, D)
        if self.prompt_ids.numel():
            prompt = embed(self.prompt_ids).unsqueeze(0).expand(prefix.shape[0], -1, -1)  # (B, Tp, D)
            prefix = torch.cat([prefix, prompt], dim=1)
        return prefix

    def forward(self, features: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
                ) -> CaptionOutput:
        """features (B, F); input_ids / attention_mask (B, T) right-padded captions ending in EOS."""
        prefix = self.prefix_embeds(features)  # (B, Q, D)
        tokens = self.lm.get_input_embeddings()(input_ids)  # (B, T, D)
        embeds = torch.cat([prefix, tokens], dim=1)  # (B, Q + T, D)
        b, q = prefix.shape[:2]
        ones = attention_mask.new_ones(b, q)
        mask = torch.cat([ones, attention_mask], dim=1)  # (B, Q + T)
        # The LM shifts labels itself: position i predicts label i + 1. Prefix/prompt and padding are ignored.
        labels = torch.cat([torch.full_like(ones, IGNORE_INDEX),
                            input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)], dim=1)
        out = self.lm(inputs_embeds=embeds, attention_mask=mask, labels=labels)
        return CaptionOutput(loss=out.loss, logits=out.logits)
