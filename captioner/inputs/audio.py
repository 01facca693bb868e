"""Audio input: reading one sound file as mono float samples (the encoders are in model/audio_encoder.py).

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
"""

from __future__ import annotations

import io
import logging
import os

import numpy as np

from captioner.errors import one_line as _one_line
from captioner.errors import AudioError  # noqa: F401  (defined in errors.py)
from captioner.inputs.image import open_regular_file

logger = logging.getLogger(__name__)

MAX_AUDIO_BYTES = 512 * 1024 * 1024  # files above this are refused before decoding
RESAMPLE_QUALITY = "HQ"
WINDOW_POLICIES = ("center", "start")


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



# ----------------------------------------------------------------------------------------------- reading


def load_audio(path: str | os.PathLike, *, sample_rate: int, max_seconds: float | None = None,
               max_bytes: int | None = MAX_AUDIO_BYTES) -> np.ndarray:
    """The audio at `path` as float32 mono samples (N,) at `sample_rate` (see the module docstring).

    `max_seconds`: refuse audio whose declared duration exceeds this (None: no limit). `max_bytes`: refuse
    files larger than this before decoding (None: no limit). Raises `AudioError` ("PATH: REASON") for any
    problem with the file; ValueError for bad arguments.
    """
    _check_args(sample_rate, max_seconds, max_bytes)
    fspath = os.fspath(path)
    name = os.fsdecode(fspath)
    with open_regular_file(fspath, name, error=AudioError, max_bytes=max_bytes) as f:
        samples, rate = _decode(f, name, max_seconds)
    return _mono(samples, rate, name, sample_rate)


def load_audio_bytes(data: bytes, *, name: str, sample_rate: int, max_seconds: float | None = None,
                     max_bytes: int | None = MAX_AUDIO_BYTES) -> np.ndarray:
    """Like `load_audio` for encoded audio bytes (a tar member, a parquet cell); `name` goes in errors."""
    _check_args(sample_rate, max_seconds, max_bytes)
    if not data:
        raise _error(name, "empty file")
    if max_bytes is not None and len(data) > max_bytes:
        raise _error(name, f"too large ({len(data)} bytes > limit {max_bytes}; raise max_bytes to allow)")
    samples, rate = _decode(io.BytesIO(data), name, max_seconds)
    return _mono(samples, rate, name, sample_rate)


def _check_args(sample_rate, max_seconds, max_bytes) -> None:
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) or sample_rate < 1:
        raise ValueError(f"sample_rate must be a positive integer, not {sample_rate!r}")
    if max_seconds is not None and not (max_seconds > 0):
        raise ValueError(f"max_seconds must be positive or None, not {max_seconds!r}")
    if max_bytes is not None and (isinstance(max_bytes, bool) or max_bytes < 1):
        raise ValueError(f"max_bytes must be a positive integer or None, not {max_bytes!r}")


def _mono(samples: np.ndarray, rate: int, name: str, sample_rate: int) -> np.ndarray:
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




def _decode(f, name: str, max_seconds: float | None) -> tuple[np.ndarray, int]:
    """(samples (N, C) float32, sample rate) of an open file, or AudioError."""
    import soundfile as sf

    head = f.read(_SNIFF_BYTES)
    size = f.seek(0, os.SEEK_END)  # (files and in-memory bytes alike)
    f.seek(len(head))
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


