"""Offline demo dataset: one coloured shape per image, with several reference captions.

`make_shapes_dataset` writes a tiny synthetic captioning dataset in the Hugging Face
"imagefolder" layout so the whole pipeline (training, decoding, evaluation, reports) can
be exercised without downloading anything::

    root/
      train/00000.png ... metadata.jsonl
      val/...
      test/...

Each `metadata.jsonl` line is ``{"file_name": "00012.png", "captions": [...]}`` with
``file_name`` relative to its split folder.

Every image holds a single shape described by four attributes (see `ATTRIBUTES`):
colour, shape, size and position. Images are drawn on a plain light background with a
little pixel noise, a small colour jitter and a small random offset of the position, so
no two images are identical. Captions come from `describe`: every caption names the
colour, the shape and the position; some also name the size.

Attribute combinations are enumerated in balanced blocks rather than sampled
independently: any 60 consecutive images of a split contain every
colour x shape x position combination once, and any 120 contain every full combination
(size included). With the default ``n_test=60`` the test split therefore covers every
colour/shape/position combination. Each split uses its own random stream derived from
``seed``, so changing ``n_train`` does not change the test images. Output is
byte-for-byte deterministic for a given set of arguments.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
from pathlib import Path
from typing import Mapping

import numpy as np
from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

__all__ = [
    "ATTRIBUTES",
    "COLOUR_RGB",
    "BACKGROUND_RGB",
    "SPLITS",
    "describe",
    "caption_attributes",
    "make_shapes_dataset",
]

ATTRIBUTES: dict[str, list[str]] = {
    "colour": ["red", "green", "blue", "yellow"],
    "shape": ["circle", "square", "triangle"],
    "size": ["small", "large"],
    "position": ["top left", "top right", "bottom left", "bottom right", "center"],
}
"""Attribute name -> possible values. Values appear verbatim in the captions."""

COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (45, 80, 215),
    "yellow": (220, 185, 0),
}
"""Nominal RGB of each colour; drawn colours are jittered a little around these."""

BACKGROUND_RGB: tuple[int, int, int] = (240, 240, 236)
"""Nominal background colour (a light grey); jittered per image and noised per pixel."""

SPLITS: tuple[str, ...] = ("train", "val", "test")

# Shape centre as a fraction of the image side, (x, y) with y pointing down.
_POSITION_XY: dict[str, tuple[float, float]] = {
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
    "center": (0.5, 0.5),
}
# Shape "radius" (half extent) as a fraction of the image side.
_SIZE_RADIUS: dict[str, float] = {"small": 0.10, "large": 0.18}
_POSITION_JITTER = 0.04  # max offset of the centre, fraction of the image side
_COLOUR_JITTER = 15  # max per-channel offset of the shape colour
_BACKGROUND_JITTER = 8  # max per-channel offset of the background colour
_PIXEL_NOISE = 6  # max per-pixel, per-channel noise
_MIN_IMAGE_SIZE = 16

_REQUIRED = ("colour", "shape", "position")


def _check_attrs(attrs: Mapping[str, str]) -> None:
    for key in _REQUIRED:
        if key not in attrs:
            raise ValueError(f"attribute {key!r} is required, got {dict(attrs)!r}")
    for key, value in attrs.items():
        if key not in ATTRIBUTES:
            raise ValueError(f"unknown attribute {key!r}; expected one of {sorted(ATTRIBUTES)}")
        if value not in ATTRIBUTES[key]:
            raise ValueError(f"unknown {key} {value!r}; expected one of {ATTRIBUTES[key]}")


def describe(attrs: Mapping[str, str]) -> list[str]:
    """Reference captions for one image: five lowercase captions, no trailing period.

    ``attrs`` maps ``"colour"``, ``"shape"``, ``"position"`` and optionally ``"size"`` to
    values from `ATTRIBUTES`. Every caption states colour, shape and position (the position
    value verbatim, e.g. ``"top left"``); two of them also state the size when given.
    The result is deterministic and its captions are distinct.

    >>> describe({"colour": "red", "shape": "circle", "size": "large", "position": "top left"})[:2]
    ['a red circle in the top left', 'a large red circle at the top left of the image']
    """
    _check_attrs(attrs)
    colour, shape, pos = attrs["colour"], attrs["shape"], attrs["position"]
    size = attrs.get("size")
    sized = f"{size} {colour} {shape}" if size else f"{colour} {shape}"
    corner = f"the {pos} corner" if pos != "center" else "the center"
    captions = [
        f"a {colour} {shape} in the {pos}",
        f"a {sized} at the {pos} of the image",
        f"there is a {colour} {shape} in {corner}",
        f"a {sized} in the {pos}" if size else f"a {colour} {shape} at the {pos}",
        f"an image of a {colour} {shape} at the {pos}",
    ]
    return captions


def caption_attributes(caption: str) -> dict[str, str]:
    """Attribute values mentioned in ``caption`` (whole-word matches), e.g. for checking.

    Returns ``{attribute: value}`` for each attribute with exactly one value mentioned;
    attributes with no or several matching values are left out.
    """
    found: dict[str, str] = {}
    for key, values in ATTRIBUTES.items():
        hits = [v for v in values if re.search(rf"\b{re.escape(v)}\b", caption)]
        if len(hits) == 1:
            found[key] = hits[0]
    return found


def _combinations() -> list[tuple[str, str, str]]:
    """All colour x shape x position combinations, in a fixed order."""
    return list(
        itertools.product(ATTRIBUTES["colour"], ATTRIBUTES["shape"], ATTRIBUTES["position"])
    )


def _split_attributes(n: int, rng: np.random.Generator) -> list[dict[str, str]]:
    """``n`` attribute dicts in balanced, shuffled blocks (see the module docstring)."""
    combos = _combinations()
    sizes = ATTRIBUTES["size"]
    out: list[dict[str, str]] = []
    block = 0
    while len(out) < n:
        # Block b gives combination j the size sizes[(j + b) % 2]: two consecutive blocks
        # hold every (colour, shape, size, position) once; each block holds both sizes.
        rows = [
            {"colour": c, "shape": s, "size": sizes[(j + block) % len(sizes)], "position": p}
            for j, (c, s, p) in enumerate(combos)
        ]
        order = rng.permutation(len(rows))
        out.extend(rows[i] for i in order)
        block += 1
    return out[:n]


def _draw(attrs: Mapping[str, str], image_size: int, rng: np.random.Generator) -> Image.Image:
    """Render one image for ``attrs``, using ``rng`` for jitter and noise."""
    side = image_size
    bg = np.array(BACKGROUND_RGB, dtype=np.int16) + rng.integers(
        -_BACKGROUND_JITTER, _BACKGROUND_JITTER + 1, size=3
    )
    colour = np.array(COLOUR_RGB[attrs["colour"]], dtype=np.int16) + rng.integers(
        -_COLOUR_JITTER, _COLOUR_JITTER + 1, size=3
    )
    fx, fy = _POSITION_XY[attrs["position"]]
    dx, dy = rng.uniform(-_POSITION_JITTER, _POSITION_JITTER, size=2)
    radius = _SIZE_RADIUS[attrs["size"]] * side
    cx, cy = (fx + dx) * side, (fy + dy) * side
    # Keep the whole shape inside the image.
    cx = float(np.clip(cx, radius + 1, side - radius - 2))
    cy = float(np.clip(cy, radius + 1, side - radius - 2))

    img = Image.new("RGB", (side, side), tuple(int(v) for v in np.clip(bg, 0, 255)))
    draw = ImageDraw.Draw(img)
    fill = tuple(int(v) for v in np.clip(colour, 0, 255))
    shape = attrs["shape"]
    if shape == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
    elif shape == "square":
        half = radius * 0.85  # roughly the same area as the circle
        draw.rectangle([cx - half, cy - half, cx + half, cy + half], fill=fill)
    elif shape == "triangle":
        # Pointing up; (cx, cy) lies inside it.
        draw.polygon(
            [(cx, cy - radius), (cx + radius, cy + radius * 0.85), (cx - radius, cy + radius * 0.85)],
            fill=fill,
        )
    else:  # pragma: no cover - guarded by _check_attrs
        raise ValueError(f"unknown shape {shape!r}")

    pixels = np.asarray(img, dtype=np.int16)
    noise = rng.integers(-_PIXEL_NOISE, _PIXEL_NOISE + 1, size=pixels.shape, dtype=np.int16)
    return Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8), mode="RGB")


def _check_count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def _clear_split(folder: Path) -> None:
    """Remove files a previous run may have left (numbered PNGs and metadata) in ``folder``."""
    for old in folder.iterdir():
        if old.is_file() and (old.name == "metadata.jsonl" or re.fullmatch(r"\d+\.png", old.name)):
            old.unlink()


def make_shapes_dataset(
    root: str | Path,
    *,
    n_train: int = 600,
    n_val: int = 60,
    n_test: int = 60,
    image_size: int = 64,
    seed: int = 0,
) -> Path:
    """Write the shapes dataset under ``root`` (``train/``, ``val/``, ``test/``); return ``root``.

    Each split folder gets ``n_*`` PNG images of ``image_size`` x ``image_size`` pixels,
    named ``00000.png``, ``00001.png``, ... and a ``metadata.jsonl`` with one line per
    image, ``{"file_name": ..., "captions": describe(attrs)}``. Numbered PNGs and
    ``metadata.jsonl`` left in a split folder by an earlier run are removed first; other
    files are left alone. The same arguments always produce the same bytes.
    """
    counts = {
        "train": _check_count("n_train", n_train),
        "val": _check_count("n_val", n_val),
        "test": _check_count("n_test", n_test),
    }
    image_size = _check_count("image_size", image_size)
    if image_size < _MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {_MIN_IMAGE_SIZE}, got {image_size}")
    seed = _check_count("seed", seed)

    root = Path(root)
    for split_index, split in enumerate(SPLITS):
        n = counts[split]
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        _clear_split(folder)
        # One independent stream per split, so split sizes do not affect each other.
        rng = np.random.default_rng(np.random.SeedSequence([seed, split_index]))
        width = max(5, len(str(max(n - 1, 0))))
        lines = []
        for i, attrs in enumerate(_split_attributes(n, rng)):
            file_name = f"{i:0{width}d}.png"
            _draw(attrs, image_size, rng).save(folder / file_name, format="PNG")
            lines.append(json.dumps({"file_name": file_name, "captions": describe(attrs)}))
        (folder / "metadata.jsonl").write_text(
            "".join(line + "\n" for line in lines), encoding="utf-8"
        )
        logger.info("wrote %d %s images to %s", n, split, folder)
    return root
