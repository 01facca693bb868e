"""The captioning model: frozen encoders -> one mapper per modality -> prefix (+ prompt) -> causal LM -> loss.

One definition used by training, decoding and evaluation alike. The constructor does no I/O and takes
its parts as modules; `CaptionModel.from_config` builds them from a ModelConfig (see encoders.py).

Inputs are features per modality, `{"image": (B, F_img), "audio": (B, F_aud)}`. The LM sees the
segments in the fixed order [image prefix][audio prefix][prompt]; with two modalities each segment
gets a learned modality embedding added. A modality an input does not have is absent from its prefix,
not zeros: in a mixed batch (`present` masks) the remaining segments are moved to the right and the
freed positions on the left are masked out, with position ids counting only real positions, so a row
is computed exactly as it would be alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from captioner.errors import ModalityError  # noqa: F401  (defined in errors.py)
from captioner.config import MODALITIES, ModelConfig
from captioner.model.checkpoint import saved_parts
from captioner.model.encoders import build_audio_encoder_from_config, build_image_encoder, build_lm
from captioner.model.mapping import build_mapper

IGNORE_INDEX = -100

Features = dict[str, torch.Tensor]  # modality -> (B, F_m)



@dataclass
class CaptionOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor  # (B, T, V): logits[:, t] predicts caption token t (from the position before it)


class CaptionModel(nn.Module):
    def __init__(self, *, config: ModelConfig, encoders: dict[str, nn.Module], mappers: dict[str, nn.Module],
                 lm: nn.Module, prompt_ids: list[int]):
        super().__init__()
        if set(encoders) != set(config.modalities) or set(mappers) != set(config.modalities):
            raise ValueError(f"need an encoder and a mapper for each of {config.modalities}")
        self.config = config
        self.encoders = nn.ModuleDict(encoders)
        self.mappers = nn.ModuleDict(mappers)
        self.lm = lm
        width = lm.get_input_embeddings().embedding_dim
        # One learned vector per modality, added to its whole segment; a single modality needs none.
        self.modality_embed = (nn.Parameter(torch.randn(len(config.modalities), width) * 0.02)
                               if len(config.modalities) > 1 else None)
        self.register_buffer("prompt_ids", torch.tensor(prompt_ids, dtype=torch.long), persistent=False)
        self.encoders.requires_grad_(False)
        self.lm.requires_grad_(config.finetune_lm)

    @classmethod
    def from_config(cls, config: ModelConfig, *, prompt_ids: list[int], load_weights: bool = True
                    ) -> "CaptionModel":
        """Build all parts. load_weights=False skips fetching pretrained weights for the parts a saved
        captioner carries itself (see checkpoint.saved_parts)."""
        parts = saved_parts(config)
        lm = build_lm(config, load_weights=load_weights or "lm" not in parts)
        width = lm.get_input_embeddings().embedding_dim
        encoders, mappers = {}, {}
        for m in config.modalities:
            fetch = load_weights or f"encoders.{m}" not in parts
            encoders[m] = build_image_encoder(config, load_weights=fetch) if m == "image" else \
                build_audio_encoder_from_config(config, load_weights=fetch)
            mappers[m] = build_mapper(config, feature_dim=encoders[m].output_dim, lm_dim=width,
                                      prefix_length=config.segment_length(m))
        return cls(config=config, encoders=encoders, mappers=mappers, lm=lm, prompt_ids=prompt_ids)

    @property
    def modalities(self) -> list[str]:
        return list(self.config.modalities)

    @property
    def image_encoder(self) -> nn.Module:
        return self.encoders["image"]

    @property
    def prefix_tokens(self) -> int:
        """LM positions before the caption with every modality present: prefix embeddings + prompt."""
        return sum(self.config.segment_length(m) for m in self.modalities) + self.prompt_ids.numel()

    def train(self, mode: bool = True) -> "CaptionModel":
        super().train(mode)
        if not self.config.finetune_lm:
            self.lm.eval()  # frozen LM: no dropout, it is a fixed function
        return self

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoders["image"](images)  # (B, F)

    def check_modalities(self, given) -> None:
        """ModalityError unless `given` (any iterable of names) is a non-empty subset of the trained modalities."""
        given = set(given)
        extra = [m for m in MODALITIES if m in given and m not in self.modalities] + sorted(given - set(MODALITIES))
        if extra:
            raise ModalityError(
                f"this captioner was trained on {' + '.join(self.modalities)} only; it cannot use "
                f"{' or '.join(extra)} input (train one with modalities "
                f"{','.join(m for m in MODALITIES if m in {*self.modalities, *extra})})")
        if not given:
            raise ModalityError(f"no input given: this captioner takes {' and/or '.join(self.modalities)}")

    def prefix_embeds(self, features: Features | torch.Tensor, present: dict[str, torch.Tensor] | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """LM input embeddings for everything before the caption and their mask.

        features: {modality: (B, F_m)} for the modalities the batch has (a bare tensor means the model's
        only modality); present: optional {modality: (B,) bool}, rows without that modality. Returns
        (embeds (B, Q, D), mask (B, Q) or None when every position is real)."""
        if isinstance(features, torch.Tensor):
            if len(self.modalities) != 1:
                raise ModalityError(f"give features as a dict {{modality: tensor}} for a {'+'.join(self.modalities)} "
                                    "captioner")
            features = {self.modalities[0]: features}
        self.check_modalities(list(features))
        embed = self.lm.get_input_embeddings()
        segments, keep = [], []
        for i, m in enumerate(self.modalities):
            if m not in features:
                continue
            seg = self.mappers[m](features[m]).to(embed.weight.dtype)  # (B, P_m, D); mappers cast their input
            if self.modality_embed is not None:
                seg = seg + self.modality_embed[i].to(seg.dtype)
            segments.append(seg)
            rows = present.get(m) if present is not None else None
            keep.append((rows if rows is not None else seg.new_ones(seg.shape[0], dtype=torch.bool))
                        .to(seg.device)[:, None].expand(-1, seg.shape[1]))  # (B, P_m)
        b = segments[0].shape[0]
        if self.prompt_ids.numel():
            segments.append(embed(self.prompt_ids).unsqueeze(0).expand(b, -1, -1))  # (B, Tp, D)
            keep.append(torch.ones(b, self.prompt_ids.numel(), dtype=torch.bool, device=segments[0].device))
        prefix, keep = torch.cat(segments, dim=1), torch.cat(keep, dim=1)  # (B, Q, D), (B, Q)
        if present is None or len(features) == 1:  # every row has every given input (a row has at least one)
            return prefix, None
        # Absent segments out, real positions to the right (stable sort keeps their order). Done even when
        # nothing is absent: checking would wait for the GPU on every training step.
        order = torch.sort(keep.to(torch.int8), dim=1, stable=True).indices  # (B, Q)
        prefix = prefix.gather(1, order[..., None].expand(-1, -1, prefix.shape[-1]))
        return prefix, keep.gather(1, order).long()

    def forward(self, features: Features | torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                present: dict[str, torch.Tensor] | None = None) -> CaptionOutput:
        """features {modality: (B, F_m)}; input_ids / attention_mask (B, T) right-padded captions ending in
        EOS; present {modality: (B,) bool} for batches where rows lack a modality."""
        prefix, prefix_mask = self.prefix_embeds(features, present)  # (B, Q, D), (B, Q) | None
        tokens = self.lm.get_input_embeddings()(input_ids)  # (B, T, D)
        embeds = torch.cat([prefix, tokens], dim=1)  # (B, Q + T, D)
        b, q = prefix.shape[:2]
        ones = attention_mask.new_ones(b, q)
        mask = torch.cat([ones if prefix_mask is None else prefix_mask.to(attention_mask.dtype), attention_mask],
                         dim=1)  # (B, Q + T)
        kwargs = {}
        if prefix_mask is not None:  # left-padded rows: positions count real tokens only, as when decoding
            kwargs["position_ids"] = (mask.cumsum(1) - 1).clamp_min(0)
        # Position q - 1 + t predicts caption token t: the LM head (a third of GPT-2's compute per position)
        # runs only there, not on the prefix, whose predictions no loss uses.
        t = input_ids.shape[1]
        keep = torch.arange(q - 1, q - 1 + t, device=embeds.device)
        logits = self.lm(inputs_embeds=embeds, attention_mask=mask, logits_to_keep=keep, **kwargs).logits  # (B, T, V)
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)  # padding is ignored
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
        return CaptionOutput(loss=loss, logits=logits)

