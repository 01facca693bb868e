"""Column names: every list of candidate column names the project auto-detects, in one place.

When a table or dataset names no column, the first candidate present is used. The same image-path
names work in every command that reads a table of inputs: caption sets (CSV/TSV/JSONL, imagefolder
metadata, Hugging Face datasets), input tables (`captioner caption --table`), shard tables (CSV/TSV and
parquet for sharded captioning) and prediction files (as the image id).
"""

from __future__ import annotations

from typing import Iterable, Sequence

# A column holding an image's path, in order of preference.
IMAGE_COLUMNS = ("image", "file_name", "image_path", "path", "filepath", "filename", "file", "img")
# Path columns that name the sound as often as the image: next to an audio column they are not images.
GENERIC_PATH_COLUMNS = ("file_name", "path", "filepath", "filename", "file")
AUDIO_COLUMNS = ("audio", "audio_file", "audio_path")
# "caption" and "captions" are one concept: when both are there, both are read (with a warning);
# "text" only when neither is.
CAPTION_COLUMNS = ("caption", "captions", "text")
MERGED_CAPTION_COLUMNS = ("caption", "captions")
# Item ids of caption sets and Hugging Face datasets (first present, not an image/audio/caption column).
ID_COLUMNS = ("image_id", "id")
# Caption tables also take an id column as the image path when no path column is there (old tables).
TABLE_IMAGE_COLUMNS = (*IMAGE_COLUMNS, *ID_COLUMNS)
# Prediction files: the image id, else the image (or sound) path that `captioner caption` writes.
PREDICTION_ID_COLUMNS = (*ID_COLUMNS, *IMAGE_COLUMNS, *AUDIO_COLUMNS)
# Imagefolder metadata.jsonl (Hugging Face's layout): fixed names.
IMAGEFOLDER_IMAGE_COLUMNS = ("file_name",)
IMAGEFOLDER_AUDIO_COLUMNS = ("audio_file",)
IMAGEFOLDER_CAPTION_COLUMNS = ("captions", "caption")
# Shard tables: the item key (img2dataset writes "key"; WebDataset "__key__").
KEY_COLUMNS = ("key", "__key__", *ID_COLUMNS)
# Parquet columns holding encoded image bytes (or a {bytes, path} struct), tried before path columns.
PARQUET_BYTES_COLUMNS = ("image", "jpg", "png", "bytes", "image_bytes")


def first_present(present: Iterable[str], candidates: Sequence[str]) -> str | None:
    """The first of `candidates` in `present`, or None."""
    present = set(present)
    return next((c for c in candidates if c in present), None)


def image_candidates(candidates: Sequence[str], has_audio: bool) -> tuple[str, ...]:
    """Image-column candidates: next to an audio column, auto-detection skips generic path columns
    and id columns (they name the sound or the item as often as an image)."""
    if not has_audio or len(candidates) <= 1:  # a named column is taken as named
        return tuple(candidates)
    return tuple(c for c in candidates if c not in GENERIC_PATH_COLUMNS and c not in ID_COLUMNS)


def caption_keys(present: Iterable[str], candidates: Sequence[str]) -> list[str]:
    """The caption columns to read among `present`: every one of `MERGED_CAPTION_COLUMNS` there, else the
    first candidate there (none: [])."""
    present = set(present)
    found = [c for c in candidates if c in present]
    return [c for c in MERGED_CAPTION_COLUMNS if c in found] or found[:1]
