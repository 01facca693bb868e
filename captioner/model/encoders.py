"""Frozen encoders and the causal LM, built from a ModelConfig.

This is the edge where hub names (open_clip model/pretrained tags, transformers ids) are turned into
modules; constructors elsewhere only receive modules. Offline, a hub name fails with `ModelLoadError`
explaining how to use a local path instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from captioner.errors import CheckpointError, ModelLoadError  # noqa: F401  (ModelLoadError re-exported)
from captioner.config import ConfigError, ModelConfig, load_json
from captioner import hub
from captioner.model.audio_encoder import build_audio_encoder
from captioner.hub import OFFLINE_HINT, call_hub, is_local  # noqa: F401  (re-exported)

logger = logging.getLogger(__name__)

# Known-good (architecture, pretrained tag) pairs for the image encoder; any open_clip pair works.
KNOWN_CLIP_MODELS = {
    "ViT-B-32": "openai",
    "ViT-B-16": "openai",
    "ViT-L-14": "openai",
    "RN50": "openai",
    "ViT-B-32-quickgelu": "laion400m_e32",
}
KNOWN_LMS = ("gpt2", "distilgpt2", "gpt2-medium", "gpt2-large", "facebook/opt-125m", "facebook/opt-350m")


class ImageEncoder(nn.Module):
    """A frozen open_clip vision tower: images (B, 3, H, W) -> features (B, output_dim)."""

    def __init__(self, *, visual: nn.Module, preprocess: Callable, image_size: int | tuple[int, int]):
        super().__init__()
        self.visual = visual
        self.preprocess = preprocess  # PIL.Image -> (3, H, W) float tensor
        self.image_size = image_size
        self.visual.requires_grad_(False)
        self.visual.eval()
        self.output_dim = _output_dim(visual, image_size)

    def train(self, mode: bool = True) -> "ImageEncoder":
        # Frozen: stay in eval mode (dropout / norm statistics never change).
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        dtype = next(self.visual.parameters()).dtype  # bf16/fp16 towers take images in their own dtype
        return self.visual(images.to(dtype)).float()  # (B, D)


def _output_dim(visual: nn.Module, image_size) -> int:
    dim = getattr(visual, "output_dim", None)
    if isinstance(dim, int):
        return dim
    size = image_size if isinstance(image_size, (tuple, list)) else (image_size, image_size)
    with torch.no_grad():
        return int(visual(torch.zeros(1, 3, *size)).shape[-1])


def resolve_clip_config(config: ModelConfig) -> dict | None:
    """The inline open_clip architecture dict if the config names one (inline or a JSON file)."""
    if config.clip_config is not None:
        return config.clip_config
    if config.clip_model.endswith(".json"):
        return load_json(config.clip_model)
    return None


def build_image_encoder(config: ModelConfig, *, load_weights: bool = True) -> ImageEncoder:
    """Build the frozen image encoder. With load_weights=False pretrained weights are not fetched
    (used when the weights come from a saved captioner)."""
    import open_clip
    from open_clip.model import _build_vision_tower

    arch = resolve_clip_config(config)
    if arch is not None:
        if "vision_cfg" not in arch or "embed_dim" not in arch:
            raise ConfigError("clip_config needs 'embed_dim' and 'vision_cfg' (open_clip model config format)")
        visual = _build_vision_tower(arch["embed_dim"], arch["vision_cfg"], quick_gelu=arch.get("quick_gelu", False))
        pre = arch.get("preprocess_cfg", {})
        if load_weights and config.clip_pretrained:
            if _is_checkpoint_path(config.clip_pretrained):
                _load_visual_checkpoint(visual, config.clip_pretrained)
            else:  # a pretrained tag (the default openai) names weights of a named architecture, not of this one
                logger.info("clip_config without a checkpoint file: the image tower is randomly initialised "
                            "(clip_pretrained %r ignored)", config.clip_pretrained)
    else:
        pretrained = config.clip_pretrained if load_weights else None
        model, _ = create_open_clip(config.clip_model, pretrained)
        visual = model.visual
        pre = dict(getattr(visual, "preprocess_cfg", {}) or {})
        del model  # only the vision tower is kept; the text tower is not needed for captioning
    image_size = getattr(visual, "image_size", None) or pre.get("size") or arch["vision_cfg"]["image_size"]
    preprocess = open_clip.image_transform(
        image_size, is_train=False, mean=pre.get("mean"), std=pre.get("std"),
        resize_mode=pre.get("resize_mode"), interpolation=pre.get("interpolation"),
    )
    return ImageEncoder(visual=visual, preprocess=preprocess, image_size=image_size)


def build_audio_encoder_from_config(config: ModelConfig, *, load_weights: bool = True) -> nn.Module:
    """The frozen audio encoder a ModelConfig names (see audio_encoder.py for the encoders themselves)."""
    return build_audio_encoder(config.audio_encoder, config.audio_model, config=config.audio_config,
                               load_weights=load_weights, whisper_pool=config.whisper_pool or None)


def create_open_clip(model_name: str, pretrained: str | None, *, needs_hub: bool | None = None,
                     hint: str = OFFLINE_HINT, purpose: str = ""):
    """(model, eval transform) from open_clip by name; offline, only the local cache is tried and a
    failure is a ModelLoadError with `hint`. needs_hub defaults to: a pretrained tag that is not a file."""
    import open_clip

    if needs_hub is None:
        needs_hub = bool(pretrained) and not os.path.exists(pretrained)
    offline = needs_hub and not hub.hub_reachable()
    try:
        with hub.hub_offline() if offline else contextlib.nullcontext(), hub.no_remote_code():
            model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained)
    except Exception as e:  # open_clip raises RuntimeError/OSError/HF errors for unknown or unreachable weights
        why = "the hub is unreachable and it is not in the local cache" if offline else f"{type(e).__name__}: {e}"
        raise ModelLoadError(f"could not load open_clip model {model_name!r} with pretrained {pretrained!r}"
                             f"{purpose}: {why}. {hint}") from None
    return model, preprocess


def _is_checkpoint_path(value: str) -> bool:
    """A clip_pretrained value that names a file (existing, or path-like: a folder or a file suffix), not an
    open_clip pretrained tag such as openai or laion2b_s34b_b79k."""
    return os.path.exists(value) or os.sep in value or "/" in value or Path(value).suffix.lower() in (
        ".pt", ".pth", ".bin", ".safetensors", ".ckpt")


def _load_visual_checkpoint(visual: nn.Module, path: str) -> None:
    """Load a local open_clip checkpoint (full CLIP or vision-only) into a vision tower."""
    if not os.path.exists(path):
        raise ModelLoadError(
            f"clip_pretrained {path!r} is not a file; with clip_config set it must be a local checkpoint. "
            + OFFLINE_HINT
        )
    import open_clip

    state = open_clip.load_state_dict(path)
    if any(k.startswith("visual.") for k in state):
        state = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    visual.load_state_dict(state, strict=True)


def build_lm(config: ModelConfig, *, load_weights: bool = True) -> nn.Module:
    """The causal LM: from an inline config (random init) or pretrained weights (hub id or dir)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if config.lm_config is not None or not load_weights:
        if config.lm_config is not None:
            d = dict(config.lm_config)
            model_type = d.pop("model_type", None)
            if model_type is None:
                raise ConfigError("lm_config needs a 'model_type' key (e.g. 'gpt2')")
            lm_cfg = AutoConfig.for_model(model_type, **d)
        else:
            lm_cfg = call_hub(AutoConfig.from_pretrained, "LM config", config.lm)
        lm = AutoModelForCausalLM.from_config(lm_cfg, attn_implementation="sdpa", trust_remote_code=False)
    else:
        lm = call_hub(AutoModelForCausalLM.from_pretrained, "LM", config.lm, attn_implementation="sdpa")
    return lm


def build_tokenizer(config: ModelConfig, directory: str | Path | None = None):
    """Tokenizer from a saved captioner directory, else config.tokenizer, else config.lm."""
    from transformers import AutoTokenizer

    name = str(directory) if directory is not None else (config.tokenizer or config.lm)
    if directory is None:
        tok = call_hub(AutoTokenizer.from_pretrained, "tokenizer", name)
    else:  # a saved captioner: its tokenizer files are ours, so anything wrong with them is a checkpoint error
        files = [p for p in ("tokenizer.json", "tokenizer_config.json") if (Path(directory) / p).exists()]
        where = Path(directory) / (files[0] if files else "tokenizer.json")
        try:
            tok = call_hub(AutoTokenizer.from_pretrained, "tokenizer", name)
        except ModelLoadError as e:
            raise CheckpointError(f"{where}: unreadable tokenizer ({e})") from None
    if tok.eos_token_id is None:
        raise ModelLoadError(f"tokenizer {name!r} has no EOS token; captions need one to end")
    return tok
