"""Offline audio demo datasets: generated sounds, and image + sound "scenes", with reference captions.

The audio counterpart of `captioner.demo.shapes`. Every clip holds one kind of sound repeated a
number of times (see `SOUND_ATTRIBUTES`): a low beep (~300 Hz sine), a high beep (~2000 Hz
sine) or a noise burst (white noise), played once, twice or three times. `synthesize`
renders a clip (2 s at 16 kHz by default: the window of the tiny test audio encoders), with
random pitch jitter, event lengths, gaps, first onset and gain plus faint background noise,
so no two clips are identical but pitch and count stay measurable. `describe_sound` gives
the reference captions and `sound_caption_attributes` reads them back.

A scene pairs an image from `captioner.demo.shapes` (one large shape in the centre: colour x
shape) with an independent sound. Its captions read "{image phrase} and {sound phrase}",
e.g. "a red circle and two high beeps"; no phrase contains "and" itself, so
`split_scene_caption` splits a caption on its single " and ".

Datasets are written in the Hugging Face "imagefolder" layout::

    root/
      train/00000.wav ... metadata.jsonl             (make_sounds_dataset)
      train/00000.png 00000.wav ... metadata.jsonl   (or, make_scenes_dataset)
      val/...
      test/...

with ``metadata.jsonl`` lines ``{"audio_file": "00012.wav", "captions": [...]}`` (sounds) or
``{"file_name": "00012.png", "audio_file": "00012.wav", "captions": [...]}`` (scenes), paths
relative to the split folder. As in `captioner.demo.shapes`, classes are enumerated in balanced,
shuffled blocks: items 0-8, 9-17, ... of a sounds split each hold the 9 sound classes once;
items 0-107, 108-215, ... of a scenes split each hold every colour x shape x sound x count
combination once, so image and sound vary independently and a model that knows only one of
them gets only that part of a caption right. Each split uses its own random stream derived
from ``seed`` and the output is byte-for-byte deterministic for a given set of arguments.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import soundfile as sf

from captioner.demo import shapes as _shapes

logger = logging.getLogger(__name__)

__all__ = [
    "SOUND_ATTRIBUTES",
    "SAMPLE_RATE",
    "CLIP_SECONDS",
    "synthesize",
    "describe_sound",
    "sound_caption_attributes",
    "describe_scene",
    "split_scene_caption",
    "scene_caption_attributes",
    "make_sounds_dataset",
    "make_scenes_dataset",
]

SOUND_ATTRIBUTES: dict[str, list[str]] = {
    "sound": ["low beep", "high beep", "noise burst"],
    "count": ["once", "twice", "three times"],
}
"""Attribute name -> possible values (3 x 3 = 9 sound classes). Values appear verbatim in captions."""

SAMPLE_RATE = 16000
CLIP_SECONDS = 2.0

# Nominal beep frequencies in Hz; each clip jitters its frequency by up to +-_PITCH_JITTER.
_BEEP_HZ = {"low beep": 300.0, "high beep": 2000.0}
_PITCH_JITTER = 0.05
_EVENT_SECONDS = (0.2, 0.3)  # length of one beep or burst, drawn per event
_GAP_SECONDS = (0.15, 0.25)  # silence between events, drawn per gap: well apart for counting
_FADE_SECONDS = 0.01  # raised-cosine fade in and out, so events start and end without clicks
_MARGIN_SECONDS = 0.05  # no event closer than this to either end of the clip
_PEAK = (0.4, 0.55)  # peak amplitude of the events, drawn per clip
_BACKGROUND_STD = 0.005  # faint noise under everything, so silence is never exactly zero
_MIN_SAMPLE_RATE = 8000  # keeps the high beep well below Nyquist
_N_EVENTS = {"once": 1, "twice": 2, "three times": 3}

# Caption vocabulary. The second name and the plural must not contain "and" (scene separator).
_SOUND_WORDS = {  # value -> (alternative name, plural)
    "low beep": ("low pitched beep", "low beeps"),
    "high beep": ("high pitched beep", "high beeps"),
    "noise burst": ("burst of noise", "noise bursts"),
}
_SCENE_IMAGE = {"size": "large", "position": "center"}  # what scene images fix; colour and shape vary
_SCENE_SEPARATOR = " and "


def _check_sound(attrs: Mapping[str, str]) -> None:
    for key, values in SOUND_ATTRIBUTES.items():
        if attrs.get(key) not in values:
            raise ValueError(f"{key} must be one of {values}, got {dict(attrs)!r}")


def _check_sample_rate(sample_rate: int) -> int:
    sample_rate = _shapes._check_count("sample_rate", sample_rate)
    if sample_rate < _MIN_SAMPLE_RATE:
        raise ValueError(f"sample_rate must be at least {_MIN_SAMPLE_RATE}, got {sample_rate}")
    return sample_rate


def synthesize(attrs: Mapping[str, str], rng: np.random.Generator, *, sample_rate: int = SAMPLE_RATE,
               seconds: float = CLIP_SECONDS) -> np.ndarray:
    """One clip for ``attrs`` (``"sound"`` and ``"count"``): float32 mono samples (N,), N = seconds * rate.

    Events last 0.2-0.3 s with 10 ms fades, are separated by 0.15-0.25 s of background
    noise, and start at a random onset (three events need ``seconds >= 1.5``, else ValueError); beeps are sines at 300 or 2000 Hz +-5% (one
    frequency per clip), bursts are white noise; the peak is 0.4-0.55. All randomness comes
    from ``rng``, so the same generator state gives the same samples.
    """
    _check_sound(attrs)
    sample_rate = _check_sample_rate(sample_rate)
    n = int(round(seconds * sample_rate))
    n_events = _N_EVENTS[attrs["count"]]
    # Checked against the longest possible events and gaps, so success never depends on the draw.
    longest = n_events * _EVENT_SECONDS[1] + (n_events - 1) * _GAP_SECONDS[1] + 2 * _MARGIN_SECONDS
    if seconds < longest:
        raise ValueError(f"seconds={seconds} is too short for {n_events} events (need {longest:g})")
    durations = rng.uniform(*_EVENT_SECONDS, size=n_events)
    gaps = rng.uniform(*_GAP_SECONDS, size=n_events - 1)
    slack = seconds - durations.sum() - gaps.sum() - 2 * _MARGIN_SECONDS
    onset = _MARGIN_SECONDS + rng.uniform(0, slack)
    peak = rng.uniform(*_PEAK)
    hz = _BEEP_HZ.get(attrs["sound"])  # None for a noise burst
    if hz is not None:
        hz *= 1 + rng.uniform(-_PITCH_JITTER, _PITCH_JITTER)

    out = rng.normal(0.0, _BACKGROUND_STD, size=n)
    fade = int(_FADE_SECONDS * sample_rate)
    ramp = 0.5 - 0.5 * np.cos(np.pi * np.arange(fade) / fade)  # (fade,) rising 0 -> 1
    start = onset
    for i, length in enumerate(durations):
        a, m = int(round(start * sample_rate)), int(round(length * sample_rate))
        if hz is not None:
            phase = rng.uniform(0, 2 * np.pi)
            event = np.sin(2 * np.pi * hz * np.arange(m) / sample_rate + phase)
        else:
            event = rng.uniform(-1.0, 1.0, size=m)
        envelope = np.ones(m)
        envelope[:fade], envelope[m - fade:] = ramp, ramp[::-1]
        out[a:a + m] += peak * envelope * event
        start += length + (gaps[i] if i < len(gaps) else 0.0)
    return np.clip(out, -1.0, 1.0).astype(np.float32)


def describe_sound(attrs: Mapping[str, str]) -> list[str]:
    """Reference captions for one sound: five distinct lowercase captions, no punctuation, no "and".

    >>> describe_sound({"sound": "high beep", "count": "twice"})[:3]
    ['a high beep twice', 'a high pitched beep twice', 'two high beeps']
    """
    _check_sound(attrs)
    sound, count = attrs["sound"], attrs["count"]
    other, plural = _SOUND_WORDS[sound]
    counted = {"once": f"a single {sound}", "twice": f"two {plural}", "three times": f"three {plural}"}[count]
    return [
        f"a {sound} {count}",
        f"a {other} {count}",
        counted,
        f"a {sound} played {count}",
        f"the sound of {counted}",
    ]


def _sound_classes() -> list[dict[str, str]]:
    """All sound x count combinations, in a fixed order."""
    return [{"sound": s, "count": c}
            for s, c in itertools.product(SOUND_ATTRIBUTES["sound"], SOUND_ATTRIBUTES["count"])]


# Every caption describe_sound can give -> its attributes (the phrasings never collide).
_SOUND_CAPTIONS = {caption: attrs for attrs in _sound_classes() for caption in describe_sound(attrs)}


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


def sound_caption_attributes(caption: str) -> dict[str, str]:
    """``{"sound": ..., "count": ...}`` of a caption from `describe_sound` (case and spacing ignored).

    Raises ValueError for any other text: model output that is not one of the reference
    phrasings does not count as naming a sound.
    """
    attrs = _SOUND_CAPTIONS.get(_normalise(caption))
    if attrs is None:
        raise ValueError(f"not a sound caption: {caption!r}")
    return dict(attrs)


def _image_phrase(attrs: Mapping[str, str]) -> str:
    return f"a {attrs['colour']} {attrs['shape']}"


def describe_scene(attrs: Mapping[str, str]) -> list[str]:
    """Reference captions for one scene (``colour``, ``shape``, ``sound``, ``count``): one per sound phrasing.

    >>> describe_scene({"colour": "red", "shape": "circle", "sound": "low beep", "count": "once"})[2]
    'a red circle and a single low beep'
    """
    _shapes._check_attrs({**_SCENE_IMAGE, "colour": attrs.get("colour"), "shape": attrs.get("shape")})
    image = _image_phrase(attrs)
    return [f"{image}{_SCENE_SEPARATOR}{sound}" for sound in describe_sound(attrs)]


def split_scene_caption(caption: str) -> tuple[str, str]:
    """(image part, sound part) of a scene caption, split on its single " and " (ValueError otherwise)."""
    parts = _normalise(caption).split(_SCENE_SEPARATOR)
    if len(parts) != 2:
        raise ValueError(f"a scene caption has exactly one {_SCENE_SEPARATOR.strip()!r}: {caption!r}")
    return parts[0], parts[1]


_IMAGE_PHRASES = {
    _image_phrase({"colour": c, "shape": s}): {"colour": c, "shape": s}
    for c, s in itertools.product(_shapes.ATTRIBUTES["colour"], _shapes.ATTRIBUTES["shape"])
}


def scene_caption_attributes(caption: str) -> dict[str, str]:
    """``{"colour", "shape", "sound", "count"}`` of a caption from `describe_scene` (ValueError otherwise)."""
    image, sound = split_scene_caption(caption)
    if image not in _IMAGE_PHRASES:
        raise ValueError(f"not a scene image phrase: {image!r} in {caption!r}")
    return {**_IMAGE_PHRASES[image], **sound_caption_attributes(sound)}


def _balanced(classes: list[dict[str, str]], n: int, rng: np.random.Generator) -> list[dict[str, str]]:
    """``n`` items: ``classes`` repeated in blocks, each block shuffled with ``rng``."""
    out: list[dict[str, str]] = []
    while len(out) < n:
        out.extend(classes[i] for i in rng.permutation(len(classes)))
    return out[:n]


def _clear_split(folder: Path) -> None:
    """Remove numbered PNGs and WAVs and the metadata a previous run may have left in ``folder``."""
    _shapes._clear_split(folder)
    for old in folder.glob("*.wav"):
        if old.is_file() and re.fullmatch(r"\d+\.wav", old.name):
            old.unlink()


# write_item(folder, stem, attrs, rng) -> metadata row; writes the item's files.
_ItemWriter = Callable[[Path, str, Mapping[str, str], np.random.Generator], dict]


def _write_dataset(root: str | Path, counts: dict[str, int], seed: int, classes: list[dict[str, str]],
                   write_item: _ItemWriter) -> Path:
    """Write every split of ``counts`` under ``root``: balanced items, files and ``metadata.jsonl``."""
    counts = {split: _shapes._check_count(f"n_{split}", counts[split]) for split in _shapes.SPLITS}
    seed = _shapes._check_count("seed", seed)
    for split_index, (split, n) in enumerate(counts.items()):
        folder = Path(root) / split
        folder.mkdir(parents=True, exist_ok=True)
        _clear_split(folder)
        # One independent stream per split, so split sizes do not affect each other.
        rng = np.random.default_rng(np.random.SeedSequence([seed, split_index]))
        width = max(5, len(str(n - 1)))  # one width per split, so file names sort in item order
        rows = [write_item(folder, f"{i:0{width}d}", attrs, rng) for i, attrs in enumerate(_balanced(classes, n, rng))]
        (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        logger.info("wrote %d %s items to %s", n, split, folder)
    return Path(root)


def _write_wav(folder: Path, stem: str, attrs: Mapping[str, str], rng: np.random.Generator,
               sample_rate: int) -> str:
    """Synthesize ``attrs`` into ``folder/stem.wav`` (16-bit PCM); return the file name."""
    name = f"{stem}.wav"
    sf.write(folder / name, synthesize(attrs, rng, sample_rate=sample_rate), sample_rate, subtype="PCM_16")
    return name


def make_sounds_dataset(root: str | Path, *, n_train: int = 450, n_val: int = 45, n_test: int = 90,
                        seed: int = 0, sample_rate: int = SAMPLE_RATE) -> Path:
    """Write the sounds dataset under ``root`` (``train/``, ``val/``, ``test/``); return ``root``.

    Each split folder gets ``n_*`` 16-bit WAV clips of `CLIP_SECONDS` at ``sample_rate``
    (``00000.wav``, ...) and ``metadata.jsonl`` rows ``{"audio_file": ..., "captions":
    describe_sound(attrs)}``. Numbered WAVs/PNGs and ``metadata.jsonl`` left by an earlier
    run are removed first; other files are left alone.
    """
    sample_rate = _check_sample_rate(sample_rate)

    def write_item(folder: Path, stem: str, attrs: Mapping[str, str], rng: np.random.Generator) -> dict:
        return {"audio_file": _write_wav(folder, stem, attrs, rng, sample_rate), "captions": describe_sound(attrs)}

    counts = {"train": n_train, "val": n_val, "test": n_test}
    return _write_dataset(root, counts, seed, _sound_classes(), write_item)


def make_scenes_dataset(root: str | Path, *, n_train: int = 864, n_val: int = 108, n_test: int = 108,
                        seed: int = 0, image_size: int = 64, sample_rate: int = SAMPLE_RATE) -> Path:
    """Write the scenes dataset under ``root`` (``train/``, ``val/``, ``test/``); return ``root``.

    Each item is a PNG (one large centred shape, drawn as in `captioner.demo.shapes`) and a WAV
    clip as in `make_sounds_dataset`, with ``metadata.jsonl`` rows ``{"file_name": ...,
    "audio_file": ..., "captions": describe_scene(attrs)}``. The defaults give whole blocks
    of 108, so val and test hold every combination once.
    """
    sample_rate = _check_sample_rate(sample_rate)
    image_size = _shapes._check_count("image_size", image_size)
    if image_size < _shapes._MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {_shapes._MIN_IMAGE_SIZE}, got {image_size}")

    def write_item(folder: Path, stem: str, attrs: Mapping[str, str], rng: np.random.Generator) -> dict:
        image = {**_SCENE_IMAGE, "colour": attrs["colour"], "shape": attrs["shape"]}
        _shapes._draw(image, image_size, rng).save(folder / f"{stem}.png", format="PNG")
        audio_file = _write_wav(folder, stem, attrs, rng, sample_rate)
        return {"file_name": f"{stem}.png", "audio_file": audio_file, "captions": describe_scene(attrs)}

    classes = [{"colour": c, "shape": s, **sound}
               for c, s in itertools.product(_shapes.ATTRIBUTES["colour"], _shapes.ATTRIBUTES["shape"])
               for sound in _sound_classes()]
    counts = {"train": n_train, "val": n_val, "test": n_test}
    return _write_dataset(root, counts, seed, classes, write_item)
