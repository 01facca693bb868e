"""Caption-set reading and image input: problems are reported with file and line, others kept."""

import json

import pytest
from PIL import Image

from captioner.data import DataError, ImageError, collect_images, load_image, read_imagefolder


def _folder(tmp_path, lines):
    split = tmp_path / "train"
    split.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8)).save(split / name)
    (tmp_path / "outside.png").write_bytes(b"")
    (split / "metadata.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return tmp_path


def test_imagefolder_reports_bad_rows_and_keeps_good(tmp_path):
    root = _folder(tmp_path, [
        json.dumps({"file_name": "a.png", "captions": ["a cat", "  a   small cat "]}).encode(),
        b"{broken json",
        json.dumps({"file_name": "missing.png", "captions": ["x"]}).encode(),
        json.dumps({"file_name": "../outside.png", "captions": ["x"]}).encode(),
        json.dumps({"file_name": "b.png", "captions": ["", " "]}).encode(),
        b'{"file_name": "b.png", "captions": ["caf\xe9"]}',
        json.dumps({"file_name": "b.png", "caption": "a dog"}).encode(),
    ])
    examples, report = read_imagefolder(root, "train")
    assert [(e.image_id, e.captions) for e in examples] == [("train/a", ["a cat", "a small cat"]),
                                                           ("train/b", ["a dog"])]
    meta = str(root / "train" / "metadata.jsonl")
    assert [p.split(": ", 1)[0] for p in report.problems] == [f"{meta}:{n}" for n in (2, 3, 4, 5, 6)]
    assert "invalid JSON" in report.problems[0] and "not found" in report.problems[1]
    assert "escapes" in report.problems[2] and "no non-empty caption" in report.problems[3]
    assert "UTF-8" in report.problems[4]
    with pytest.raises(DataError, match=":2: invalid JSON"):
        read_imagefolder(root, "train", strict=True)


def test_missing_metadata_is_an_error(tmp_path):
    with pytest.raises(DataError, match="metadata.jsonl: missing"):
        read_imagefolder(tmp_path, "val")


def test_collect_images_and_load_errors(tmp_path):
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "sub" / "x.jpg")
    Image.new("L", (8, 8)).save(tmp_path / "g.png")
    (tmp_path / "notes.txt").write_text("hi")
    paths, errors = collect_images([str(tmp_path), str(tmp_path / "*.png"), str(tmp_path / "*.gif")])
    assert paths == [str(tmp_path / "g.png"), str(tmp_path / "sub" / "x.jpg"), str(tmp_path / "g.png")]
    assert errors == [f"{tmp_path / '*.gif'}: pattern matches no file"]
    assert load_image(tmp_path / "g.png").mode == "RGB"  # grayscale converted
    with pytest.raises(ImageError, match="is a directory"):
        load_image(tmp_path / "sub")
    with pytest.raises(ImageError, match="not an image"):
        load_image(tmp_path / "notes.txt")
    (tmp_path / "link.png").symlink_to(tmp_path / "gone.png")
    with pytest.raises(ImageError, match="broken symlink"):
        load_image(tmp_path / "link.png")
    good = (tmp_path / "sub" / "x.jpg").read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(good[: len(good) // 2])
    with pytest.raises(ImageError, match="trunc.jpg: unreadable image"):
        load_image(tmp_path / "trunc.jpg")
