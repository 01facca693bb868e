"""Audio input: reading one sound file as mono float samples, and frozen audio encoders.

Reading (`load_audio`, `fit_window`, `AudioError`, `MAX_AUDIO_BYTES`):

`load_audio(path, sample_rate=SR)` returns a float32 mono array at `SR` samples per second, or raises
`AudioError` with the one-line message "PATH: REASON". REASON starts with one of these stable phrases;
some add a detail in parentheses ("corrupt audio data (flac decoder lost sync)"):

    no such file            broken symlink          is a directory          not a regular file
    permission denied       unreadable (...)        empty file              not an audio file
    unsupported format      truncated               corrupt audio data      no samples
    too large (N bytes > limit M; raise max_bytes to allow)
    too long (S s > limit M s; raise max_seconds to allow)

- Formats: whatever the installed libsndfile (through `soundfile`) decodes: WAV/WAVEX/RF64/W64, FLAC,
  Ogg (Vorbis, Opus), AIFF, AU, CAF and the other `soundfile.available_formats()`. MP3 is read when that
  libsndfile has MP3 support (libsndfile >= 1.1; the wheels of soundfile >= 0.12 bundle 1.2.x, which has
  it: `"MP3" in soundfile.available_formats()`); without it an MP3 file is "unsupported format (MP3 ...)".
  AAC/M4A/MP4, WMA/ASF, MIDI and others libsndfile cannot read are "unsupported format (NAME)" when their
  signature is recognised, else "not an audio file".
- Values: integer PCM is scaled to [-1, 1] by libsndfile (16-bit: x / 32768; 8-bit unsigned: (x - 128) / 128,
  so its silence is 0); float files are returned as stored (non-finite values become 0, with a warning).
- Channels are mixed to mono by averaging. Rates other than `sample_rate` are resampled with soxr ("HQ").
- Size: files above `max_bytes` are refused before decoding; with `max_seconds`, audio whose header
  declares a longer duration is refused before decoding ("too long"; a guard, not a crop: use
  `fit_window` to cut). Zero-length audio is "no samples"; silent audio is fine.
- Damage: a WAV whose data chunk is shorter than its header declares, an Ogg stream without its final
  (end-of-stream) page, and any file yielding fewer samples than its header declares are "truncated";
  decoder errors are "corrupt audio data (...)". Damage inside raw PCM data cannot be detected. MP3 has
  no reliable declared length (libsndfile estimates it), so a short MP3 is only logged as a warning.
- Only regular files are read (a FIFO is refused without blocking); the file is closed on return.

`fit_window(samples, length, policy=...)` cuts or zero-pads to exactly `length` samples.

Encoders (`AudioEncoder`, `build_audio_encoder`, `tiny_clap_config`, `tiny_whisper_config`):

A frozen transformers audio model behind the same small interface as `encoders.ImageEncoder`:
`preprocess(samples)` (mono float arrays at `sample_rate`) -> dict of tensors, `forward(batch)` ->
features (B, output_dim). Kinds: "clap" (the `ClapModel` audio tower + projection, `get_audio_features`,
L2-normalised; default `laion/clap-htsat-unfused`: 512-d, 48 kHz, 10 s windows) and "whisper" (the
`WhisperModel` encoder; 16 kHz, 30 s windows; its last hidden state pooled over time, see `whisper_pool`).
Hub ids follow `captioner.encoders`' offline conventions (`ModelLoadError` naming the model when the hub
is unreachable and it is not cached).
"""

from __future__ import annotations

import logging
import os
from typing import Callable

import numpy as np
import torch
from torch import nn

from . import encoders as _encoders
from .config import ConfigError
from .images import open_regular_file

logger = logging.getLogger(__name__)

MAX_AUDIO_BYTES = 512 * 1024 * 1024  # files above this are refused before decoding
RESAMPLE_QUALITY = "HQ"
WINDOW_POLICIES = ("center", "start")

DEFAULT_AUDIO_MODELS = {"clap": "laion/clap-htsat-unfused", "whisper": "openai/whisper-base"}
AUDIO_KINDS = tuple(DEFAULT_AUDIO_MODELS)

AUDIO_OFFLINE_HINT = (
    "Offline, use a local path instead: a directory written by save_pretrained holding the model and its "
    "feature extractor (preprocessor_config.json); or load it once on a machine with internet so it is in "
    "the Hugging Face cache."
)

# Signatures of formats libsndfile does not read: "unsupported format (NAME)".
_UNSUPPORTED_SIGNATURES = (
    (b"\x30\x26\xb2\x75\x8e\x66\xcf\x11", "WMA/ASF"),
    (b"MThd", "MIDI"),
    (b"\xff\xf1", "AAC (ADTS)"),
    (b"\xff\xf9", "AAC (ADTS)"),
    (b"ADIF", "AAC (ADIF)"),
    (b"#!AMR", "AMR"),
    (b"MAC ", "Monkey's Audio"),
    (b"wvpk", "WavPack"),
    (b"\x1aE\xdf\xa3", "Matroska/WebM"),
    (b".RMF", "RealMedia"),
    (b"DSD ", "DSF"),
)
_SNIFF_BYTES = 4096
_MAX_DETAIL = 200


class AudioError(ValueError):
    """One audio file could not be read; the message names the file and the reason ("PATH: REASON", one line)."""


# ----------------------------------------------------------------------------------------------- reading


def load_audio(path: str | os.PathLike, *, sample_rate: int, max_seconds: float | None = None,
               max_bytes: int | None = MAX_AUDIO_BYTES) -> np.ndarray:
    """The audio at `path` as float32 mono samples (N,) at `sample_rate` (see the module docstring).

    `max_seconds`: refuse audio whose declared duration exceeds this (None: no limit). `max_bytes`: refuse
    files larger than this before decoding (None: no limit). Raises `AudioError` ("PATH: REASON") for any
    problem with the file; ValueError for bad arguments.
    """
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) or sample_rate < 1:
        raise ValueError(f"sample_rate must be a positive integer, not {sample_rate!r}")
    if max_seconds is not None and not (max_seconds > 0):
        raise ValueError(f"max_seconds must be positive or None, not {max_seconds!r}")
    if max_bytes is not None and (isinstance(max_bytes, bool) or max_bytes < 1):
        raise ValueError(f"max_bytes must be a positive integer or None, not {max_bytes!r}")
    fspath = os.fspath(path)
    name = os.fsdecode(fspath)
    with open_regular_file(fspath, name, error=AudioError, max_bytes=max_bytes) as f:
        samples, rate = _decode(f, name, max_seconds)
    # samples: (N, C) float32 -> (N,) mono
    mono = samples.mean(axis=1, dtype=np.float32) if samples.shape[1] > 1 else samples[:, 0]
    if not np.isfinite(mono).all():
        logger.warning("%s: non-finite sample values replaced by 0", name)
        mono = np.nan_to_num(mono, nan=0.0, posinf=0.0, neginf=0.0)
    if rate != sample_rate:
        import soxr

        mono = soxr.resample(mono, rate, int(sample_rate), quality=RESAMPLE_QUALITY)
    return np.ascontiguousarray(mono, dtype=np.float32)


def fit_window(samples: np.ndarray, length: int, *, policy: str = "center") -> np.ndarray:
    """`samples` (N,) cut or zero-padded to exactly `length` samples (a new array, same dtype).

    Too long: policy "center" keeps the centred window of `length` samples (the extra samples are dropped
    evenly from both ends, one more from the end when their count is odd); "start" keeps the first
    `length` samples. Too short: zero-padded at the end (both policies). Exact: an unchanged copy.
    """
    if policy not in WINDOW_POLICIES:
        raise ValueError(f"policy must be one of {WINDOW_POLICIES}, not {policy!r}")
    if isinstance(length, bool) or int(length) != length or length < 1:
        raise ValueError(f"length must be a positive integer, not {length!r}")
    samples = np.asarray(samples)
    if samples.ndim != 1:
        raise ValueError(f"samples must be one-dimensional (mono), not of shape {samples.shape}")
    n = samples.shape[0]
    if n >= length:
        start = (n - length) // 2 if policy == "center" else 0
        return samples[start:start + length].copy()
    out = np.zeros(length, dtype=samples.dtype)
    out[:n] = samples
    return out


def _error(name: str, reason: str) -> AudioError:
    return AudioError(f"{name}: {reason}")


def _one_line(e: BaseException | str) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= _MAX_DETAIL else text[:_MAX_DETAIL - 3] + "..."


def _decode(f, name: str, max_seconds: float | None) -> tuple[np.ndarray, int]:
    """(samples (N, C) float32, sample rate) of an open file, or AudioError."""
    import soundfile as sf

    head = f.read(_SNIFF_BYTES)
    size = os.fstat(f.fileno()).st_size
    if _wav_truncated(f, head, size) or _ogg_truncated(f, head, size):
        raise _error(name, "truncated")
    f.seek(0)
    try:
        with sf.SoundFile(f) as snd:
            fmt, frames, rate = snd.format, snd.frames, snd.samplerate
            if rate < 1 or snd.channels < 1:
                raise _error(name, f"corrupt audio data ({rate} Hz, {snd.channels} channels)")
            if max_seconds is not None and frames / rate > max_seconds:
                raise _error(name, f"too long ({frames / rate:.1f} s > limit {max_seconds:g} s; "
                                   "raise max_seconds to allow)")
            samples = snd.read(dtype="float32", always_2d=True)  # (N, C)
    except AudioError:
        raise
    except sf.LibsndfileError as e:
        raise _error(name, _libsndfile_reason(e.error_string, head)) from None
    except (RuntimeError, TypeError, ValueError) as e:  # soundfile's own checks on odd headers
        raise _error(name, f"corrupt audio data ({_one_line(e)})") from None
    except MemoryError:
        raise _error(name, "out of memory") from None
    except OSError as e:
        raise _error(name, f"unreadable ({e.strerror or _one_line(e)})") from None
    if samples.shape[0] < frames:
        if fmt == "MP3":  # the length libsndfile reports for MP3 is an estimate
            logger.warning("%s: %d samples decoded, header estimate %d", name, samples.shape[0], frames)
        else:
            raise _error(name, f"truncated ({samples.shape[0]} of {frames} samples)")
    if samples.shape[0] == 0:
        raise _error(name, "no samples")
    return samples, rate


def _libsndfile_reason(message: str, head: bytes) -> str:
    msg = _one_line(message).rstrip(".")
    low = msg.lower()
    if "format not recognised" in low or "unknown format" in low:
        return _unrecognised_reason(head)
    if "malformed" in low:
        return "corrupt audio data (malformed header)"
    if "not supported" in low or "unsupported" in low:
        return f"unsupported format ({msg})"
    if "truncated" in low or "unexpected end" in low:
        return "truncated"
    return f"corrupt audio data ({msg.removeprefix('Error : ')})"


def _unrecognised_reason(head: bytes) -> str:
    """Why libsndfile did not recognise the file, from its first bytes."""
    import soundfile as sf

    if head[:3] == b"ID3" or (len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0 and head[1] & 0x06):
        if "MP3" not in sf.available_formats():
            return "unsupported format (MP3; this libsndfile has no MP3 support)"
        return "corrupt audio data (damaged MP3 stream)"
    if head[4:8] == b"ftyp":
        return "unsupported format (MP4/M4A)"
    for sig, fmt in _UNSUPPORTED_SIGNATURES:
        if head.startswith(sig):
            return f"unsupported format ({fmt})"
    if head.startswith((b"RIFF", b"RF64", b"FORM", b"fLaC", b"OggS", b".snd", b"caff")):
        return "corrupt audio data (damaged header)"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith(b"<") and (b"<html" in text or text.startswith(b"<!doctype html")):
        return "not an audio file (HTML page)"
    return "not an audio file"


def _wav_truncated(f, head: bytes, size: int) -> bool:
    """A RIFF/WAVE file whose data chunk declares more bytes than the file holds. Streaming writers that
    leave the size at 0 or 0xFFFFFFFF (unknown) are not flagged."""
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return False
    pos = 12
    try:
        while pos + 8 <= size:
            f.seek(pos)
            chunk = f.read(8)
            if len(chunk) < 8:
                return False
            cid, csize = chunk[:4], int.from_bytes(chunk[4:8], "little")
            if cid == b"data":
                return csize not in (0, 0xFFFFFFFF) and pos + 8 + csize > size
            pos += 8 + csize + (csize & 1)
    except OSError:
        return False
    return False


def _ogg_truncated(f, head: bytes, size: int) -> bool:
    """An Ogg file whose last page is incomplete or is not an end-of-stream page."""
    if not head.startswith(b"OggS"):
        return False
    try:
        f.seek(max(0, size - 65536))
        tail = f.read()
    except OSError:
        return False
    start = tail.rfind(b"OggS")
    while start >= 0:
        page = tail[start:]
        if len(page) >= 27 and page[4] == 0:  # version 0: a page header, not "OggS" inside packet data
            nseg = page[26]
            if len(page) >= 27 + nseg:
                body = sum(page[27:27 + nseg])
                if 27 + nseg + body == len(page):
                    return not page[5] & 0x04  # header_type flag 4: end of stream
                if 27 + nseg + body > len(page):
                    return True  # the last page is cut off
            else:
                return True
        start = tail.rfind(b"OggS", 0, start)
    return True


# ----------------------------------------------------------------------------------------------- encoders


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
    return _encoders.call_hub(load, what, name, hint=AUDIO_OFFLINE_HINT, **kwargs)


def tiny_clap_config() -> dict:
    """A small random-init CLAP config (inline-config format of `build_audio_encoder`): 16 mel bins, 16 kHz,
    2 s windows, 32-d features. HTSAT constraints met: freq_ratio = spec_size // num_mel_bins = 4; the
    201 mel frames fit spec_size * freq_ratio = 256; 64 // patch_stride 4 = 16x16 patches, two stages
    (16 -> 8) with window 4; hidden_size = patch_embeds_hidden_size * 2 ** (stages - 1) = 32."""
    return {
        "audio_config": {
            "num_mel_bins": 16, "spec_size": 64, "window_size": 4, "patch_size": 4, "patch_stride": [4, 4],
            "patch_embeds_hidden_size": 16, "hidden_size": 32, "depths": [1, 1], "num_attention_heads": [2, 2],
            "num_hidden_layers": 2, "hidden_dropout_prob": 0.0,
        },
        "text_config": {
            "vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
            "intermediate_size": 32, "max_position_embeddings": 32,
        },
        "projection_dim": 32,
        "feature_extractor": {
            "feature_size": 16, "sampling_rate": 16000, "hop_length": 160, "max_length_s": 2,
            "fft_window_size": 400, "frequency_min": 50, "frequency_max": 8000,
            "truncation": "rand_trunc", "padding": "repeatpad",
        },
    }


def tiny_whisper_config() -> dict:
    """A small random-init Whisper config: 16 mel bins, 16 kHz, 2 s windows (200 mel frames ->
    max_source_positions 100 encoder frames), d_model 32, one encoder and one decoder layer."""
    return {
        "num_mel_bins": 16, "d_model": 32, "encoder_layers": 1, "encoder_attention_heads": 2,
        "encoder_ffn_dim": 64, "decoder_layers": 1, "decoder_attention_heads": 2, "decoder_ffn_dim": 64,
        "vocab_size": 64, "max_source_positions": 100, "max_target_positions": 16,
        "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 1,
        "feature_extractor": {"feature_size": 16, "sampling_rate": 16000, "hop_length": 160, "chunk_length": 2,
                              "n_fft": 400},
    }
