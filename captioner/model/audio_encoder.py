"""Frozen audio encoders (`AudioEncoder`, `build_audio_encoder`).

A frozen transformers audio model behind the same small interface as `encoders.ImageEncoder`:
`preprocess(samples)` (mono float arrays at `sample_rate`) -> dict of tensors, `forward(batch)` ->
features (B, output_dim). Kinds: "clap" (the `ClapModel` audio tower + projection, `get_audio_features`,
L2-normalised; default `laion/clap-htsat-unfused`: 512-d, 48 kHz, 10 s windows) and "whisper" (the
`WhisperModel` encoder; 16 kHz, 30 s windows; its last hidden state pooled over time, see `whisper_pool`).
Hub ids follow `captioner.hub`'s offline conventions (`ModelLoadError` naming the model when the hub
is unreachable and it is not cached).
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import torch
from torch import nn

from captioner.config import ConfigError
from captioner.errors import one_line as _one_line
from captioner.inputs.audio import fit_window, load_audio
from captioner import hub

logger = logging.getLogger(__name__)

DEFAULT_AUDIO_MODELS = {"clap": "laion/clap-htsat-unfused", "whisper": "openai/whisper-base"}
AUDIO_KINDS = tuple(DEFAULT_AUDIO_MODELS)

AUDIO_OFFLINE_HINT = (
    "Offline, use a local path instead: a directory written by save_pretrained holding the model and its "
    "feature extractor (preprocessor_config.json); or load it once on a machine with internet so it is in "
    "the Hugging Face cache."
)


class AudioEncoder(nn.Module):
    """A frozen transformers audio model: mono samples -> `preprocess` -> `forward` -> features (B, output_dim).

    kind "clap": `ClapModel.get_audio_features` (audio tower + projection, L2-normalised); the text tower is
    dropped. kind "whisper": the `WhisperModel` encoder, its last hidden state (B, T, d_model) pooled over the
    frames that hold audio (not the padding up to the 30 s window): `whisper_pool="mean"` -> (B, d_model);
    an int k -> k consecutive segments each averaged, concatenated -> (B, k * d_model).
    """

    def __init__(self, *, kind: str, model: nn.Module, feature_extractor, whisper_pool: str | int = "mean"):
        super().__init__()
        if kind not in AUDIO_KINDS:
            raise ConfigError(f"audio encoder kind must be one of {AUDIO_KINDS}, not {kind!r}")
        self.kind = kind
        self.model = model
        self.feature_extractor = feature_extractor
        self.sample_rate = int(feature_extractor.sampling_rate)
        if kind == "clap":
            self.window_samples = int(feature_extractor.nb_max_samples)
            self.hop_length = int(feature_extractor.hop_length)
            self.output_dim = int(model.audio_projection.linear2.out_features)
        else:
            self.window_samples = int(feature_extractor.n_samples)
            self.hop_length = int(feature_extractor.hop_length)
            if whisper_pool != "mean" and (isinstance(whisper_pool, bool) or not isinstance(whisper_pool, int)
                                           or whisper_pool < 1):
                raise ConfigError(f"whisper_pool must be 'mean' or a positive int, not {whisper_pool!r}")
            d_model = int(model.config.d_model)
            self.output_dim = d_model if whisper_pool == "mean" else whisper_pool * d_model
        self.whisper_pool = whisper_pool
        self.window_seconds = self.window_samples / self.sample_rate
        self.model.requires_grad_(False)
        self.model.eval()

    def train(self, mode: bool = True) -> "AudioEncoder":
        # Frozen: stay in eval mode (dropout / batch-norm statistics never change).
        return super().train(False)

    def preprocess(self, samples: np.ndarray | list[np.ndarray]) -> dict[str, torch.Tensor]:
        """Mono float samples at `sample_rate` (one (N,) array or a list of them, any lengths) -> model inputs.

        Audio longer than the window is cut to its centred `window_seconds` (`fit_window`, deterministic);
        shorter audio is padded by the feature extractor the way the model was trained (CLAP: repeated,
        Whisper: silence). Returns {"input_features": (B, ...) float tensor, "num_samples": (B,) long}.
        """
        return AudioPreprocess(self)(samples)

    def loader(self, *, max_seconds: float | None = None) -> "AudioFileLoader":
        """A picklable path -> model inputs (without the batch dimension) function for DataLoader workers."""
        return AudioFileLoader(AudioPreprocess(self), max_seconds=max_seconds)

    @torch.no_grad()
    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        dtype = next(self.model.parameters()).dtype
        features = batch["input_features"].to(device=device, dtype=dtype)
        if self.kind == "clap":
            is_longer = batch.get("is_longer")
            out = self.model.get_audio_features(
                input_features=features, is_longer=None if is_longer is None else is_longer.to(device))
            return out.pooler_output.float()  # (B, D)
        hidden = self.model(features).last_hidden_state  # (B, T, d_model); T = frames / 2
        return self._pool(hidden.float(), batch.get("num_samples"))

    def _pool(self, hidden: torch.Tensor, num_samples: torch.Tensor | None) -> torch.Tensor:
        b, t, d = hidden.shape
        if num_samples is None:
            valid = [t] * b
        else:  # encoder frames holding audio: one per 2 mel frames (hop_length samples each)
            per_frame = 2 * self.hop_length
            valid = [max(1, min(t, -(-int(n) // per_frame))) for n in num_samples]
        pooled = []
        for i in range(b):
            h = hidden[i, :valid[i]]  # (T_i, d)
            if self.whisper_pool == "mean":
                pooled.append(h.mean(dim=0))  # (d,)
            else:
                k = self.whisper_pool
                seg = nn.functional.adaptive_avg_pool1d(h.t().unsqueeze(0), k)  # (1, d, k)
                pooled.append(seg[0].t().reshape(k * d))  # (k * d,)
        return torch.stack(pooled)  # (B, output_dim)


class AudioPreprocess:
    """`AudioEncoder.preprocess` without the model, so DataLoader workers can receive it cheaply."""

    def __init__(self, encoder: AudioEncoder):
        self.kind, self.feature_extractor = encoder.kind, encoder.feature_extractor
        self.sample_rate, self.window_samples = encoder.sample_rate, encoder.window_samples

    def __call__(self, samples: np.ndarray | list[np.ndarray]) -> dict[str, torch.Tensor]:
        batch = [samples] if isinstance(samples, np.ndarray) and samples.ndim == 1 else list(samples)
        if not batch:
            raise ValueError("preprocess needs at least one audio clip")
        clips = []
        for x in batch:
            x = np.asarray(x, dtype=np.float32)
            if x.ndim != 1 or x.shape[0] == 0:
                raise ValueError(f"each clip must be a non-empty mono array (N,), not of shape {x.shape}")
            clips.append(fit_window(x, self.window_samples) if x.shape[0] > self.window_samples else x)
        num_samples = torch.tensor([len(x) for x in clips], dtype=torch.long)  # (B,)
        out = self.feature_extractor(clips, sampling_rate=self.sample_rate, return_tensors="pt")
        if self.kind == "clap":
            return {"input_features": out["input_features"], "is_longer": out["is_longer"],  # (B, 1, T, mels)
                    "num_samples": num_samples}
        return {"input_features": out["input_features"], "num_samples": num_samples}  # (B, mels, frames)


class AudioFileLoader:
    """path -> one clip's model inputs (no batch dimension): read, mix to mono, resample, preprocess."""

    def __init__(self, preprocess: AudioPreprocess, *, max_seconds: float | None = None):
        self.preprocess, self.max_seconds = preprocess, max_seconds

    def __call__(self, path: str) -> dict[str, torch.Tensor]:
        samples = load_audio(path, sample_rate=self.preprocess.sample_rate, max_seconds=self.max_seconds)
        return {k: v[0] for k, v in self.preprocess(samples).items()}


def build_audio_encoder(kind: str, name: str | None = None, *, config: dict | None = None,
                        load_weights: bool = True, whisper_pool: str | int | None = None) -> AudioEncoder:
    """A frozen `AudioEncoder` of `kind` ("clap" or "whisper").

    From `config` (an inline transformers config dict; random init) when given: its optional keys
    "feature_extractor" (kwargs of ClapFeatureExtractor / WhisperFeatureExtractor) and, for whisper,
    "whisper_pool" are taken out first. Otherwise from `name` (a hub id or a save_pretrained directory;
    default `DEFAULT_AUDIO_MODELS[kind]`); with load_weights=False only its config and feature extractor
    are read and the weights are randomly initialised (used when they come from a saved captioner).
    Offline, a hub id that is not cached fails fast with `ModelLoadError`.
    """
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    if kind not in AUDIO_KINDS:
        raise ConfigError(f"audio encoder kind must be one of {AUDIO_KINDS}, not {kind!r}")
    model_cls, config_cls, fe_cls = ((ClapModel, ClapConfig, ClapFeatureExtractor) if kind == "clap"
                                     else (WhisperModel, WhisperConfig, WhisperFeatureExtractor))
    pool: str | int = "mean"
    if config is not None:
        d = dict(config)
        fe_kwargs = d.pop("feature_extractor", {}) or {}
        pool = d.pop("whisper_pool", "mean")
        d.pop("model_type", None)
        try:
            model_cfg = config_cls(**d)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"bad inline {kind} audio config: {_one_line(e)}") from None
        model = model_cls(model_cfg)
        feature_extractor = fe_cls(**fe_kwargs)
    else:
        name = name or DEFAULT_AUDIO_MODELS[kind]
        feature_extractor = _from_pretrained(fe_cls.from_pretrained, f"{kind} feature extractor", name)
        if load_weights:
            model = _from_pretrained(model_cls.from_pretrained, f"{kind} audio model", name)
        else:
            model = model_cls(_from_pretrained(config_cls.from_pretrained, f"{kind} audio config", name))
    if kind == "clap":
        model.text_model = None  # only the audio tower and its projection are used
        model.text_projection = None
    else:
        model = model.get_encoder()  # the decoder is not needed
    logger.info("audio encoder: %s %s", kind, name or "(inline config)")
    return AudioEncoder(kind=kind, model=model, feature_extractor=feature_extractor,
                        whisper_pool=pool if whisper_pool is None else whisper_pool)


def _from_pretrained(load: Callable, what: str, name: str, **kwargs):
    """A transformers from_pretrained call; offline (hub unreachable), only the local cache is tried."""
    return hub.call_hub(load, what, name, hint=AUDIO_OFFLINE_HINT, **kwargs)
