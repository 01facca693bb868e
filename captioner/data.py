"""Caption sets, image loading and input collection.

A caption set is a list of `CaptionExample` (image id, image path, reference captions). Readers report
problem rows with file and line, skip them and count them; `strict=True` makes them errors.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
MAX_CAPTION_CHARS = 1000  # longer captions are rejected as malformed rows


class DataError(ValueError):
    """A caption set or an input path is malformed; the message names the file (and line)."""


class ImageError(ValueError):
    """One image could not be read; the message names the file and the reason."""


@dataclass
class CaptionExample:
    image_id: str
    image: str  # path to the image file
    captions: list[str]
    split: str = "train"


@dataclass
class ReadReport:
    """What a reader skipped, with reasons."""

    source: str
    kept: int = 0
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return f"{self.source}: {self.kept} images kept, {len(self.problems)} rows skipped"


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open an image as RGB, or raise ImageError naming the file and the reason."""
    path = str(path)
    if os.path.isdir(path):
        raise ImageError(f"{path}: is a directory, not an image")
    if not os.path.exists(path):
        reason = "broken symlink" if os.path.islink(path) else "no such file"
        raise ImageError(f"{path}: {reason}")
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except PermissionError:
        raise ImageError(f"{path}: permission denied") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image (unrecognised format)") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"{path}: image too large ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{path}: unreadable image ({e})") from None


def collect_images(inputs: Sequence[str]) -> tuple[list[str], list[str]]:
    """Expand files, folders (recursively, image extensions only) and globs.
    Returns (paths, errors); an input that matches nothing is an error line."""
    paths, errors = [], []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(
                str(p) for p in Path(item).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
            )
            if not found:
                errors.append(f"{item}: folder holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            paths.extend(found)
        elif glob.has_magic(item):
            found = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
            if not found:
                errors.append(f"{item}: pattern matches no file")
            paths.extend(found)
        else:
            paths.append(item)  # files are checked when opened, so the error names the reason
    return paths, errors


def _inside(root: Path, path: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def read_imagefolder(root: str | Path, split: str | None = None, *, strict: bool = False
                     ) -> tuple[list[CaptionExample], ReadReport]:
    """HF imagefolder layout: `root[/split]/metadata.jsonl`, one JSON object per line with `file_name`
    and `captions` (a list) or `caption` (a string)."""
    folder = Path(root) / split if split else Path(root)
    meta = folder / "metadata.jsonl"
    if not meta.exists():
        raise DataError(f"{meta}: missing (an imagefolder caption set needs metadata.jsonl)")
    report = ReadReport(source=str(meta))
    examples: list[CaptionExample] = []

    def bad(lineno: int, reason: str) -> None:
        msg = f"{meta}:{lineno}: {reason}"
        if strict:
            raise DataError(msg)
        report.problems.append(msg)

    with open(meta, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                bad(lineno, "not valid UTF-8")
                continue
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                bad(lineno, f"invalid JSON ({e.msg})")
                continue
            if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
                bad(lineno, "row needs a string 'file_name'")
                continue
            caps = row.get("captions", row.get("caption"))
            caps = [caps] if isinstance(caps, str) else caps
            if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
                bad(lineno, "'captions' must be a list of strings")
                continue
            caps = [" ".join(c.split()) for c in caps if c.strip()]
            if not caps:
                bad(lineno, "no non-empty caption")
                continue
            if any(len(c) > MAX_CAPTION_CHARS for c in caps):
                bad(lineno, f"caption longer than {MAX_CAPTION_CHARS} characters")
                continue
            path = folder / row["file_name"]
            if Path(row["file_name"]).is_absolute() or not _inside(folder, path):
                bad(lineno, f"image path {row['file_name']!r} escapes the dataset folder")
                continue
            if not path.is_file():
                bad(lineno, f"image file {row['file_name']!r} not found")
                continue
            examples.append(CaptionExample(image_id=Path(row["file_name"]).stem if split is None
                                           else f"{split}/{Path(row['file_name']).stem}",
                                           image=str(path), captions=caps, split=split or "train"))
    report.kept = len(examples)
    if report.problems:
        for p in report.problems[:20]:
            logger.warning(p)
        logger.warning(report.summary())
    if not examples:
        raise DataError(f"{meta}: no usable rows ({len(report.problems)} skipped)")
    return examples, report


def caption_pairs(examples: Iterable[CaptionExample]) -> list[tuple[int, str]]:
    """(example index, caption) for every reference caption: one training pair each."""
    return [(i, c) for i, ex in enumerate(examples) for c in ex.captions]
