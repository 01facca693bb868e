"""Tests for the synthetic shapes dataset (captioner.demo.shapes)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioner.demo.shapes import (
    ATTRIBUTES,
    BACKGROUND_RGB,
    COLOUR_RGB,
    caption_attributes,
    describe,
    make_shapes_dataset,
)

COUNTS = {"train": 12, "val": 5, "test": 60}
SIZE = 64


def _read_metadata(folder: Path) -> list[dict]:
    lines = (folder / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def _image_attrs(records: list[dict]) -> list[dict[str, str]]:
    """Colour, shape and position of each image, recovered from (and agreed by) its captions."""
    out = []
    for rec in records:
        found = [caption_attributes(c) for c in rec["captions"]]
        core = {(f["colour"], f["shape"], f["position"]) for f in found}
        assert len(core) == 1, rec  # all captions of an image agree
        colour, shape, position = core.pop()
        sizes = {f["size"] for f in found if "size" in f}
        assert len(sizes) <= 1, rec
        attrs = {"colour": colour, "shape": shape, "position": position}
        if sizes:
            attrs["size"] = sizes.pop()
        out.append(attrs)
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    returned = make_shapes_dataset(
        root, n_train=COUNTS["train"], n_val=COUNTS["val"], n_test=COUNTS["test"],
        image_size=SIZE, seed=0,
    )
    assert Path(returned) == root
    return root


def _all_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_counts(dataset: Path) -> None:
    for split, n in COUNTS.items():
        folder = dataset / split
        pngs = sorted(p.name for p in folder.glob("*.png"))
        assert len(pngs) == n
        records = _read_metadata(folder)
        assert len(records) == n
        assert [r["file_name"] for r in records] == pngs
        assert pngs[0] == "00000.png"
        for rec in records:
            assert set(rec) == {"file_name", "captions"}
            assert (folder / rec["file_name"]).is_file()


def test_captions_state_colour_shape_position(dataset: Path) -> None:
    for split in COUNTS:
        for rec in _read_metadata(dataset / split):
            caps = rec["captions"]
            assert 3 <= len(caps) <= 5
            assert len(set(caps)) == len(caps)
            for cap in caps:
                assert cap == cap.lower() and cap == cap.strip() and not cap.endswith(".")
                found = caption_attributes(cap)
                for key in ("colour", "shape", "position"):
                    assert found.get(key) in ATTRIBUTES[key], (cap, key)
                    # exactly one value of the attribute is mentioned
                    assert sum(f" {v} " in f" {cap} " for v in ATTRIBUTES[key]) == 1, (cap, key)
            # the captions are exactly what describe() gives for those attributes
            (attrs,) = _image_attrs([rec])
            assert caps == describe(attrs)


def test_describe_mentions_every_attribute_value() -> None:
    for colour in ATTRIBUTES["colour"]:
        for shape in ATTRIBUTES["shape"]:
            for position in ATTRIBUTES["position"]:
                for size in ATTRIBUTES["size"]:
                    attrs = {"colour": colour, "shape": shape, "size": size, "position": position}
                    caps = describe(attrs)
                    assert 3 <= len(caps) <= 5
                    for cap in caps:
                        assert colour in cap and shape in cap and position in cap
                    assert any(size in cap for cap in caps)
    with pytest.raises(ValueError):
        describe({"colour": "purple", "shape": "circle", "position": "center"})
    with pytest.raises(ValueError):
        describe({"colour": "red", "shape": "circle"})


def test_images_open_at_right_size(dataset: Path) -> None:
    for split in COUNTS:
        for png in (dataset / split).glob("*.png"):
            with Image.open(png) as img:
                assert img.format == "PNG"
                assert img.size == (SIZE, SIZE)
                assert img.mode == "RGB"


def test_images_match_their_captions(dataset: Path) -> None:
    """The drawn shape has the captioned colour, lies at the captioned position and size."""
    folder = dataset / "test"
    records = _read_metadata(folder)
    palette = {name: np.array(rgb, dtype=float) for name, rgb in COLOUR_RGB.items()}
    areas: dict[str, list[int]] = {"small": [], "large": []}
    for rec, attrs in zip(records, _image_attrs(records)):
        px = np.asarray(Image.open(folder / rec["file_name"]).convert("RGB"), dtype=float)
        mask = np.abs(px - np.array(BACKGROUND_RGB, dtype=float)).sum(axis=2) > 90
        assert mask.sum() > 20, rec
        mean = px[mask].mean(axis=0)
        nearest = min(palette, key=lambda name: np.abs(palette[name] - mean).sum())
        assert nearest == attrs["colour"], rec
        ys, xs = np.nonzero(mask)
        cx, cy = xs.mean() / SIZE, ys.mean() / SIZE
        pos = attrs["position"]
        if pos == "center":
            assert 0.35 < cx < 0.65 and 0.35 < cy < 0.65, rec
        else:
            assert (cy < 0.5) == pos.startswith("top"), rec
            assert (cx < 0.5) == pos.endswith("left"), rec
        areas[attrs["size"]].append(int(mask.sum()))
    assert max(areas["small"]) < min(areas["large"])


def test_test_split_covers_combinations(dataset: Path) -> None:
    attrs = _image_attrs(_read_metadata(dataset / "test"))
    combos = {(a["colour"], a["shape"], a["position"]) for a in attrs}
    n_expected = len(ATTRIBUTES["colour"]) * len(ATTRIBUTES["shape"]) * len(ATTRIBUTES["position"])
    assert len(combos) == n_expected == COUNTS["test"]
    assert {a["size"] for a in attrs} == set(ATTRIBUTES["size"])


def test_full_combinations_with_two_blocks(tmp_path: Path) -> None:
    root = make_shapes_dataset(tmp_path, n_train=0, n_val=0, n_test=120, image_size=16)
    attrs = _image_attrs(_read_metadata(root / "test"))
    full = {(a["colour"], a["shape"], a["size"], a["position"]) for a in attrs}
    assert len(full) == 120
    assert _read_metadata(root / "train") == []


def test_deterministic_for_seed(tmp_path: Path) -> None:
    kwargs = dict(n_train=6, n_val=3, n_test=4, image_size=32)
    a = _all_bytes(make_shapes_dataset(tmp_path / "a", seed=3, **kwargs))
    b = _all_bytes(make_shapes_dataset(tmp_path / "b", seed=3, **kwargs))
    c = _all_bytes(make_shapes_dataset(tmp_path / "c", seed=4, **kwargs))
    assert len(a) == 6 + 3 + 4 + 3
    assert a == b
    assert a.keys() == c.keys()
    assert any(a[k] != c[k] for k in a if k.endswith(".png"))


def test_images_are_not_identical(dataset: Path) -> None:
    blobs = [p.read_bytes() for p in (dataset / "train").glob("*.png")]
    assert len(set(blobs)) == len(blobs)


def test_rerun_removes_stale_files(tmp_path: Path) -> None:
    make_shapes_dataset(tmp_path, n_train=5, n_val=1, n_test=1, image_size=16)
    (tmp_path / "train" / "notes.txt").write_text("keep me")
    make_shapes_dataset(tmp_path, n_train=2, n_val=1, n_test=1, image_size=16)
    assert sorted(p.name for p in (tmp_path / "train").glob("*.png")) == ["00000.png", "00001.png"]
    assert (tmp_path / "train" / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("kwargs", [{"n_train": -1}, {"image_size": 4}, {"n_val": 1.5}])
def test_rejects_bad_arguments(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        make_shapes_dataset(tmp_path, **kwargs)
