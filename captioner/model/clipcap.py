"""Converter of ClipCap checkpoints (rmokady/CLIP_prefix_caption .pt files) into captioner directories.

Two layouts, both mapped onto our one MLP / transformer mapper (mapping.py) and a GPT-2 built from an
inline config:
- "mlp" (coco_weights.pt, conceptual_weights.pt): `clip_project.model.{0,2}` (Linear, Tanh, Linear),
  raw CLIP ViT-B/32 features, fine-tuned GPT-2 under `gpt.`.
- "transformer" (the COCO transformer-mapper model): `clip_project.linear`, `clip_project.prefix_const`
  (our `queries`) and `clip_project.transformer.layers.{i}` (pre-LN, ReLU, no q/k/v bias), CLIP RN50x4
  features L2-normalised first, frozen GPT-2 under `gpt.`.
ClipCap was trained without EOS: converted models stop at the first "." (ModelConfig.stop_tokens).
The file is read with `torch.load(weights_only=True)`: a pickle that would build objects or run code
is refused before anything in it runs. Every key is accounted for; a missing, unknown or misshapen key
is one CheckpointError line naming it and the shape expected.
"""

from __future__ import annotations

import logging
import pickle
import re
from pathlib import Path

import torch

from captioner.config import ModelConfig
from captioner.errors import CheckpointError

logger = logging.getLogger(__name__)

LAYOUTS = ("mlp", "transformer")
# ClipCap's image encoders: ViT-B/32 for the MLP models, RN50x4 for the transformer model.
CLIP_MODELS = {"mlp": "ViT-B-32", "transformer": "RN50x4"}
MAPPER_HEADS = 8  # ClipCap's Transformer(dim_embedding, 8, num_layers): fixed, not in the checkpoint
# Buffers of GPT-2 attention in transformers < 4.3x checkpoints (causal mask, -1e4): recomputed today.
LEGACY_LM_KEYS = re.compile(r"gpt\.transformer\.h\.\d+\.attn\.(bias|masked_bias)$")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A .pt state dict read without unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        why = str(e).strip().splitlines()
        detail = next((line for line in why if "Unsupported" in line or "global" in line.lower()), why[0] if why else "")
        raise CheckpointError(f"{path}: refused: unpickling it would build objects or run code, and only plain "
                              f"tensors are read ({detail.strip()})") from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({str(e).strip().splitlines()[0]})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a state dict (a {type(state).__name__}, expected a dict of tensors)")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: not a state dict: entry {bad[0]!r} is a {type(state[bad[0]]).__name__}, "
                              "not a tensor")
    return state


def detect_layout(state: dict, path: str | Path = "checkpoint") -> str:
    if "clip_project.model.0.weight" in state:
        return "mlp"
    if "clip_project.linear.weight" in state:
        return "transformer"
    raise CheckpointError(f"{path}: not a ClipCap checkpoint: neither clip_project.model.0.weight (MLP mapper) "
                          "nor clip_project.linear.weight (transformer mapper) is in it")


def _shape(state: dict, key: str, path, want: str, ndim: int) -> tuple[int, ...]:
    if key not in state:
        raise CheckpointError(f"{path}: missing key {key} (expected shape {want})")
    shape = tuple(state[key].shape)
    if len(shape) != ndim:
        raise CheckpointError(f"{path}: key {key} has shape {shape}, expected {want}")
    return shape


def _lm_config(state: dict, path, heads: int | None, eos_id: int) -> dict:
    vocab, width = _shape(state, "gpt.transformer.wte.weight", path, "(vocab, width)", 2)
    positions, _ = _shape(state, "gpt.transformer.wpe.weight", path, f"(positions, {width})", 2)
    layers = len({m.group(1) for k in state if (m := re.match(r"gpt\.transformer\.h\.(\d+)\.", k))})
    if heads is None:
        if width % 64:  # every GPT-2 size has 64-d heads; the head count is not in the state dict
            raise CheckpointError(f"{path}: GPT-2 width {width} is not a multiple of 64; give the LM head count")
        heads = width // 64
    inner = tuple(state["gpt.transformer.h.0.mlp.c_fc.weight"].shape)[-1] \
        if "gpt.transformer.h.0.mlp.c_fc.weight" in state else 4 * width
    return {"model_type": "gpt2", "vocab_size": vocab, "n_embd": width, "n_layer": layers, "n_head": heads,
            "n_positions": positions, "n_inner": None if inner == 4 * width else inner,
            "bos_token_id": eos_id, "eos_token_id": eos_id}


def clipcap_config(state: dict, layout: str, *, path="checkpoint", eos_id: int, stop_ids: list[int],
                   clip_pretrained: str | None = "openai", clip_model: str | None = None,
                   clip_config: dict | None = None, lm_heads: int | None = None) -> ModelConfig:
    """The ModelConfig equivalent to a ClipCap state dict, its sizes read from the tensors' shapes."""
    lm_config = _lm_config(state, path, lm_heads, eos_id)
    width = lm_config["n_embd"]
    common = dict(clip_model=clip_model or CLIP_MODELS[layout], clip_pretrained=clip_pretrained,
                  clip_config=clip_config, lm="gpt2", lm_config=lm_config, standardize_features=False,
                  stop_tokens=stop_ids)
    if layout == "mlp":
        hidden, _ = _shape(state, "clip_project.model.0.weight", path, "(hidden, feature_dim)", 2)
        out, _ = _shape(state, "clip_project.model.2.weight", path, f"(prefix_length * {width}, {hidden})", 2)
        if out % width:
            raise CheckpointError(f"{path}: key clip_project.model.2.weight has shape ({out}, {hidden}), expected "
                                  f"(prefix_length * {width}, {hidden})")
        # The MLP models fine-tuned GPT-2 with the mapper (ClipCap's default), so fine-tuning continues so.
        return ModelConfig(**common, mapper="mlp", prefix_length=out // width, mlp_hidden=hidden, finetune_lm=True)
    prefix_length, _ = _shape(state, "clip_project.prefix_const", path, f"(prefix_length, {width})", 2)
    out, _ = _shape(state, "clip_project.linear.weight", path, f"(clip_length * {width}, feature_dim)", 2)
    layers = len({m.group(1) for k in state if (m := re.match(r"clip_project\.transformer\.layers\.(\d+)\.", k))})
    if out % width or not layers:
        raise CheckpointError(f"{path}: key clip_project.linear.weight has shape {tuple(state['clip_project.linear.weight'].shape)}, "
                              f"expected (clip_length * {width}, feature_dim)" if out % width else
                              f"{path}: missing key clip_project.transformer.layers.0.norm1.weight (expected shape ({width},))")
    return ModelConfig(**common, mapper="transformer", prefix_length=prefix_length, clip_length=out // width,
                       mapper_layers=layers, mapper_heads=MAPPER_HEADS, mapper_activation="relu",
                       mapper_qkv_bias=False, normalize_features=True, finetune_lm=False)


def _targets(model, layout: str) -> dict[str, tuple[str, ...]]:
    """ClipCap key -> the state-dict names in our model it fills (two ClipCap keys fill one in_proj_weight:
    given as 'name[rows a:b]')."""
    mapper = "mappers.image.net."
    out: dict[str, tuple[str, ...]] = {}
    for name in model.lm.state_dict():
        if name != "lm_head.weight":  # tied to wte
            out["gpt." + name] = ("lm." + name,)
    if layout == "mlp":
        for i in (0, 2):
            for p in ("weight", "bias"):
                out[f"clip_project.model.{i}.{p}"] = (f"{mapper}net.{i}.{p}",)
        return out
    net = model.mappers["image"].net
    width = net.lm_dim
    out["clip_project.linear.weight"] = (mapper + "project.weight",)
    out["clip_project.linear.bias"] = (mapper + "project.bias",)
    out["clip_project.prefix_const"] = (mapper + "queries",)
    for i in range(len(net.layers.layers)):
        src, dst = f"clip_project.transformer.layers.{i}.", f"{mapper}layers.layers.{i}."
        for a, b in (("norm1", "norm1"), ("norm2", "norm2"), ("attn.project", "self_attn.out_proj"),
                     ("mlp.fc1", "linear1"), ("mlp.fc2", "linear2")):
            for p in ("weight", "bias"):
                out[f"{src}{a}.{p}"] = (f"{dst}{b}.{p}",)
        out[src + "attn.to_queries.weight"] = (f"{dst}self_attn.in_proj_weight[0:{width}]",)
        # ClipCap reshapes to_keys_values' output as (2, heads, head_dim): rows 0..D-1 keys, D..2D-1 values.
        out[src + "attn.to_keys_values.weight"] = (f"{dst}self_attn.in_proj_weight[{width}:{3 * width}]",)
    return out


def load_clipcap_state(model, state: dict, layout: str, path="checkpoint") -> None:
    """Copy a ClipCap state dict into `model` (a CaptionModel of `clipcap_config`); every key checked."""
    ours = model.state_dict()
    targets = _targets(model, layout)

    def target(spec: str) -> tuple[torch.Tensor, tuple[int, ...]]:
        m = re.match(r"(.+)\[(\d+):(\d+)\]$", spec)
        if not m:
            return ours[spec], tuple(ours[spec].shape)
        t = ours[m.group(1)][int(m.group(2)):int(m.group(3))]
        return t, tuple(t.shape)

    unknown = sorted(k for k in state if k not in targets and k != "gpt.lm_head.weight" and not LEGACY_LM_KEYS.match(k))
    if unknown:
        raise CheckpointError(f"{path}: unknown key {unknown[0]} (shape {tuple(state[unknown[0]].shape)})"
                              + (f" (+{len(unknown) - 1} more)" if len(unknown) > 1 else "")
                              + f" in a ClipCap {layout} checkpoint")
    for key, (spec,) in targets.items():
        _, want = target(spec)
        if key not in state:
            raise CheckpointError(f"{path}: missing key {key} (expected shape {want})")
        if tuple(state[key].shape) != want:
            raise CheckpointError(f"{path}: key {key} has shape {tuple(state[key].shape)}, expected {want}")
    head = state.get("gpt.lm_head.weight")
    if head is not None and not torch.equal(head, state["gpt.transformer.wte.weight"]):
        raise CheckpointError(f"{path}: key gpt.lm_head.weight differs from gpt.transformer.wte.weight (GPT-2 ties "
                              "them; this is not a ClipCap GPT-2)")
    with torch.no_grad():
        for key, (spec,) in targets.items():
            dst, _ = target(spec)
            dst.copy_(state[key].to(dst.dtype))
    bad = [k for k in targets if state[k].is_floating_point() and not torch.isfinite(state[k]).all()]
    if bad:
        raise CheckpointError(f"{path}: key {bad[0]} has NaN or infinite values")


def _tokenizer(tokenizer):
    if tokenizer is None or isinstance(tokenizer, (str, Path)):
        from captioner.model.encoders import build_tokenizer

        return build_tokenizer(ModelConfig(clip_pretrained=None, tokenizer=str(tokenizer or "gpt2")))
    return tokenizer


def convert_clipcap(checkpoint: str | Path, output_dir: str | Path, *, layout: str | None = None, tokenizer=None,
                    clip_pretrained: str | None = "openai", clip_model: str | None = None,
                    clip_config: dict | None = None, lm_heads: int | None = None) -> Path:
    """Convert a ClipCap .pt into a captioner directory (config.json + model.safetensors + tokenizer).

    layout: "mlp" or "transformer" (default: detected from the keys). tokenizer: a tokenizer, a name or
    a directory (default gpt2). clip_pretrained / clip_model / clip_config: the image encoder (default
    ClipCap's: ViT-B-32 or RN50x4 with OpenAI weights; None: random, saved with the captioner, for tests).
    lm_heads: GPT-2 attention heads (default width // 64, as in every GPT-2 size)."""
    from captioner.model.checkpoint import save_pretrained
    from captioner.model.encoders import build_image_encoder, build_lm
    from captioner.model.mapping import build_mapper
    from captioner.model.model import CaptionModel

    state = read_state_dict(checkpoint)
    layout = layout or detect_layout(state, checkpoint)
    if layout not in LAYOUTS:
        raise CheckpointError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    tok = _tokenizer(tokenizer)
    dot = tok(".", add_special_tokens=False)["input_ids"]
    if len(dot) != 1:
        raise CheckpointError(f"the tokenizer splits '.' into {len(dot)} tokens; ClipCap's captions end at one '.' token")
    config = clipcap_config(state, layout, path=checkpoint, eos_id=tok.eos_token_id, stop_ids=dot,
                            clip_pretrained=clip_pretrained, clip_model=clip_model, clip_config=clip_config,
                            lm_heads=lm_heads)
    if config.lm_config["vocab_size"] != len(tok):
        raise CheckpointError(f"{checkpoint}: GPT-2 vocabulary of {config.lm_config['vocab_size']} tokens, but the "
                              f"tokenizer has {len(tok)}")
    # The encoder is built without fetching weights: a pretrained one is fetched by name when the converted
    # directory is loaded; a random one (clip_pretrained None) is saved with it.
    encoder = build_image_encoder(config, load_weights=False)
    feature_dim = (state.get("clip_project.model.0.weight", state.get("clip_project.linear.weight"))).shape[1]
    if encoder.output_dim != feature_dim:
        raise CheckpointError(f"{checkpoint}: the mapper takes {feature_dim}-d image features but the image encoder "
                              f"({config.clip_model if clip_config is None else 'clip_config'}) gives {encoder.output_dim}")
    lm = build_lm(config)
    mapper = build_mapper(config, feature_dim=feature_dim, lm_dim=config.lm_config["n_embd"])
    model = CaptionModel(config=config, encoders={"image": encoder}, mappers={"image": mapper}, lm=lm, prompt_ids=[])
    load_clipcap_state(model, state, layout, checkpoint)
    logger.info("converted ClipCap %s checkpoint %s", layout, checkpoint)
    return save_pretrained(model, tok, output_dir, extra={"converted_from": f"clipcap-{layout}:{Path(checkpoint).name}"})
