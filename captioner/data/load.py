"""Loading a caption set or references by path: `load_caption_set` (training, evaluation) and
`load_references` (scoring) pick the reader for a directory, JSON, CSV, table or `datasets` dataset.
"""

from __future__ import annotations

from pathlib import Path

from captioner.data.audio_sets import audio_csv_reader
from captioner.data.caption_tables import read_caption_table
from captioner.data.coco import coco_from_data, json_kind, karpathy_from_data
from captioner.data.examples import CaptionExample, ReadReport
from captioner.data.folders import imagefolder_table, metadata_file, read_imagefolder
from captioner.data.hf import HF_PREFIX, is_saved_hf_dataset, read_hf_dataset
from captioner.data.tables import TABLE_SUFFIXES, load_json
from captioner.errors import DataError

_REFERENCE_FORMATS = ("COCO captions JSON ('images' + 'annotations'), Karpathy split JSON ('images' with "
                      "'sentences'), an imagefolder directory (metadata.jsonl/.csv/.parquet, optionally in a split "
                      "folder), "
                      "a Clotho or AudioCaps captions .csv, or a .csv/.tsv/.jsonl table with image and/or audio "
                      "and caption columns")
_CAPTION_SET_FORMATS = ("an imagefolder directory (metadata.jsonl/.csv/.parquet), a COCO captions or Karpathy "
                        "split .json, "
                        "a Clotho (file_name,caption_1,...) or AudioCaps (audiocap_id,youtube_id,start_time,"
                        "caption) .csv, a .csv/.tsv/.jsonl table with image and/or audio columns, or a "
                        "`datasets` dataset with images (a save_to_disk directory, a .parquet/.arrow file, or "
                        "hf:OWNER/NAME)")


def load_caption_set(spec: str | Path, split: str | None, *, strict: bool = False, image_column: str | None = None,
                     caption_column: str | None = None, image_root: str | Path | None = None,
                     cache_dir: str | Path | None = None, audio_root: str | Path | None = None,
                     audio_column: str | None = None, allow_outside_paths: bool = False
                     ) -> tuple[list[CaptionExample], ReadReport]:
    """A caption set for training or evaluation: a directory -> `read_imagefolder` (its `split` folder
    when that exists, else the directory itself); a .json -> `read_coco_captions` or `read_karpathy` by
    content (a COCO file is one split already: `split` only labels its examples); a .csv whose header is
    Clotho's or AudioCaps' -> `read_clotho` / `read_audiocaps` (one split already, like COCO); other
    .csv/.tsv/.jsonl -> `read_caption_table` (columns auto-detected unless named; `audio_column` names its
    audio column, here and for `datasets` datasets). `image_root` (COCO/Karpathy JSON and caption tables;
    default: the file's folder) is where image paths start (and must stay inside); `audio_root` (Clotho/AudioCaps only; default: the CSV's folder) is
    where audio files are. Images and audio files must exist.

    `read_hf_dataset` (a `datasets` dataset with images and/or audio; `cache_dir` is where images and sounds
    that are not files go) reads "hf:owner/name" hub names, directories written by `save_to_disk`,
    .parquet/.arrow files, and directories without metadata.jsonl when an image, audio or caption column is
    named; `allow_outside_paths` lets its cells name files outside the dataset's folder.

    Rows naming one item (same id) are one example with the captions of all of them, in every format."""
    path = Path(spec)
    audio_reader = audio_csv_reader(path)
    if image_root is not None and (str(spec).startswith(HF_PREFIX) or path.is_dir() or audio_reader is not None
                                   or path.suffix.lower() not in (".json", *TABLE_SUFFIXES)):
        raise DataError(f"{path}: an image root applies only to COCO/Karpathy JSON files and caption tables "
                        "(image paths of an imagefolder are relative to its own folder)")
    if audio_root is not None and audio_reader is None:
        raise DataError(f"{path}: an audio root applies only to Clotho and AudioCaps CSV files (audio paths of an "
                        "imagefolder or a table are relative to its own folder)")
    named = image_column or caption_column or audio_column
    if str(spec).startswith(HF_PREFIX) or is_saved_hf_dataset(path) or (
            path.is_file() and path.suffix.lower() in (".parquet", ".arrow")) or (
            path.is_dir() and named and not (path / "metadata.jsonl").is_file()
            and not (split and (path / split / "metadata.jsonl").is_file())):
        return read_hf_dataset(str(spec), split, image_column=image_column, caption_column=caption_column,
                               strict=strict, cache_dir=cache_dir, audio_column=audio_column,
                               allow_outside_paths=allow_outside_paths)
    if audio_column is not None and (audio_reader is not None or path.suffix.lower() not in TABLE_SUFFIXES):
        raise DataError(f"{path}: an audio column applies only to .csv/.tsv/.jsonl caption tables and `datasets` "
                        "datasets (Clotho and AudioCaps CSVs have their own layout)")
    if path.is_dir():
        return read_imagefolder(path, split if split and (path / split).is_dir() else None, strict=strict)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    ext = path.suffix.lower()
    if ext == ".json":
        data = load_json(path)
        kind = json_kind(data)
        if kind == "karpathy":
            return karpathy_from_data(data, path, image_root, split or "test", strict=strict, require_images=True)
        if kind != "coco":
            raise DataError(f"{path}: neither a COCO captions file nor a Karpathy split file; accepted caption "
                            f"sets: {_CAPTION_SET_FORMATS}")
        examples, report = coco_from_data(data, path, image_root, strict=strict, require_images=True)
    elif audio_reader is not None:
        examples, report = audio_reader(path, audio_root, strict=strict)
    elif ext in TABLE_SUFFIXES:
        examples, report = read_caption_table(path, image_column=image_column, caption_column=caption_column,
                                              audio_column=audio_column, strict=strict, image_root=image_root)
    else:
        raise DataError(f"{path}: unknown caption-set format; accepted caption sets: {_CAPTION_SET_FORMATS}")
    if split:
        for ex in examples:
            ex.split = split
    return examples, report

def load_references(path: str | Path, *, split: str = "test") -> dict[str, list[str]]:
    """Reference captions for scoring, {item id: [captions]}, from any of: a COCO captions JSON (has
    'annotations'), a Karpathy split JSON (its `split`), an imagefolder directory (path/split/metadata.jsonl,
    else path/metadata.jsonl; or metadata.csv/.parquet; image and/or audio rows), a Clotho or AudioCaps
    captions CSV (by its header; one split already) or a .csv/.tsv/.jsonl table (columns auto-detected). Image and audio files need not
    exist. Problem rows are logged and skipped; an unknown format is a DataError listing the accepted ones."""
    path = Path(path)
    audio_reader = audio_csv_reader(path)
    if path.is_dir():
        if metadata_file(path / split) is not None:
            examples, _ = imagefolder_table(path / split, split, strict=False, require_files=False)
        elif metadata_file(path) is not None:
            examples, _ = imagefolder_table(path, None, strict=False, require_files=False)
        else:
            raise DataError(f"{path}: directory holds no metadata.jsonl/.csv/.parquet (nor in {split}/); "
                            f"accepted reference formats: {_REFERENCE_FORMATS}")
    elif not path.exists():
        raise DataError(f"{path}: no such file or directory")
    elif audio_reader is not None:
        examples, _ = audio_reader(path, require_files=False)
    elif path.suffix.lower() in TABLE_SUFFIXES:
        examples, _ = read_caption_table(path, image_column=None, caption_column=None, require_images=False)
    elif path.suffix.lower() == ".json":
        data = load_json(path)
        kind = json_kind(data)
        if kind == "coco":
            examples, _ = coco_from_data(data, path, None, strict=False, require_images=False)
        elif kind == "karpathy":
            examples, _ = karpathy_from_data(data, path, None, split, strict=False, require_images=False)
        else:
            hint = " (a list: predictions in COCO results format?)" if isinstance(data, list) else ""
            raise DataError(f"{path}: not a reference file{hint}; accepted reference formats: {_REFERENCE_FORMATS}")
    else:
        raise DataError(f"{path}: unknown reference format; accepted reference formats: {_REFERENCE_FORMATS}")
    return {ex.image_id: ex.captions for ex in examples}

