"""Rows that look alike: duplicate rows of one item merge the same way in train/eval/score readers;
invisible and control characters in captions are cleaned; long names are refused fast with short
messages."""

import json
import time

import pytest
from PIL import Image

from captioner.data import (MAX_PATH_BYTES, DataError, load_caption_set, load_references, read_caption_table,
                            read_imagefolder, read_input_table, read_predictions)


def _images(folder, *names):
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(path)


def _metadata(folder, rows):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


@pytest.mark.parametrize("fmt", ["imagefolder", "csv"])
def test_duplicate_rows_of_one_item_merge_their_references_everywhere(tmp_path, fmt):
    # eval (load_caption_set) and score (load_references) see one item with every row's captions
    if fmt == "imagefolder":
        split = tmp_path / "test"
        _images(split, "a.png", "b.png", "sub/a.png")
        _metadata(split, [{"file_name": "a.png", "caption": "one"}, {"file_name": "b.png", "caption": "two"},
                          {"file_name": "a.png", "captions": ["three", "four"]},
                          {"file_name": "sub/a.png", "caption": "another a"}])  # same id 'test/a', another file
        spec, key, other = tmp_path, "test/a", "test/b"
    else:
        _images(tmp_path, "a.png", "b.png")
        (tmp_path / "t.csv").write_text("image,caption\na.png,one\nb.png,two\n./a.png,three\na.png,four\n")
        spec, key, other = tmp_path / "t.csv", "a.png", "b.png"
    examples, report = load_caption_set(spec, "test")
    assert [(e.image_id, e.captions) for e in examples] == [(key, ["one", "three", "four"]), (other, ["two"])]
    references = load_references(spec, split="test")
    assert references == {key: ["one", "three", "four"], other: ["two"]}
    if fmt == "imagefolder":  # a row giving another file under an existing id is refused with both lines
        assert len(report.problems) == 1 and report.problems[0].startswith(f"{split / 'metadata.jsonl'}:4: ")
        assert "metadata.jsonl:1" in report.problems[0]
        train, _ = read_imagefolder(tmp_path, "test")  # training reads the same items
        assert [(e.image_id, e.captions) for e in train] == [(e.image_id, e.captions) for e in examples]


def test_invisible_and_control_characters_in_captions_are_cleaned(tmp_path, caplog):
    split = tmp_path / "train"
    _images(split, "a.png", "b.png", "c.png", "d.png")
    _metadata(split, [
        {"file_name": "a.png", "caption": "\u200b\ufeff\u202e"},                 # 1: invisible only: no caption
        {"file_name": "b.png", "caption": "a\x00 dog\x1b", "captions": ["\u2066\u2069", "a cat"]},  # 2: both keys
        {"file_name": "c.png", "captions": ["\ufeffa bird\u200f"]},              # 3: BOM and RLM at the ends
        {"file_name": "d.png", "caption": "\u200d"},                             # 4: zero-width joiner alone
    ])
    with caplog.at_level("WARNING"):
        examples, report = read_imagefolder(tmp_path, "train")
    assert [(e.image_id, e.captions) for e in examples] == [("train/b", ["a dog", "a cat"]), ("train/c", ["a bird"])]
    assert [p.split(": ", 1)[0].rsplit(":", 1)[1] for p in report.problems] == ["1", "4"]
    assert all("only invisible or control characters" in p for p in report.problems)
    notes = " ".join(report.notes)
    assert "both 'caption' and 'captions'" in notes and "removed control or invisible characters" in notes
    assert "both 'caption' and 'captions'" in caplog.text  # warned, not silent
    refs = load_references(tmp_path, split="train")
    assert refs == {"train/b": ["a dog", "a cat"], "train/c": ["a bird"]}


def test_table_with_caption_and_captions_columns_reads_both(tmp_path):
    _images(tmp_path, "a.png")
    (tmp_path / "t.jsonl").write_text(json.dumps({"image": "a.png", "caption": "x", "captions": ["y", "z"]}) + "\n")
    examples, report = read_caption_table(tmp_path / "t.jsonl", image_column=None, caption_column=None)
    assert examples[0].captions == ["x", "y", "z"] and len(report.notes) == 1


def test_predictions_are_cleaned_like_references(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"image_id": "1", "caption": "\ufeffa\x00 dog\u200b"}) + "\n")
    assert read_predictions(p) == {"1": "a dog"}


def test_long_names_are_refused_fast_with_a_short_message(tmp_path):
    _images(tmp_path, "ok.png")
    name = "a/" * 400_000 + "x.png"  # 800 kB
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"image": name, "caption": "long"}, {"image": "ok.png", "caption": "fine"}]) + "\n")
    start = time.monotonic()
    examples, report = read_caption_table(tmp_path / "t.jsonl")
    assert time.monotonic() - start < 2
    assert [e.image_id for e in examples] == ["ok.png"]
    assert f"longer than {MAX_PATH_BYTES} bytes" in report.problems[0] and len(report.problems[0]) < 300 + len(
        str(tmp_path))
    with pytest.raises(DataError) as e:
        read_caption_table(tmp_path / "t.jsonl", strict=True)
    assert len(str(e.value)) < 300 + len(str(tmp_path))
    items, problems = read_input_table(tmp_path / "t.jsonl")  # `caption --table`
    assert items == [{"image": str(tmp_path / "ok.png")}] and len(problems[0]) < 300 + len(str(tmp_path))


def test_long_prediction_ids_are_matched_fast_and_cut_in_messages():
    from captioner.data import match_prediction_ids

    long_id = "d/" * 200_000 + "x.png"
    start = time.monotonic()
    with pytest.raises(DataError) as e:
        match_prediction_ids({long_id: "a caption", "test/1.png": "b"}, {"test/1": ["b"], "test/2": ["c"]})
    assert time.monotonic() - start < 2
    assert "not in the references" in str(e.value) and len(str(e.value)) < 400
    path_id = "/data/" + "e/" * 1000 + "test/1.png"  # a long path whose tail names a reference: still matched
    assert match_prediction_ids({path_id: "b"}, {"test/1": ["b"]}) == {"test/1": "b"}
