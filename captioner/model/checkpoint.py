"""save_pretrained / load_pretrained: config.json + model.safetensors + tokenizer files.

Only parts that cannot be re-fetched by name are saved: always the mappers (one per modality) and the
modality embeddings; the image encoder when it has no pretrained tag (random/custom init); the audio
encoder when it is built from an inline config; the LM when it is fine-tuned or built from an inline
config. Loading is strict: missing, unexpected, mis-shaped or non-finite tensors, unknown config keys and configs
asking to run code shipped with the directory are each one `CheckpointError` line naming the file, never
a partial load. Files are written atomically (temp file, fsync, rename), config.json last.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from captioner.errors import CheckpointError  # noqa: F401  (defined in errors.py)
from captioner.config import ConfigError, ModelConfig, from_dict, load_json, to_dict
from captioner.files import atomic_write
from captioner.hub import refuse_remote_code

FORMAT = "captioner"
FORMAT_VERSION = 2  # 2: per-modality encoders/mappers (1: image only, "mapper.*" keys)
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# Top-level keys of config.json besides "model": training writes step and epoch; other extras of
# save_pretrained go under "extra", so a misplaced or misspelt key is an error, not silently ignored.
META_KEYS = ("format", "format_version", "model", "step", "epoch", "extra")

def saved_parts(config: ModelConfig) -> tuple[str, ...]:
    """State-dict prefixes saved with a captioner of this config."""
    parts = ["mappers", "modality_embed"]
    if "image" in config.modalities and config.clip_pretrained is None:
        parts.append("encoders.image")
    if "audio" in config.modalities and config.audio_config is not None:
        parts.append("encoders.audio")
    if config.finetune_lm or config.lm_config is not None:
        parts.append("lm")
    return tuple(parts)


def part_state(model: torch.nn.Module, parts: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """State of the saved parts, tied tensors (e.g. GPT-2 lm_head = wte) kept once under the first name."""
    seen, state = set(), {}
    for name, tensor in model.state_dict().items():
        if not any(name == p or name.startswith(p + ".") for p in parts):
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        state[name] = tensor
    return state


def resolved_config(model) -> ModelConfig:
    """The model's config with inline architectures filled in for every saved part, so that loading
    needs no hub or registry lookup for them."""
    import open_clip

    config = ModelConfig(**to_dict(model.config))
    parts = saved_parts(config)
    if "encoders.image" in parts and config.clip_config is None:
        from captioner.model.encoders import resolve_clip_config

        config.clip_config = resolve_clip_config(config) or open_clip.get_model_config(config.clip_model)
    if "lm" in parts:
        lm_config = model.lm.config.to_dict()
        lm_config.pop("loss_type", None)  # runtime field; passing None back only triggers a warning
        config.lm_config = lm_config
    return config


def save_pretrained(model, tokenizer, directory: str | Path, *, extra: dict | None = None) -> Path:
    from safetensors.torch import save

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = resolved_config(model)
    state = {k: v.detach().contiguous().cpu() for k, v in part_state(model, saved_parts(config)).items()}
    tokenizer.save_pretrained(directory)
    atomic_write(directory / WEIGHTS_NAME, save(state))
    extra = dict(extra or {})
    top = {k: extra.pop(k) for k in META_KEYS if k in extra and k not in ("format", "format_version", "model")}
    if "extra" in top or extra:
        top["extra"] = {**(top.get("extra") or {}), **extra}
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": to_dict(config), **top}
    atomic_write(directory / CONFIG_NAME, json.dumps(meta, indent=2) + "\n")
    return directory


def read_config(directory: str | Path) -> tuple[ModelConfig, dict]:
    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory (expected a saved captioner with {CONFIG_NAME})")
    if not path.exists():
        raise CheckpointError(f"{path}: missing; {directory} is not a saved captioner (or it is incomplete)")
    try:
        meta = load_json(path)
        if not isinstance(meta, dict):
            raise CheckpointError(f"{path}: not a captioner config (a JSON {type(meta).__name__}, not an object)")
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{path}: not a captioner config (format={meta.get('format')!r})")
        if meta.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(
                f"{path}: format_version {meta.get('format_version')!r} is not supported "
                f"(this captioner reads version {FORMAT_VERSION})"
            )
        unknown = sorted(set(meta) - set(META_KEYS))
        if unknown:
            raise CheckpointError(f"{path}: unknown top-level key(s) {', '.join(map(repr, unknown))} (expected "
                                  f"{', '.join(META_KEYS)}; model settings go under \"model\")")
        config = from_dict(ModelConfig, meta.get("model"), source=f"{path}: model")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    refuse_remote_code(directory, error=CheckpointError)
    return config, meta


def load_weights(model, directory: str | Path) -> None:
    """Strictly load model.safetensors into the saved parts of `model`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(directory) / WEIGHTS_NAME
    if not path.exists():
        raise CheckpointError(f"{path}: missing")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable or corrupted ({e})") from None
    expected = part_state(model, saved_parts(model.config))
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in sorted(expected.keys() & state.keys()) if state[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        def show(xs):
            return ", ".join(xs[:5]) + (f" (+{len(xs) - 5} more)" if len(xs) > 5 else "")
        problems = [f"{label} {show(xs)}" for label, xs in
                    (("missing:", missing), ("unexpected:", unexpected), ("shape mismatch:", shapes)) if xs]
        raise CheckpointError(f"{path} does not match its config.json: " + "; ".join(problems))
    bad = [k for k in sorted(state) if state[k].is_floating_point() and not torch.isfinite(state[k]).all()]
    if bad:  # NaN/inf weights caption garbage without any other sign
        raise CheckpointError(f"{path}: tensor(s) with NaN or infinite values: {', '.join(bad[:5])}"
                              + (f" (+{len(bad) - 5} more)" if len(bad) > 5 else ""))
    with torch.no_grad():
        for name, tensor in expected.items():
            tensor.copy_(state[name])
