"""Tests for the generated sounds and scenes datasets (captioner.demo.sounds).

The physical checks measure pitch, spectrum and number of events in the written WAVs and
the colour and shape in the written PNGs, and compare them with what the captions say.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioner.inputs.audio import load_audio
from captioner.demo.shapes import ATTRIBUTES, COLOUR_RGB
from captioner.demo.sounds import (
    CLIP_SECONDS,
    SAMPLE_RATE,
    SOUND_ATTRIBUTES,
    describe_scene,
    describe_sound,
    make_scenes_dataset,
    make_sounds_dataset,
    scene_caption_attributes,
    sound_caption_attributes,
    split_scene_caption,
    synthesize,
)

SR = SAMPLE_RATE
N = int(CLIP_SECONDS * SR)
SOUND_CLASSES = [{"sound": s, "count": c} for s in SOUND_ATTRIBUTES["sound"] for c in SOUND_ATTRIBUTES["count"]]
SCENE_CLASSES = [{"colour": col, "shape": sh, **snd}
                 for col in ATTRIBUTES["colour"] for sh in ATTRIBUTES["shape"] for snd in SOUND_CLASSES]


def _read_metadata(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text(encoding="utf-8").splitlines()]


def _all_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _heard(x: np.ndarray) -> dict[str, str]:
    """Sound and count measured from samples (N,) at SR: spectrum for the sound, envelope for the count."""
    w = int(0.02 * SR)  # 20 ms smoothing: far shorter than the >= 150 ms gaps between events
    env = np.convolve(np.abs(x), np.ones(w) / w, mode="same")
    on = env > 0.3 * env.max()
    events = int(on[0]) + int(np.count_nonzero(on[1:] & ~on[:-1]))
    power = np.abs(np.fft.rfft(x)) ** 2 + 1e-20
    flatness = np.exp(np.log(power).mean()) / power.mean()  # ~0.56 for white noise, ~0 for a sine
    peak_hz = np.fft.rfftfreq(len(x), 1 / SR)[power.argmax()]
    if flatness > 0.3:
        sound = "noise burst"
        half = len(power) // 2
        assert 0.7 < power[:half].sum() / power[half:].sum() < 1.4  # white: as much energy low as high
    elif abs(peak_hz - 300) <= 0.055 * 300:
        sound = "low beep"
    elif abs(peak_hz - 2000) <= 0.055 * 2000:
        sound = "high beep"
    else:
        raise AssertionError(f"no beep near 300 or 2000 Hz: peak {peak_hz} Hz, flatness {flatness}")
    return {"sound": sound, "count": {1: "once", 2: "twice", 3: "three times"}.get(events, str(events))}


def _seen(path: Path) -> dict[str, str]:
    """Colour (nearest nominal RGB) and shape (how much of its bounding box it fills) of a scene image."""
    px = np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)
    shape_mask = np.abs(px - px[0, 0]).max(axis=2) > 40  # far from the background (the corner pixel)
    ys, xs = np.nonzero(shape_mask)
    fill = shape_mask.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))  # square ~1, circle ~pi/4, triangle ~1/2
    shape = "square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"
    mean = px[shape_mask].mean(axis=0)
    colour = min(COLOUR_RGB, key=lambda c: np.abs(mean - COLOUR_RGB[c]).sum())
    return {"colour": colour, "shape": shape}


@pytest.fixture(scope="module")
def sounds(tmp_path_factory) -> Path:
    return make_sounds_dataset(tmp_path_factory.mktemp("sounds"), n_train=4, n_val=2, n_test=18, seed=0)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    return make_scenes_dataset(tmp_path_factory.mktemp("scenes"), n_train=3, n_val=2, n_test=108, seed=0)


def test_sound_captions_parse_back_and_never_say_and() -> None:
    seen = set()
    for attrs in SOUND_CLASSES:
        caps = describe_sound(attrs)
        assert len(set(caps)) == len(caps) >= 3
        for cap in caps:
            assert re.fullmatch(r"[a-z]+( [a-z]+)*", cap) and "and" not in cap.split()
            assert sound_caption_attributes(cap) == attrs
            assert sound_caption_attributes("  " + cap.upper() + " ") == attrs
            seen.add(cap)
    assert len(seen) == 5 * len(SOUND_CLASSES)  # no phrasing is shared by two classes
    assert "a single low beep" in describe_sound({"sound": "low beep", "count": "once"})
    assert "two high beeps" in describe_sound({"sound": "high beep", "count": "twice"})
    for bad in ["a low beep", "a low beep four times", "a red circle and a low beep once", ""]:
        with pytest.raises(ValueError):
            sound_caption_attributes(bad)
    with pytest.raises(ValueError):
        describe_sound({"sound": "bark", "count": "once"})


def test_scene_captions_split_into_image_and_sound() -> None:
    attrs = {"colour": "red", "shape": "circle", "sound": "high beep", "count": "three times"}
    caps = describe_scene(attrs)
    assert "a red circle and three high beeps" in caps
    for cap in caps:
        assert cap.count(" and ") == 1
        image, sound = split_scene_caption(cap)
        assert image == "a red circle" and sound_caption_attributes(sound) == {"sound": "high beep",
                                                                              "count": "three times"}
        assert scene_caption_attributes(cap) == attrs
    for bad in ["a red circle", "a red circle and a low beep once and two high beeps"]:
        with pytest.raises(ValueError):
            split_scene_caption(bad)
    with pytest.raises(ValueError):
        scene_caption_attributes("a red star and a low beep once")
    with pytest.raises(ValueError):
        describe_scene({"colour": "purple", "shape": "circle", "sound": "low beep", "count": "once"})


def test_synthesize_is_deterministic_and_sized() -> None:
    attrs = {"sound": "high beep", "count": "three times"}
    a = synthesize(attrs, np.random.default_rng(5))
    assert a.dtype == np.float32 and a.shape == (N,)
    assert np.array_equal(a, synthesize(attrs, np.random.default_rng(5)))
    assert not np.array_equal(a, synthesize(attrs, np.random.default_rng(6)))
    assert 0.35 < np.abs(a).max() < 0.6
    # No clicks: a faded 300 Hz beep never jumps more than its slope allows (2 pi f / SR * peak ~ 0.07).
    low = synthesize({"sound": "low beep", "count": "three times"}, np.random.default_rng(5))
    assert np.abs(np.diff(low)).max() < 0.12
    assert synthesize(attrs, np.random.default_rng(5), sample_rate=8000, seconds=1.5).shape == (12000,)
    with pytest.raises(ValueError, match="too short"):
        synthesize(attrs, np.random.default_rng(5), seconds=1.45)
    assert synthesize(attrs, np.random.default_rng(5), seconds=1.5).shape == (24000,)


def test_synthesized_sounds_are_what_captions_say() -> None:
    # Many clips per class straight from synthesize: covers the jitter ranges, not one lucky draw.
    rng = np.random.default_rng(1)
    for attrs in SOUND_CLASSES:
        for _ in range(4):
            assert _heard(synthesize(attrs, rng)) == attrs


def test_sounds_layout_and_wavs_match_captions(sounds: Path) -> None:
    for split, n in {"train": 4, "val": 2, "test": 18}.items():
        folder = sounds / split
        rows = _read_metadata(folder)
        assert [r["audio_file"] for r in rows] == [f"{i:05d}.wav" for i in range(n)]
        assert sorted(p.name for p in folder.iterdir()) == sorted([r["audio_file"] for r in rows]
                                                                  + ["metadata.jsonl"])
        for row in rows:
            assert set(row) == {"audio_file", "captions"}
            x = load_audio(folder / row["audio_file"], sample_rate=SR)
            assert x.shape == (N,)
            for cap in row["captions"]:
                assert sound_caption_attributes(cap) == _heard(x)
    test_classes = [sound_caption_attributes(r["captions"][0]) for r in _read_metadata(sounds / "test")]
    for block in (test_classes[:9], test_classes[9:]):  # each block of 9 holds every class once
        assert sorted(block, key=str) == sorted(SOUND_CLASSES, key=str)


def test_scenes_balanced_and_match_captions(scenes: Path) -> None:
    folder = scenes / "test"
    rows = _read_metadata(folder)
    assert len(rows) == 108
    found = []
    for i, row in enumerate(rows):
        assert row == {"file_name": f"{i:05d}.png", "audio_file": f"{i:05d}.wav", "captions": row["captions"]}
        attrs = {k: v for a in map(scene_caption_attributes, row["captions"]) for k, v in a.items()}
        assert all(scene_caption_attributes(c) == attrs for c in row["captions"])  # captions agree
        heard = _heard(load_audio(folder / row["audio_file"], sample_rate=SR))
        assert heard == {"sound": attrs["sound"], "count": attrs["count"]}
        assert _seen(folder / row["file_name"]) == {"colour": attrs["colour"], "shape": attrs["shape"]}
        found.append(attrs)
    # Every colour x shape x sound x count once: image and sound vary independently.
    assert sorted(found, key=str) == sorted(SCENE_CLASSES, key=str)
    # Not sorted by class within the block: the split's RNG shuffled it.
    assert found != SCENE_CLASSES


def test_output_is_deterministic_and_splits_independent(tmp_path: Path) -> None:
    kwargs = {"n_train": 3, "n_val": 1, "n_test": 2, "seed": 3}
    a = _all_bytes(make_scenes_dataset(tmp_path / "a", **kwargs))
    b = _all_bytes(make_scenes_dataset(tmp_path / "b", **kwargs))
    assert a == b and len(a) == 3 * 1 + 2 * (3 + 1 + 2)
    other_seed = _all_bytes(make_scenes_dataset(tmp_path / "c", **{**kwargs, "seed": 4}))
    assert other_seed["test/00000.wav"] != a["test/00000.wav"]
    # A bigger train split leaves the test split unchanged (one RNG stream per split).
    bigger = _all_bytes(make_scenes_dataset(tmp_path / "d", **{**kwargs, "n_train": 5}))
    assert all(bigger[k] == a[k] for k in a if k.startswith("test/"))
    s1 = _all_bytes(make_sounds_dataset(tmp_path / "s1", n_train=2, n_val=1, n_test=1, seed=3))
    s2 = _all_bytes(make_sounds_dataset(tmp_path / "s2", n_train=2, n_val=1, n_test=1, seed=3))
    assert s1 == s2


def test_rewrite_clears_old_items(tmp_path: Path) -> None:
    make_scenes_dataset(tmp_path, n_train=4, n_val=1, n_test=1)
    (tmp_path / "train" / "notes.txt").write_text("keep me")
    make_sounds_dataset(tmp_path, n_train=2, n_val=1, n_test=1)
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == [
        "00000.wav", "00001.wav", "metadata.jsonl", "notes.txt"]


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        make_sounds_dataset(tmp_path, n_train=-1)
    with pytest.raises(ValueError):
        make_sounds_dataset(tmp_path, sample_rate=4000)
    with pytest.raises(ValueError):
        make_scenes_dataset(tmp_path, image_size=8)
