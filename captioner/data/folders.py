"""Folders: the one folder walker and the file extensions it looks for, input collection for captioning
(`collect_images`, `collect_audio`), and HF imagefolder caption sets (`read_imagefolder`, `metadata_file`).
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Sequence

from captioner.data.caption_tables import read_rows
from captioner.data.columns import IMAGEFOLDER_AUDIO_COLUMNS, IMAGEFOLDER_CAPTION_COLUMNS, IMAGEFOLDER_IMAGE_COLUMNS
from captioner.data.examples import CaptionExample, ReadReport
from captioner.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif", ".au")


def _is_junk(name: str) -> bool:
    # hidden files and macOS debris: "._photo.jpg" (AppleDouble) has an image extension but is no image
    return name.startswith(".") or name == "__MACOSX"


def walk_files(folder: str | os.PathLike, extensions: Sequence[str]) -> list[str]:
    """Files under `folder` (recursively, symlinked folders not followed) whose extension is one of
    `extensions` (any case), hidden files and folders and `__MACOSX` left out, sorted by path."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not _is_junk(d)]
        found.extend(os.path.join(root, f) for f in files if not _is_junk(f) and f.lower().endswith(tuple(extensions)))
    return sorted(found)


def collect_images(inputs: Sequence[str]) -> tuple[list[str], list[str]]:
    """Expand files, folders (recursively, image extensions only) and globs.
    Returns (paths, errors); an input that matches nothing is an error line."""
    return _collect(inputs, IMAGE_EXTENSIONS, "images")


def collect_audio(inputs: Sequence[str]) -> tuple[list[str], list[str]]:
    """`collect_images` for sound files: folders yield files with `AUDIO_EXTENSIONS`."""
    return _collect(inputs, AUDIO_EXTENSIONS, "audio files")


def _collect(inputs: Sequence[str], extensions: Sequence[str], what: str) -> tuple[list[str], list[str]]:
    paths, errors = [], []
    for item in inputs:
        if os.path.isdir(item):
            found = [p for p in walk_files(item, extensions) if os.path.isfile(p)]
            if not found:
                errors.append(f"{item}: folder holds no {what} ({', '.join(extensions)})")
            paths.extend(found)
        elif glob.has_magic(item):
            found = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
            if not found:
                errors.append(f"{item}: pattern matches no file")
            paths.extend(found)
        else:
            paths.append(item)  # files are checked when opened, so the error names the reason
    return paths, errors


# Hugging Face imagefolder metadata file names, in the order they are looked for (datasets reads all three).
METADATA_NAMES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")


def metadata_file(folder: str | Path) -> Path | None:
    """The imagefolder metadata file in `folder` (one of `METADATA_NAMES`), None when there is none; two of
    them is a DataError (which one holds the captions would be a guess)."""
    found = [Path(folder) / name for name in METADATA_NAMES if (Path(folder) / name).is_file()]
    if len(found) > 1:
        raise DataError(f"{folder}: holds {' and '.join(p.name for p in found)}; keep one metadata file")
    return found[0] if found else None


def read_imagefolder(root: str | Path, split: str | None = None, *, strict: bool = False
                     ) -> tuple[list[CaptionExample], ReadReport]:
    """HF imagefolder layout: `root[/split]/metadata.jsonl` (or `metadata.csv`, or `metadata.parquet`), one row
    per object with `file_name` (an image), `audio_file` (a sound) or both, and `captions` (a list; in a CSV
    one caption) and/or `caption` (a string). Paths are relative to the metadata's folder and must stay
    inside it. The id is the stem of `file_name`, else of `audio_file`, prefixed with "split/" when a split
    is given. Rows naming one file are one example (their captions merged: a CSV has one row per caption)."""
    folder = Path(root) / split if split else Path(root)
    if metadata_file(folder) is None:
        raise DataError(f"{folder / 'metadata.jsonl'}: missing (an imagefolder caption set needs metadata.jsonl, "
                        "metadata.csv or metadata.parquet)")
    return imagefolder_table(folder, split, strict=strict, require_files=True)


def imagefolder_table(folder: Path, split: str | None, *, strict: bool, require_files: bool
                      ) -> tuple[list[CaptionExample], ReadReport]:
    """`folder`'s metadata file (`metadata_file`) as `read_imagefolder` reads it: ids 'split/stem' (or 'stem'
    without a split) of `file_name`, else of `audio_file`."""
    meta = metadata_file(folder)
    if meta is None:
        raise DataError(f"{folder}: holds no {', '.join(METADATA_NAMES)}")
    return read_rows(meta, image_columns=IMAGEFOLDER_IMAGE_COLUMNS,
                     audio_columns=IMAGEFOLDER_AUDIO_COLUMNS, caption_columns=IMAGEFOLDER_CAPTION_COLUMNS,
                     strict=strict, require_images=require_files, split=split or "train",
                     image_id=lambda name: f"{split}/{Path(name).stem}" if split else Path(name).stem)
