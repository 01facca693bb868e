"""COCO captions JSON (`read_coco_captions`) and Karpathy split JSON (`read_karpathy`) caption sets.

Both are whole JSON documents, so problems are reported as "FILE: images[3]: reason".
"""

from __future__ import annotations

import os
from pathlib import Path

from captioner.data.examples import (CaptionExample, ReadReport, Reporter, check_file, clean_captions, finish,
                                     is_id)
from captioner.data.tables import load_json
from captioner.errors import DataError

KARPATHY_SPLITS = ("train", "restval", "val", "test", "train+restval")


def json_kind(data) -> str | None:
    """'coco', 'karpathy' or None for a parsed JSON document."""
    if not isinstance(data, dict):
        return None
    if "annotations" in data:
        return "coco"
    images = data.get("images")
    if isinstance(images, list):
        return "karpathy" if any(isinstance(im, dict) and "sentences" in im for im in images) else "coco"
    return None


def read_coco_captions(annotation_file: str | Path, image_root: str | Path | None = None, *, strict: bool = False,
                       require_images: bool = True) -> tuple[list[CaptionExample], ReadReport]:
    """COCO captions JSON (captions_train2014.json, captions_val2017.json, ...):
    `{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}`. Captions are grouped per
    image in annotation order; image_id is str(id); the image path is image_root/file_name (default root:
    the JSON's folder). Annotations naming an unknown image id and images without captions are reported.
    Examples' split is the file's stem without 'captions_' (e.g. 'val2014')."""
    path = Path(annotation_file)
    return coco_from_data(load_json(path), path, image_root, strict=strict, require_images=require_images)


def coco_from_data(data, path: Path, image_root, *, strict: bool, require_images: bool
                    ) -> tuple[list[CaptionExample], ReadReport]:
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{path}: not a COCO captions file (needs an 'images' list and an 'annotations' list)")
    if not isinstance(data.get("annotations"), list):
        raise DataError(f"{path}: no 'annotations' list (an image-info file without captions?)")
    root = Path(image_root) if image_root is not None else path.parent
    report = ReadReport(source=str(path))
    bad = Reporter(report, strict)
    images: dict[str, tuple[int, str]] = {}  # id -> (index in 'images', file_name)
    rejected: set[str] = set()  # ids of reported image entries: their annotations are skipped silently
    for i, entry in enumerate(data["images"]):
        where = f"{path}: images[{i}]"
        image_id = entry.get("id") if isinstance(entry, dict) else None
        if not is_id(image_id) or not isinstance(entry.get("file_name"), str):
            bad(where, "entry needs an 'id' (integer or string) and a string 'file_name'")
            if is_id(image_id):
                rejected.add(str(image_id))
            continue
        key = str(image_id)
        if key in images:
            bad(where, f"duplicate image id {key!r} (first at images[{images[key][0]}])")
            continue
        images[key] = (i, entry["file_name"])
    captions: dict[str, list[str]] = {key: [] for key in images}
    for i, ann in enumerate(data["annotations"]):
        where = f"{path}: annotations[{i}]"
        if not isinstance(ann, dict) or not is_id(ann.get("image_id")) or "caption" not in ann:
            bad(where, "entry needs an 'image_id' (integer or string) and a 'caption'")
            continue
        key = str(ann["image_id"])
        if key not in captions:
            if key not in rejected:
                bad(where, f"image_id {key!r} is not in 'images'")
            continue
        caps, reason = clean_captions(ann["caption"], allow_list=False, note=lambda what: bad.note(where, what))
        if reason is not None:
            bad(where, reason)
            continue
        captions[key].extend(caps)
    split = path.stem.removeprefix("captions_")
    examples = []
    for key, (i, name) in images.items():
        where = f"{path}: images[{i}]"
        if not captions[key]:
            bad(where, f"image {key!r} has no captions")
            continue
        image, reason = check_file(root, name, must_exist=require_images)
        if reason is not None:
            bad(where, reason)
            continue
        examples.append(CaptionExample(image_id=key, image=image, captions=captions[key], split=split))
    return finish(report, examples, "no usable images")


def read_karpathy(split_file: str | Path, image_root: str | Path | None = None, split: str = "test", *,
                  strict: bool = False, require_images: bool = True) -> tuple[list[CaptionExample], ReadReport]:
    """Karpathy split JSON (dataset_coco.json, dataset_flickr8k.json, dataset_flickr30k.json):
    `{"images": [{"filepath"?, "filename", "split", "cocoid"? | "imgid", "sentences": [{"raw"}]}]}`.
    `split`: one of `KARPATHY_SPLITS`; "train+restval" takes both. image_id is str(cocoid) when present,
    else str(imgid); the image path is image_root[/filepath]/filename (default root: the JSON's folder).
    Each example's split is its entry's own split. Entries of other splits are skipped silently."""
    path = Path(split_file)
    if split not in KARPATHY_SPLITS:  # before reading a possibly large file
        raise DataError(f"{path}: unknown Karpathy split {split!r} (one of {', '.join(KARPATHY_SPLITS)})")
    return karpathy_from_data(load_json(path), path, image_root, split, strict=strict,
                               require_images=require_images)


def karpathy_from_data(data, path: Path, image_root, split: str, *, strict: bool, require_images: bool
                        ) -> tuple[list[CaptionExample], ReadReport]:
    if split not in KARPATHY_SPLITS:
        raise DataError(f"{path}: unknown Karpathy split {split!r} (one of {', '.join(KARPATHY_SPLITS)})")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{path}: not a Karpathy split file (needs an 'images' list)")
    wanted = {"train", "restval"} if split == "train+restval" else {split}
    root = Path(image_root) if image_root is not None else path.parent
    report = ReadReport(source=str(path))
    bad = Reporter(report, strict)
    seen: dict[str, int] = {}
    examples = []
    for i, entry in enumerate(data["images"]):
        where = f"{path}: images[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("split"), str):
            bad(where, "entry needs a string 'split'")
            continue
        if entry["split"] not in wanted:
            continue
        image_id = entry["cocoid"] if "cocoid" in entry else entry.get("imgid")
        if not is_id(image_id):
            bad(where, "entry needs a 'cocoid' or 'imgid' (integer or string)")
            continue
        filename, filepath = entry.get("filename"), entry.get("filepath", "")
        if not isinstance(filename, str) or not isinstance(filepath, str):
            bad(where, "entry needs a string 'filename' (and 'filepath', when present)")
            continue
        sentences = entry.get("sentences")
        if not isinstance(sentences, list) or not all(isinstance(s, dict) for s in sentences):
            bad(where, "'sentences' must be a list of objects")
            continue
        raws = []
        for s in sentences:
            raw = s.get("raw")
            if raw is None and isinstance(s.get("tokens"), list) and all(isinstance(t, str) for t in s["tokens"]):
                raw = " ".join(s["tokens"])
            raws.append(raw)
        caps, reason = clean_captions(raws, note=lambda what: bad.note(where, what))
        if reason is not None:
            bad(where, reason)
            continue
        key = str(image_id)
        if key in seen:
            bad(where, f"duplicate image id {key!r} (first at images[{seen[key]}])")
            continue
        image, reason = check_file(root, os.path.join(filepath, filename) if filepath else filename,
                                    must_exist=require_images)
        if reason is not None:
            bad(where, reason)
            continue
        seen[key] = i
        examples.append(CaptionExample(image_id=key, image=image, captions=caps, split=entry["split"]))
    return finish(report, examples, f"no usable images in split {split!r}")

