"""Configuration dataclasses: every field is documented once, here.

`ModelConfig` holds everything needed to rebuild a captioning model and is saved as
`config.json` next to `model.safetensors`. `DecodeConfig` groups the decoding options and `TrainConfig`
holds a training run (it nests the ModelConfig being trained).
CLI flags are generated from these dataclasses (see `cli.py`), so defaults live only here.
Unknown keys are errors, never silently ignored.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from captioner.errors import ConfigError  # noqa: F401  (defined in errors.py)
from captioner.files import atomic_write

CONFIG_VERSION = 1
MODALITIES = ("image", "audio")  # the order of their segments in the prefix



def _doc(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


# Rules for numeric fields: name -> (test, what the value must be). NaN fails every test.
_RULES = {
    ">=0": (lambda v: v >= 0, "an integer >= 0"), ">=1": (lambda v: v >= 1, "an integer >= 1"),
    ">=2": (lambda v: v >= 2, "an integer >= 2"), ">0": (lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    ">=0f": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    "finite": (math.isfinite, "a finite number"),
    "0..1": (lambda v: 0 <= v <= 1, "in [0, 1]"), "(0..1]": (lambda v: 0 < v <= 1, "in (0, 1]"),
}


def _check_numbers(config: Any, rules: dict[str, str]) -> None:
    """Numeric fields checked up front, before any work: {field: rule of _RULES}; None passes (an unset
    optional). Every bad field is named, in one line."""
    bad = []
    for name, rule in rules.items():
        value = getattr(config, name)
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue  # types are checked by from_dict
        test, want = _RULES[rule]
        if not test(value):
            bad.append(f"{name} must be {want}, got {value}")
    if bad:
        raise ConfigError("; ".join(bad))


def _cli_int(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value
    parse.__name__ = f"int>={minimum}"
    return parse


# argparse `type=` for numeric flags that are not config fields: the value is refused while parsing,
# before any output is created.
positive_int, nonnegative_int = _cli_int(1), _cli_int(0)


@dataclass
class ModelConfig:
    """Architecture of a captioner: frozen encoders (image, audio) -> one mapper each -> causal LM."""

    modalities: list[str] = _doc(
        "Inputs the captioner is conditioned on: image, audio, or both (comma-separated on the command "
        "line). Each has its own frozen encoder and mapper; the LM sees [image prefix][audio prefix][prompt], "
        "and a modality missing from an input is left out of the prefix.",
        default_factory=lambda: ["image"],
    )
    clip_model: str = _doc(
        "open_clip architecture name (e.g. ViT-B-32, RN50). Ignored when clip_config is set.",
        default="ViT-B-32",
    )
    clip_pretrained: str | None = _doc(
        "open_clip pretrained tag (e.g. openai, laion2b_s34b_b79k) or a local checkpoint file; "
        "None means random init (the weights are then saved with the captioner). With clip_config only a "
        "checkpoint file counts: a tag is ignored (random init).",
        default="openai",
    )
    clip_config: dict | None = _doc(
        "Inline open_clip model config ({embed_dim, vision_cfg, ...}) for custom or tiny encoders; "
        "overrides clip_model. Randomly initialised unless clip_pretrained is a checkpoint file (a "
        "pretrained tag such as the default openai is then ignored). Written automatically when the "
        "encoder weights are saved.",
        default=None,
    )
    lm: str = _doc(
        "Causal LM: a Hugging Face hub id (gpt2, distilgpt2, facebook/opt-125m) or a local directory.",
        default="gpt2",
    )
    lm_config: dict | None = _doc(
        "Inline transformers config dict to build the LM from scratch (random init), e.g. a tiny "
        "GPT-2; overrides loading weights from lm; its vocab_size must hold every tokenizer id, and it "
        "must be trained (finetune_lm). Written automatically when the LM is saved.",
        default=None,
    )
    tokenizer: str | None = _doc(
        "Tokenizer hub id or directory; default: same as lm. A saved captioner keeps its own copy.",
        default=None,
    )
    finetune_lm: bool = _doc("Train the LM together with the mapper (else the LM is frozen).", default=False)
    mapper: str = _doc("Mapping network: 'mlp' (ClipCap MLP) or 'transformer' (learned queries + layers).",
                       default="mlp")
    prefix_length: int = _doc("Number of prefix embeddings the mapper feeds the LM.", default=10)
    mlp_hidden: int | None = _doc("MLP hidden width; default (lm_width * prefix_length) // 2.", default=None)
    mapper_layers: int = _doc("Transformer mapper: number of layers.", default=8)
    mapper_heads: int = _doc("Transformer mapper: attention heads (must divide the LM width).", default=8)
    clip_length: int = _doc(
        "Transformer mapper: number of tokens the image feature is projected into before the layers.",
        default=10,
    )
    mapper_activation: str = _doc("Transformer mapper: activation of the feed-forward layers, 'gelu' or 'relu' "
                                  "(ClipCap's transformer mapper).", default="gelu")
    mapper_qkv_bias: bool = _doc("Transformer mapper: query/key/value projections have a bias (ClipCap's have none; "
                                 "the output projection always has one).", default=True)
    normalize_features: bool = _doc("Divide each feature by its L2 norm before the mapper (ClipCap's transformer "
                                    "model was trained on normalised CLIP features).", default=False)
    stop_tokens: list[int] = _doc(
        "Token ids that end a caption besides EOS, kept in the caption (honoured by every decoding strategy). "
        "ClipCap was trained without EOS: its converted models stop at the first '.'.",
        default_factory=list,
    )
    standardize_features: bool = _doc(
        "Standardise image features per dimension with mean/std estimated on the training images "
        "(stored with the mapper) before the mapping network.",
        default=True,
    )
    prompt: str = _doc("Text placed after the prefix in training and decoding, e.g. 'A photo of'.",
                       default="")
    audio_encoder: str = _doc("Audio encoder kind: 'clap' (ClapModel audio tower + projection) or 'whisper' "
                              "(Whisper encoder, pooled over time).", default="clap")
    audio_model: str | None = _doc(
        "Audio encoder weights: a Hugging Face hub id or a local save_pretrained directory; default "
        "laion/clap-htsat-unfused (clap) or openai/whisper-base (whisper). Ignored when audio_config is set.",
        default=None,
    )
    audio_config: dict | None = _doc(
        "Inline audio model config (transformers ClapConfig / WhisperConfig dict, plus optional "
        "'feature_extractor' kwargs) for custom or tiny encoders, randomly initialised; the weights are "
        "then saved with the captioner.",
        default=None,
    )
    whisper_pool: int = _doc("Whisper encoder: 0 averages the hidden states over time; k > 0 keeps k "
                             "consecutive time segments (each averaged), so the feature has k * width values.",
                             default=0)
    audio_prefix_length: int | None = _doc("Prefix embeddings of the audio segment; default prefix_length.",
                                           default=None)

    def __post_init__(self) -> None:
        if self.mapper not in ("mlp", "transformer"):
            raise ConfigError(f"mapper must be 'mlp' or 'transformer', got {self.mapper!r}")
        for name in ("prefix_length", "mapper_layers", "mapper_heads", "clip_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        unknown = [m for m in self.modalities if m not in MODALITIES]
        if unknown or not self.modalities or len(set(self.modalities)) != len(self.modalities):
            raise ConfigError(f"modalities must be one or both of {', '.join(MODALITIES)} (no repeats), "
                              f"got {self.modalities!r}")
        self.modalities = [m for m in MODALITIES if m in self.modalities]  # canonical (prefix) order
        if self.mapper_activation not in ("gelu", "relu"):
            raise ConfigError(f"mapper_activation must be 'gelu' or 'relu', got {self.mapper_activation!r}")
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in self.stop_tokens):
            raise ConfigError(f"stop_tokens must be token ids (integers >= 0), got {self.stop_tokens!r}")
        if self.audio_encoder not in ("clap", "whisper"):
            raise ConfigError(f"audio_encoder must be 'clap' or 'whisper', got {self.audio_encoder!r}")
        _check_numbers(self, {"mlp_hidden": ">=1", "whisper_pool": ">=0", "audio_prefix_length": ">=1"})

    def segment_length(self, modality: str) -> int:
        """Prefix embeddings a modality contributes."""
        return self.audio_prefix_length or self.prefix_length if modality == "audio" else self.prefix_length


@dataclass
class DecodeConfig:
    """How captions are generated from the prefix."""

    strategy: str = _doc("Decoding strategy: greedy, beam or sample (nucleus).", default="beam")
    num_beams: int = _doc("Beam search: beams per image.", default=5)
    length_penalty: float = _doc(
        "Beam search: hypothesis score = sum log p / length ** length_penalty (>0 favours longer).",
        default=1.0,
    )
    num_captions: int = _doc(
        "Captions returned per image (beam: <= num_beams best hypotheses; sample: independent draws).",
        default=1,
    )
    max_new_tokens: int = _doc("Maximum number of generated tokens per caption (EOS included).", default=30)
    min_new_tokens: int = _doc("EOS is not allowed before this many tokens (benchmarks set min = max to force "
                               "equal work).", default=0)
    top_p: float = _doc("Sampling: nucleus probability mass kept (1.0 disables).", default=0.9)
    top_k: int = _doc("Sampling: keep only the k most likely tokens (0 disables).", default=0)
    temperature: float = _doc("Sampling: logits are divided by this.", default=1.0)
    seed: int | None = _doc("Sampling: random seed for reproducible captions.", default=None)
    use_cache: bool = _doc("Reuse attention keys/values between steps (KV cache). Off only for debugging.",
                           default=True)
    cpu_packed_head: bool = _doc("On CPU in float32, run the LM head on a oneDNN-prepacked copy of its weight "
                                 "(about 10 percent faster decoding; logits equal to ~1e-6).", default=True)
    static_cache: bool = _doc("Preallocate the KV cache for the whole caption (beam reorders gather into a "
                              "second buffer), so every step has the same shapes (what --compile needs; no gain "
                              "on its own on CPU).",
                              default=False)
    compile: bool = _doc("torch.compile the LM step over a static KV cache; on CUDA as CUDA graphs (one launch "
                         "per step). Each new batch size compiles first (tens of seconds): for long GPU runs.",
                         default=False)
    # Reranking (decoding/rerank.py)
    rerank: str | None = _doc("Rerank candidate captions: 'clip' scores every beam hypothesis (beam) or "
                              "rerank_samples draws (sample) by CLIPScore against its image and returns the best "
                              "num_captions. The CLIP is the captioner's own when it has a pretrained text tower, "
                              "else a CLIPScore model given to the captioner (none: off).", default=None)
    rerank_samples: int = _doc("Reranking with sampling: draws per image to choose from.", default=8)
    rerank_weight: float = _doc("Reranking: weight of the LM score (mean log-probability per token) added to "
                                "CLIPScore (0: CLIPScore alone).", default=0.0)

    def __post_init__(self) -> None:
        if self.rerank not in (None, "clip"):
            raise ConfigError(f"rerank must be clip or none, got {self.rerank!r}")
        _check_numbers(self, {"rerank_samples": ">=1", "rerank_weight": ">=0f"})
        if self.rerank and self.strategy == "greedy":
            raise ConfigError("reranking needs several candidates per image: use beam or sample decoding")
        if self.rerank and self.strategy == "sample" and self.num_captions > self.rerank_samples:
            raise ConfigError(f"num_captions ({self.num_captions}) cannot exceed rerank_samples "
                              f"({self.rerank_samples})")
        if self.strategy not in ("greedy", "beam", "sample"):
            raise ConfigError(f"strategy must be greedy, beam or sample, got {self.strategy!r}")
        _check_numbers(self, {"num_beams": ">=1", "num_captions": ">=1", "max_new_tokens": ">=1",
                              "length_penalty": "finite", "top_p": "(0..1]", "top_k": ">=0", "temperature": ">0"})
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ConfigError(f"min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens}")
        if self.strategy == "beam" and self.num_captions > self.num_beams:
            raise ConfigError(f"num_captions ({self.num_captions}) cannot exceed num_beams ({self.num_beams})")
        if self.strategy == "greedy" and self.num_captions != 1:
            raise ConfigError("greedy decoding returns one caption per image; use beam or sample")
        if (self.static_cache or self.compile) and not self.use_cache:
            raise ConfigError("static_cache and compile need the KV cache (use_cache)")


# --------------------------------------------------------------------------- JSON helpers


@dataclass
class TrainConfig:
    """A training run. `model` nests the ModelConfig of the captioner being trained."""

    data: str = _doc("Caption set: imagefolder directory, COCO captions JSON, Karpathy split JSON, a "
                     "CSV/TSV/JSONL table of image,caption rows, or a Hugging Face dataset (a save_to_disk "
                     "folder, a parquet file, or hf:NAME).", default="")
    image_root: str | None = _doc("Folder image paths are relative to (COCO/Karpathy JSON or a "
                                  "CSV/TSV/JSONL table; default: the file's folder).", default=None)
    output_dir: str = _doc("Run directory: config, metrics.jsonl, last/, best/ and state/.",
                           default="runs/captioner")
    image_column: str | None = _doc("Image column of a table or Hugging Face dataset (default: auto-detect).",
                                    default=None)
    audio_column: str | None = _doc("Audio column of a table or Hugging Face dataset (default: auto-detect "
                                    "an Audio feature, 'audio' or 'audio_file').", default=None)
    audio_root: str | None = _doc("Folder audio files are in (Clotho/AudioCaps CSVs; default: the CSV's "
                                  "folder).", default=None)
    modality_dropout: float = _doc("Probability that an item with both image and audio loses one of them "
                                   "(chosen evenly) in a training step, so the model also captions either "
                                   "alone; 0 disables.", default=0.3)
    caption_column: str | None = _doc("Caption column of a table or Hugging Face dataset; for a dataset also several "
                                      "('caption_1,caption_2'; default: auto-detect, numbered columns included).",
                                      default=None)
    train_split: str = _doc("Split used for training (Karpathy: train, restval, train+restval).", default="train")
    val_split: str | None = _doc("Split used for validation (none to skip).", default="val")
    strict: bool = _doc("Malformed rows in the caption set and unreadable images or sounds are errors instead of "
                        "being skipped.", default=False)
    allow_outside_paths: bool = _doc("Let a Hugging Face dataset's or parquet file's cells name files outside its "
                                     "folder (absolute or '../' paths); by default such rows are reported and "
                                     "skipped, as in folders and tables.", default=False)
    epochs: int = _doc("Passes over all (image, caption) pairs.", default=10)
    max_steps: int | None = _doc("Stop after this many optimiser steps in total (the schedule still spans "
                                 "all epochs); with --resume a stopped run continues.", default=None)
    batch_size: int = _doc("Captions per forward pass, summed over all processes.", default=64)
    grad_accum_steps: int = _doc("Forward passes accumulated per optimiser step.", default=1)
    lr: float = _doc("Peak learning rate (AdamW).", default=2e-5)
    weight_decay: float = _doc("AdamW weight decay.", default=0.01)
    warmup_steps: int = _doc("Linear warm-up optimiser steps before the schedule.", default=100)
    schedule: str = _doc("Learning-rate schedule after warm-up: cosine, linear or constant.", default="cosine")
    grad_clip: float = _doc("Clip the gradient norm to this (0 disables).", default=1.0)
    max_caption_tokens: int = _doc("Captions are cut to this many tokens (EOS included).", default=40)
    bucket_by_length: bool = _doc("Group captions of similar length into batches (less padding).", default=True)
    mixed_precision: str = _doc("Autocast: no, bf16 or fp16.", default="no")
    seed: int = _doc("Random seed (data order, init).", default=0)
    feature_cache: str | None = _doc("Directory of the persistent image-feature cache (keyed by encoder); "
                                     "none encodes into memory at start.", default=None)
    encode_batch_size: int = _doc("Images per batch when computing image features.", default=64)
    num_workers: int = _doc("DataLoader workers decoding images for feature extraction.", default=2)
    val_images: int = _doc("Validation images captioned each epoch for BLEU-4/CIDEr (0 skips).",
                           default=100)
    val_strategy: str = _doc("Decoding of the validation captions: greedy or beam.", default="beam")
    val_num_beams: int = _doc("Beams of the validation captions (beam).", default=3)
    save_every: int = _doc("Also save the resumable state every N optimiser steps (0: each epoch only).",
                           default=0)
    val_every: int = _doc("Also validate and save last/ (and best/ when better) every N optimiser steps, for "
                          "long epochs (0: at the end of each epoch only).", default=0)
    resume: bool = _doc("Continue from <output_dir>/state if it exists.", default=False)
    overwrite: bool = _doc("Start afresh in an output_dir that holds an earlier run: its config, metrics, "
                           "state and saved captioners are removed first (without this or resume such a "
                           "folder is refused).", default=False)
    log_every: int = _doc("Log the training loss every N optimiser steps.", default=20)
    max_nonfinite_steps: int = _doc("A step whose loss or gradient is not finite (NaN/inf) is skipped; this many "
                                    "in a row stop training with an error (the weights are saved when still "
                                    "finite).", default=5)
    init_from: str | None = _doc("Start from the weights of a saved captioner (e.g. an earlier run's best/); its "
                                 "model config and tokenizer replace model.", default=None)
    # Self-critical sequence training (train/scst.py): the same loop, a reward instead of cross-entropy.
    scst: bool = _doc("Self-critical sequence training (SCST) instead of cross-entropy, usually from init_from: "
                      "per image, scst_samples sampled captions are rewarded with CIDEr-D against its references "
                      "(document frequencies of the training references, cached beside the run); the validation "
                      "CIDEr (else the mean reward) decides best/. The CLI's defaults with it: lr 1e-5, 3 epochs. "
                      "batch_size counts sampled captions.", default=False)
    scst_samples: int = _doc("SCST: captions sampled per image (temperature 1, no top-k/top-p).", default=5)
    scst_baseline: str = _doc("SCST: reward baseline, 'mean' (of the image's other samples) or 'greedy' (the "
                              "reward of its greedy caption).", default="mean")
    scst_max_tokens: int = _doc("SCST: maximum tokens of a sampled caption (EOS included).", default=30)
    clip_reward_weight: float = _doc("SCST: add this times CLIPScore (sample vs image, with the captioner's "
                                     "pretrained CLIP) to the CIDEr-D reward; 0 disables.", default=0.0)
    model: ModelConfig = field(default_factory=ModelConfig)

    def __post_init__(self) -> None:
        if self.scst_baseline not in ("mean", "greedy"):
            raise ConfigError(f"scst_baseline must be mean or greedy, got {self.scst_baseline!r}")
        if self.scst and self.scst_baseline == "mean" and self.scst_samples < 2:
            raise ConfigError("the mean baseline needs scst_samples >= 2 (it averages the other samples)")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ConfigError(f"schedule must be cosine, linear or constant, got {self.schedule!r}")
        if self.val_strategy not in ("greedy", "beam"):
            raise ConfigError(f"val_strategy must be greedy or beam, got {self.val_strategy!r}")
        if self.resume and self.overwrite:
            raise ConfigError("resume and overwrite exclude each other")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ConfigError(f"mixed_precision must be no, bf16 or fp16, got {self.mixed_precision!r}")
        _check_numbers(self, {
            "epochs": ">=1", "max_steps": ">=1", "batch_size": ">=1", "grad_accum_steps": ">=1", "lr": ">0",
            "weight_decay": ">=0f", "warmup_steps": ">=0", "grad_clip": ">=0f", "max_caption_tokens": ">=2",
            "modality_dropout": "0..1", "seed": ">=0", "encode_batch_size": ">=1", "num_workers": ">=0",
            "val_images": ">=0", "val_num_beams": ">=1", "save_every": ">=0", "val_every": ">=0", "log_every": ">=1",
            "max_nonfinite_steps": ">=1", "scst_samples": ">=1", "scst_max_tokens": ">=1",
            "clip_reward_weight": ">=0f"})
        if self.seed >= 2 ** 32:  # numpy's seed range
            raise ConfigError(f"seed must be < 2**32, got {self.seed}")


def _check_type(cls: type, name: str, value: Any, hint: Any) -> None:
    """Minimal runtime type check for the simple field types used in our configs."""
    origin = typing.get_origin(hint)
    allowed = typing.get_args(hint) if origin in (typing.Union, getattr(__import__("types"), "UnionType")) else (hint,)
    for t in allowed:
        if t is type(None) and value is None:
            return
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return
        if t in (str, bool, dict, list) and isinstance(value, t):
            return
        if typing.get_origin(t) in (dict, list) and isinstance(value, typing.get_origin(t)):
            return
    names = ", ".join(getattr(t, "__name__", str(t)) for t in allowed)
    raise ConfigError(f"{cls.__name__}.{name}: expected {names}, got {type(value).__name__} ({value!r})")


def from_dict(cls: type, data: dict, *, source: str = "config") -> Any:
    """Build dataclass `cls` from a dict; unknown keys and wrong types raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{source}: unknown {cls.__name__} key(s): {', '.join(unknown)}")
    for key, value in data.items():
        _check_type(cls, key, value, hints[key])
    try:
        return cls(**data)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


def save_json(obj: Any, path: str | Path, **extra: Any) -> None:
    data = {**extra, **to_dict(obj)}
    atomic_write(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def load_json(path: str | Path) -> dict:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


def load_config_file(path: str | Path) -> dict:
    """A JSON or YAML (.yaml/.yml) config file as a dict; errors name the file."""
    path = Path(path)
    if path.suffix.lower() not in (".yaml", ".yml"):
        return load_json(path)
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: invalid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    return data
