"""Caption-set reading and image input: problems are reported with file and line, others kept."""

import json
import os
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from captioner.data import (MAX_CAPTION_CHARS, DataError, ImageError, collect_images, load_caption_set,
                            load_image, load_references, read_caption_table, read_coco_captions,
                            read_hf_dataset, read_imagefolder, read_karpathy, read_predictions)


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
    with pytest.raises(ImageError, match="trunc.jpg: truncated"):
        load_image(tmp_path / "trunc.jpg")


# ------------------------------------------------------------------ COCO, Karpathy, tables, predictions


def _images(folder, *names):
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(path)


def _where(problems):
    """'FILE:LINE' (or 'FILE: images[i]' for JSON documents) of each problem."""
    return [p[:p.index("]") + 1] if ": images[" in p or ": annotations[" in p else p.split(": ", 1)[0]
            for p in problems]


def test_csv_table_groups_rows_and_reports_real_line_numbers(tmp_path):
    _images(tmp_path, "a.png", "b.png")
    (tmp_path.parent / "outside.png").write_bytes(b"")
    table = tmp_path / "captions.csv"
    table.write_bytes(
        b"image,caption\n"                        # 1
        b'a.png,"a cat\non two lines"\n'          # 2-3: quoted newline
        b"missing.png,a dog\n"                    # 4: no such image
        b"b.png,a dog, running\n"                 # 5: unquoted comma -> 3 fields
        b"\n"                                     # 6: blank, ignored
        b"../outside.png,escape\n"                # 7
        b"/etc/passwd,absolute\n"                 # 8
        b"b.png,caf\xe9\n"                        # 9: not UTF-8
        b'b.png,"   "\n'                          # 10: empty after normalising
        b"b.png," + b"x" * (MAX_CAPTION_CHARS + 1) + b"\n"  # 11: too long
        b"./a.png,  a   black cat \n"             # 12: same image as line 2
        b"b.png,a dog\n"                          # 13
        b'gone.png,"two\nlines"\n'               # 14-15: no such image
        b"b.png,x\xff\n"                         # 16: not UTF-8
    )
    examples, report = read_caption_table(table)
    assert [(e.image_id, e.image, e.captions) for e in examples] == [
        ("a.png", str(tmp_path / "a.png"), ["a cat on two lines", "a black cat"]),
        ("b.png", str(tmp_path / "b.png"), ["a dog"])]
    assert _where(report.problems) == [f"{table}:{n}" for n in (4, 5, 7, 8, 9, 10, 11, 14, 16)]
    reasons = [p.split(": ", 1)[1] for p in report.problems]
    assert "not found" in reasons[0] and "3 fields" in reasons[1]
    assert "escapes" in reasons[2] and "escapes" in reasons[3] and "UTF-8" in reasons[4]
    assert "no non-empty caption" in reasons[5] and "longer than" in reasons[6] and "UTF-8" in reasons[8]
    assert report.kept == 2
    with pytest.raises(DataError, match=r"captions\.csv:4: image file 'missing.png' not found"):
        read_caption_table(table, strict=True)
    # references only: the missing image is kept (and unchecked), escapes are still rejected
    examples, report = read_caption_table(table, require_images=False)
    assert [e.image_id for e in examples] == ["a.png", "missing.png", "b.png", "gone.png"]
    assert _where(report.problems) == [f"{table}:{n}" for n in (5, 7, 8, 9, 10, 11, 16)]


def test_jsonl_table_reports_bad_lines(tmp_path):
    _images(tmp_path, "img/a.png", "img/b.png")
    table = tmp_path / "caps.jsonl"
    table.write_bytes(b"\n".join([
        json.dumps({"image": "img/a.png", "caption": "one"}).encode(),   # 1
        b"{not json",                                                     # 2
        b"[1, 2]",                                                        # 3
        json.dumps({"image": "img/b.png"}).encode(),                      # 4: no caption
        b'{"image": "img/b.png", "caption": "caf\xe9"}',                  # 5
        b"",                                                              # 6
        json.dumps({"image": "img/b.png", "caption": 7}).encode(),        # 7
        json.dumps({"caption": "x"}).encode(),                            # 8: no image
        json.dumps({"image": "img/b.png", "caption": ["two", "three"]}).encode(),  # 9
        json.dumps({"image": "img/a.png", "caption": "four"}).encode(),   # 10
        b'{"image": "img/a.png", "n": ' + b"9" * 5000 + b"}",              # 11: int too long for Python
    ]) + b"\n")
    examples, report = read_caption_table(table)
    assert [(e.image_id, e.captions) for e in examples] == [("img/a.png", ["one", "four"]),
                                                           ("img/b.png", ["two", "three"])]
    assert _where(report.problems) == [f"{table}:{n}" for n in (2, 3, 4, 5, 7, 8, 11)]
    assert "invalid JSON" in report.problems[0] and "JSON object" in report.problems[1]
    assert "caption field" in report.problems[2] and "UTF-8" in report.problems[3]
    assert "must be a string" in report.problems[4] and "image field" in report.problems[5]


def test_tsv_sniffing_metadata_csv_and_missing_columns(tmp_path):
    _images(tmp_path, "a.png")
    (tmp_path / "t.tsv").write_text("image\tcaption\na.png\ta cat, sitting\n")
    (tmp_path / "t.txt").write_text("image\tcaption\na.png\ta cat, sitting\n")  # tab sniffed
    for name in ("t.tsv", "t.txt"):
        examples, _ = read_caption_table(tmp_path / name)
        assert examples[0].captions == ["a cat, sitting"]
    (tmp_path / "metadata.csv").write_text("file_name,caption\na.png,a cat\n")
    examples, _ = read_caption_table(tmp_path / "metadata.csv", image_column="file_name")
    assert [(e.image_id, e.captions) for e in examples] == [("a.png", ["a cat"])]
    with pytest.raises(DataError, match=r"metadata\.csv:1: no image column.*'file_name', 'caption'"):
        read_caption_table(tmp_path / "metadata.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match="empty file"):
        read_caption_table(tmp_path / "empty.csv")
    (tmp_path / "bad.csv").write_text("image,caption\nnope.png,x\n")
    with pytest.raises(DataError, match=r"no usable rows \(1 skipped\)"):
        read_caption_table(tmp_path / "bad.csv")


def test_symlink_escaping_the_dataset_folder_is_rejected(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    _images(tmp_path, "secret.png")
    _images(data, "ok.png")
    os.symlink(tmp_path / "secret.png", data / "link.png")
    (data / "t.csv").write_text("image,caption\nlink.png,x\nok.png,y\n")
    examples, report = read_caption_table(data / "t.csv")
    assert [e.image_id for e in examples] == ["ok.png"]
    assert report.problems == [f"{data / 't.csv'}:2: image path 'link.png' escapes the dataset folder"]


def _coco(tmp_path):
    _images(tmp_path, "val2014/1.jpg", "val2014/2.jpg", "val2014/3.jpg")
    doc = {"images": [{"id": 1, "file_name": "1.jpg"}, {"id": 2, "file_name": "2.jpg"},
                      {"id": 3, "file_name": "3.jpg"}, {"id": 4, "file_name": "4.jpg"},
                      {"id": 5, "file_name": "../1.jpg"}, {"file_name": "6.jpg"}, {"id": 1, "file_name": "x.jpg"}],
           "annotations": [{"image_id": 2, "caption": "two a"}, {"image_id": 1, "caption": " one  a "},
                           {"image_id": 99, "caption": "unknown"}, {"image_id": 2, "caption": "two b"},
                           {"image_id": 1, "caption": ["not", "a string"]}, {"image_id": 4, "caption": "four"},
                           {"image_id": 5, "caption": "five"}, {"caption": "no id"}]}
    ann = tmp_path / "annotations" / "captions_val2014.json"
    ann.parent.mkdir()
    ann.write_text(json.dumps(doc))
    return ann


def test_coco_captions_grouped_per_image_and_problems_reported(tmp_path):
    ann = _coco(tmp_path)
    examples, report = read_coco_captions(ann, tmp_path / "val2014")
    assert [(e.image_id, e.image, e.captions, e.split) for e in examples] == [
        ("1", str(tmp_path / "val2014" / "1.jpg"), ["one a"], "val2014"),
        ("2", str(tmp_path / "val2014" / "2.jpg"), ["two a", "two b"], "val2014")]
    assert _where(report.problems) == [f"{ann}: images[5]", f"{ann}: images[6]", f"{ann}: annotations[2]",
                                       f"{ann}: annotations[4]", f"{ann}: annotations[7]", f"{ann}: images[2]",
                                       f"{ann}: images[3]", f"{ann}: images[4]"]
    assert "duplicate image id '1'" in report.problems[1]
    assert "image_id '99' is not in 'images'" in report.problems[2]
    assert "has no captions" in report.problems[5] and "not found" in report.problems[6]
    assert "escapes" in report.problems[7]
    with pytest.raises(DataError, match=r"images\[5\]: entry needs an 'id'"):
        read_coco_captions(ann, tmp_path / "val2014", strict=True)
    # default image root is the JSON's folder, where no image exists; references need no images
    with pytest.raises(DataError, match="no usable images"):
        read_coco_captions(ann)
    examples, _ = read_coco_captions(ann, require_images=False)
    assert [e.image_id for e in examples] == ["1", "2", "4"]


def test_coco_image_info_file_without_annotations_is_an_error(tmp_path):
    (tmp_path / "image_info_test2014.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}]}))
    with pytest.raises(DataError, match="no 'annotations' list"):
        read_coco_captions(tmp_path / "image_info_test2014.json")


def _karpathy(tmp_path):
    _images(tmp_path, "train2014/t.jpg", "val2014/r.jpg", "val2014/v.jpg", "val2014/s.jpg", "f.jpg")
    doc = {"dataset": "coco", "images": [
        {"filepath": "train2014", "filename": "t.jpg", "split": "train", "cocoid": 10, "imgid": 0,
         "sentences": [{"raw": "a train image."}]},
        {"filepath": "val2014", "filename": "r.jpg", "split": "restval", "cocoid": 11, "imgid": 1,
         "sentences": [{"raw": "a restval image."}, {"raw": "  another  one "}]},
        {"filepath": "val2014", "filename": "v.jpg", "split": "val", "cocoid": 12, "imgid": 2,
         "sentences": [{"raw": "a val image."}]},
        {"filepath": "val2014", "filename": "s.jpg", "split": "test", "cocoid": 13, "imgid": 3,
         "sentences": [{"raw": "a test image."}]},
        {"filename": "f.jpg", "split": "test", "imgid": 4, "sentences": [{"raw": "flickr style, no cocoid"}]},
        {"filepath": "val2014", "filename": "gone.jpg", "split": "test", "cocoid": 15, "imgid": 5,
         "sentences": [{"raw": "missing file"}]},
        {"filepath": "..", "filename": "x.jpg", "split": "test", "cocoid": 16, "imgid": 6,
         "sentences": [{"raw": "escape"}]},
        {"filename": "f.jpg", "split": "test", "imgid": 7, "sentences": [{"raw": ""}]},
    ]}
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps(doc))
    return path


def test_karpathy_split_selection(tmp_path):
    path = _karpathy(tmp_path)
    examples, report = read_karpathy(path)  # default split: test
    assert [(e.image_id, e.image, e.captions, e.split) for e in examples] == [
        ("13", str(tmp_path / "val2014" / "s.jpg"), ["a test image."], "test"),
        ("4", str(tmp_path / "f.jpg"), ["flickr style, no cocoid"], "test")]
    assert _where(report.problems) == [f"{path}: images[{i}]" for i in (5, 6, 7)]
    assert "not found" in report.problems[0] and "escapes" in report.problems[1]
    assert "no non-empty caption" in report.problems[2]
    assert [e.image_id for e in read_karpathy(path, split="val")[0]] == ["12"]
    assert [e.image_id for e in read_karpathy(path, split="train")[0]] == ["10"]
    examples, _ = read_karpathy(path, split="train+restval")
    assert [(e.image_id, e.split, e.captions) for e in examples] == [
        ("10", "train", ["a train image."]), ("11", "restval", ["a restval image.", "another one"])]
    with pytest.raises(DataError, match="unknown Karpathy split 'dev'"):
        read_karpathy(path, split="dev")
    examples, _ = read_karpathy(path, split="test", require_images=False)
    assert [e.image_id for e in examples] == ["13", "4", "15"]


def test_predictions_coco_results_round_trip(tmp_path):
    preds = {1: "a cat", 42: "a  dog ", "COCO_x": "a bird"}
    (tmp_path / "results.json").write_text(json.dumps([{"image_id": k, "caption": v} for k, v in preds.items()]))
    assert read_predictions(tmp_path / "results.json") == {"1": "a cat", "42": "a dog", "COCO_x": "a bird"}
    # `captioner caption -o x.jsonl` rows, and other id keys
    (tmp_path / "out.jsonl").write_text(
        json.dumps({"image": "imgs/a.jpg", "caption": "a cat", "captions": ["a cat", "a dog"]}) + "\n\n"
        + json.dumps({"id": 7, "caption": "seven"}) + "\n")
    assert read_predictions(tmp_path / "out.jsonl") == {"imgs/a.jpg": "a cat", "7": "seven"}
    (tmp_path / "out.csv").write_text("image,rank,caption\na.jpg,0,first\na.jpg,1,second\nb.jpg,0,\"b, too\"\n")
    assert read_predictions(tmp_path / "out.csv") == {"a.jpg": "first", "b.jpg": "b, too"}
    (tmp_path / "ids.csv").write_text("image_id,caption\n3,three\n")
    assert read_predictions(tmp_path / "ids.csv") == {"3": "three"}


@pytest.mark.parametrize("name, content, match", [
    ("dup.json", json.dumps([{"image_id": 5, "caption": "a"}, {"image_id": "5", "caption": "b"}]),
     r"dup\.json: entry 1: duplicate image_id '5' \(first at entry 0\)"),
    ("dup.jsonl", '{"image_id": 5, "caption": "a"}\n\n{"image_id": 5, "caption": "b"}\n',
     r"dup\.jsonl:3: duplicate image_id '5' \(first at line 1\)"),
    ("dup.csv", 'image_id,caption\n5,a\n"5",b\n', r"dup\.csv:3: duplicate image_id '5' \(first at line 2\)"),
    ("noid.json", json.dumps([{"image_id": 1, "caption": "a"}, {"caption": "b"}]),
     r"noid\.json: entry 1: missing 'image_id'"),
    ("notobj.json", "[1]", r"notobj\.json: entry 0: must be an object"),
    ("nullid.jsonl", '{"image_id": null, "caption": "a"}', r"nullid\.jsonl:1: image_id must be a non-empty string"),
    ("nocap.json", json.dumps([{"image_id": 1}]), r"nocap\.json: entry 0: missing 'caption'"),
    ("capint.jsonl", '{"image_id": 1, "caption": 3}\n', r"capint\.jsonl:1: caption must be a string"),
    ("badjson.json", '[{"image_id": 1,\n "caption": }]', r"badjson\.json:2: invalid JSON"),
    ("badline.jsonl", '{"image_id": 1, "caption": "a"}\n{oops\n', r"badline\.jsonl:2: invalid JSON"),
    ("dict.json", json.dumps({"1": "a"}), r"dict\.json: not a list"),
    ("bigint.json", '[{"image_id": ' + "9" * 5000 + ', "caption": "a"}]', r"bigint\.json: invalid JSON"),
    ("utf16.json", json.dumps([{"image_id": 1, "caption": "a"}]).encode("utf-16"), r"utf16\.json: not valid UTF-8"),
    ("empty.json", "[]", r"empty\.json: no predictions"),
    ("short.csv", "image_id,caption\n1,a\n2\n", r"short\.csv:3: row has 1 fields, the header has 2"),
    ("cols.csv", "file,text\na,b\n", r"cols\.csv:1: header needs 'caption'"),
])
def test_prediction_errors_name_file_and_place(tmp_path, name, content, match):
    (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError, match=match):
        read_predictions(tmp_path / name)


def test_load_references_detects_each_format(tmp_path):
    # no image files anywhere: references for scoring need none
    coco = {"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 1, "caption": "a cat"}]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    assert load_references(tmp_path / "coco.json") == {"1": ["a cat"]}
    karpathy = {"images": [{"filename": "a.jpg", "split": "test", "imgid": 3, "sentences": [{"raw": "a dog"}]},
                           {"filename": "b.jpg", "split": "val", "imgid": 4, "sentences": [{"raw": "a cow"}]}]}
    (tmp_path / "dataset_flickr8k.json").write_text(json.dumps(karpathy))
    assert load_references(tmp_path / "dataset_flickr8k.json") == {"3": ["a dog"]}
    assert load_references(tmp_path / "dataset_flickr8k.json", split="val") == {"4": ["a cow"]}
    (tmp_path / "ifold" / "test").mkdir(parents=True)
    (tmp_path / "ifold" / "test" / "metadata.jsonl").write_text(
        json.dumps({"file_name": "x.png", "captions": ["a", "b"]}) + "\n"
        + json.dumps({"file_name": "y.png", "caption": "c"}) + "\n")
    assert load_references(tmp_path / "ifold") == {"test/x": ["a", "b"], "test/y": ["c"]}
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "metadata.jsonl").write_text(json.dumps({"file_name": "x.png", "caption": "a"}) + "\n")
    assert load_references(tmp_path / "flat", split="test") == {"x": ["a"]}
    (tmp_path / "refs.csv").write_text("image_id,caption\n1,one\n1,uno\n2,two\n")
    assert load_references(tmp_path / "refs.csv") == {"1": ["one", "uno"], "2": ["two"]}
    (tmp_path / "refs.tsv").write_text("file_name\tcaption\na.jpg\tone, really\n")
    assert load_references(tmp_path / "refs.tsv") == {"a.jpg": ["one, really"]}
    (tmp_path / "refs.jsonl").write_text(json.dumps({"image": "a.jpg", "caption": "one"}) + "\n")
    assert load_references(tmp_path / "refs.jsonl") == {"a.jpg": ["one"]}
    (tmp_path / "results.json").write_text(json.dumps([{"image_id": 1, "caption": "x"}]))
    with pytest.raises(DataError, match="predictions in COCO results format.*accepted reference formats: COCO"):
        load_references(tmp_path / "results.json")
    (tmp_path / "refs.txt").write_text("hello")
    with pytest.raises(DataError, match="unknown reference format; accepted reference formats: COCO captions JSON"):
        load_references(tmp_path / "refs.txt")
    (tmp_path / "none").mkdir()
    with pytest.raises(DataError, match="no metadata.jsonl"):
        load_references(tmp_path / "none")


def test_load_caption_set_dispatches_by_path(tmp_path):
    for sub in ("if", "coco", "kp"):
        (tmp_path / sub).mkdir()
    root = _folder(tmp_path / "if", [json.dumps({"file_name": "a.png", "caption": "x"}).encode()])
    examples, _ = load_caption_set(root, "train")
    assert [e.image_id for e in examples] == ["train/a"]
    examples, _ = load_caption_set(root / "train", "test")  # no test folder: the folder itself
    assert [e.image_id for e in examples] == ["a"]
    ann = _coco(tmp_path / "coco")
    with pytest.raises(DataError, match="no usable images"):  # COCO images default to the JSON's folder
        load_caption_set(ann, "test")
    examples, _ = load_caption_set(ann, "test", image_root=tmp_path / "coco" / "val2014")  # split only labels
    assert [(e.image_id, e.split) for e in examples] == [("1", "test"), ("2", "test")]
    with pytest.raises(DataError, match="image root applies only to COCO/Karpathy"):
        load_caption_set(root, "train", image_root=tmp_path)
    kp = _karpathy(tmp_path / "kp")
    examples, _ = load_caption_set(kp, "val")
    assert [(e.image_id, e.split) for e in examples] == [("12", "val")]
    _images(tmp_path / "tab", "a.png")
    (tmp_path / "tab" / "metadata.csv").write_text("file_name,caption\na.png,a cat\n")
    examples, _ = load_caption_set(tmp_path / "tab" / "metadata.csv", "test")
    assert [(e.image_id, e.captions, e.split) for e in examples] == [("a.png", ["a cat"], "test")]
    with pytest.raises(DataError, match="no image column"):
        load_caption_set(tmp_path / "tab" / "metadata.csv", "test", image_column="image")
    with pytest.raises(DataError, match="no such file"):
        load_caption_set(tmp_path / "nope.csv", "test")


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.one_of(st.binary(max_size=400),
                      st.lists(st.sampled_from([b"image,caption", b"a.png,x", b'"', b"\t", b"{", b"}",
                                                b'{"image": "a.png", "caption": "x"}', b'{"image_id": 1}',
                                                b"\xff", b"\r", b"\x00", b"[", b"]", b",", b'"caption"', b"../", b"1",
                                                b"null", b'"image_id": ', b'"caption": ', b"\n"]),
                               max_size=30).map(b"".join)))
def test_arbitrary_bytes_only_ever_raise_data_error(data):
    with tempfile.TemporaryDirectory() as tmp:
        Image.new("RGB", (4, 4)).save(os.path.join(tmp, "a.png"))
        for name in ("t.jsonl", "t.csv", "t.tsv", "p.json", "p.jsonl", "p.csv", "p.txt"):
            path = os.path.join(tmp, name)
            with open(path, "wb") as f:
                f.write(data)
            calls = [lambda: read_predictions(path)] if name.startswith("p") else [
                lambda: read_caption_table(path), lambda: read_caption_table(path, strict=True),
                lambda: read_caption_table(path, image_column=None, caption_column=None, require_images=False),
                lambda: load_references(path)]
            for call in calls:
                try:
                    call()
                except DataError:
                    pass


# ------------------------------------------------------------------ Hugging Face `datasets` caption sets

def _hf():
    import datasets

    datasets.disable_progress_bars()
    return datasets


def _hf_images(n):
    colours = [(255, 0, 0), (0, 128, 255), (10, 200, 30), (90, 90, 90), (250, 250, 0)]
    return [Image.new("RGB", (5 + i, 4 + 2 * i), colours[i % len(colours)]) for i in range(n)]


def _pixels(im):
    return im.size, im.convert("RGB").tobytes()


def test_hf_saved_dataset_images_are_materialised_once(tmp_path):
    datasets = _hf()
    originals = _hf_images(4)
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Sequence(datasets.Value("string"))})
    ds = datasets.Dataset.from_dict({"image": originals, "caption": [["a red  box", "red"], ["a blue box"], [], None]},
                                    features=features)
    ds.save_to_disk(str(tmp_path / "ds"))
    cache = tmp_path / "cache"
    examples, report = load_caption_set(tmp_path / "ds", "train", cache_dir=cache)
    assert [(e.image_id, e.captions, e.split) for e in examples] == [("train/0", ["a red box", "red"], "train"),
                                                                    ("train/1", ["a blue box"], "train")]
    assert report.kept == 2 and [p.split(": ", 1)[1] for p in report.problems] == [
        "train[2]: no non-empty caption", "train[3]: caption must be a string or a list of strings"]
    for ex, original in zip(examples, originals):
        assert os.path.isfile(ex.image) and ex.image.startswith(str(cache))
        assert _pixels(load_image(ex.image)) == _pixels(original)
    assert sorted(p.name for p in cache.rglob("*") if p.is_file()) == ["0.png", "1.png"]  # bad rows: no file
    old = 1_000_000_000
    for ex in examples:
        os.utime(ex.image, ns=(old, old))
    again, _ = load_caption_set(tmp_path / "ds", "train", cache_dir=cache)
    assert [e.image for e in again] == [e.image for e in examples]
    assert all(os.stat(e.image).st_mtime_ns == old for e in again)  # reused, not rewritten
    with pytest.raises(DataError, match=r"train\[2\]: no non-empty caption"):
        read_hf_dataset(str(tmp_path / "ds"), None, strict=True, cache_dir=cache)


def test_hf_dataset_dict_splits_ids_and_missing_split(tmp_path):
    datasets = _hf()
    ims = _hf_images(5)
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"image": ims[:3], "caption": ["one", "two", "one again"],
                                             "image_id": [7, 8, 7]}),
        "test": datasets.Dataset.from_dict({"image": ims[3:], "caption": ["three", "four"], "image_id": [9, 10]}),
    })
    dd.save_to_disk(str(tmp_path / "dd"))
    train, _ = load_caption_set(tmp_path / "dd", "train", cache_dir=tmp_path / "c")
    assert [(e.image_id, e.captions, e.split) for e in train] == [("7", ["one", "one again"], "train"),
                                                                 ("8", ["two"], "train")]
    test, _ = load_caption_set(tmp_path / "dd", "test", cache_dir=tmp_path / "c")
    assert [(e.image_id, e.captions, e.split) for e in test] == [("9", ["three"], "test"), ("10", ["four"], "test")]
    assert _pixels(load_image(test[1].image)) == _pixels(ims[4])
    assert len({e.image for e in train + test}) == 4
    with pytest.raises(DataError, match=r"no split 'val' \(available splits: 'train', 'test'\)"):
        load_caption_set(tmp_path / "dd", "val", cache_dir=tmp_path / "c")
    with pytest.raises(DataError, match="no split given"):
        read_hf_dataset(str(tmp_path / "dd"), None, cache_dir=tmp_path / "c")
    single, _ = load_caption_set(tmp_path / "dd" / "test", None, cache_dir=tmp_path / "c")  # one split's folder
    assert [(e.image_id, e.split) for e in single] == [("9", "test"), ("10", "test")]


def test_hf_path_string_images_are_used_in_place(tmp_path):
    datasets = _hf()
    _images(tmp_path / "pics", "a.png", "b.png")
    (tmp_path / "ds").mkdir()
    _images(tmp_path / "ds", "rel.png")  # relative paths start at the dataset's folder
    ds = datasets.Dataset.from_dict({"file": [str(tmp_path / "pics" / "a.png"), "rel.png",
                                              str(tmp_path / "pics" / "gone.png"), str(tmp_path / "pics" / "b.png")],
                                     "text": ["a", "r", "g", "b"]})
    ds.save_to_disk(str(tmp_path / "ds"))
    cache = tmp_path / "cache"
    examples, report = load_caption_set(tmp_path / "ds", "val", image_column="file", caption_column="text",
                                        cache_dir=cache, allow_outside_paths=True)
    assert [(e.image_id, e.image, e.captions) for e in examples] == [
        ("val/0", str(tmp_path / "pics" / "a.png"), ["a"]), ("val/1", str(tmp_path / "ds" / "rel.png"), ["r"]),
        ("val/3", str(tmp_path / "pics" / "b.png"), ["b"])]
    assert len(report.problems) == 1
    assert "val[2]: image file" in report.problems[0] and "not found" in report.problems[0]
    assert not cache.exists()  # nothing copied


def test_hf_and_parquet_paths_stay_inside_the_dataset_folder(tmp_path):
    # absolute and ../ paths in a dataset's cells are refused like those of folders and tables, unless allowed
    datasets = _hf()
    _images(tmp_path / "secret", "s.png")
    _images(tmp_path / "ds", "in.png")
    cells = ["in.png", str(tmp_path / "secret" / "s.png"), "../secret/s.png"]
    datasets.Dataset.from_dict({"image": cells, "caption": ["i", "abs", "up"]}).save_to_disk(str(tmp_path / "ds"))
    (tmp_path / "pq").mkdir()
    _images(tmp_path / "pq", "in.png")
    datasets.Dataset.from_dict({"image": cells, "caption": ["i", "abs", "up"]}).to_parquet(str(tmp_path / "pq" / "t.parquet"))
    for spec in (tmp_path / "ds", tmp_path / "pq" / "t.parquet"):
        examples, report = load_caption_set(spec, "train", cache_dir=tmp_path / "c")
        assert [e.captions for e in examples] == [["i"]]
        assert len(report.problems) == 2 and all("escapes the dataset folder" in p for p in report.problems)
        assert not (tmp_path / "c").exists()  # nothing read from outside, nothing copied
        allowed, report = load_caption_set(spec, "train", cache_dir=tmp_path / "c", allow_outside_paths=True)
        assert [e.image for e in allowed][1:] == [str(tmp_path / "secret" / "s.png"), str(spec.parent / "../secret/s.png")
                                                  if spec.is_file() else str(spec / "../secret/s.png")]


def test_hf_missing_column_names_it_and_lists_columns(tmp_path):
    datasets = _hf()
    datasets.Dataset.from_dict({"image": _hf_images(1), "sentence": ["x"]}).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(DataError, match=r"no caption column \(looked for 'caption', 'captions', 'text'; columns: "
                                        r"'image', 'sentence'\); name it with --caption-column"):
        read_hf_dataset(str(tmp_path / "ds"), "train", cache_dir=tmp_path / "c")
    with pytest.raises(DataError, match=r"no image column 'picture' \(columns: 'image', 'sentence'\)"):
        load_caption_set(tmp_path / "ds", "train", image_column="picture", caption_column="sentence",
                         cache_dir=tmp_path / "c")
    examples, _ = load_caption_set(tmp_path / "ds", "train", caption_column="sentence", cache_dir=tmp_path / "c")
    assert [e.captions for e in examples] == [["x"]]


def test_hf_hub_name_offline_fails_fast(monkeypatch):
    import time

    import captioner.hub

    _hf()
    monkeypatch.setattr(captioner.hub, "hub_reachable", lambda *a, **k: False)
    start = time.monotonic()
    with pytest.raises(DataError, match=r"hf:some/name: the Hugging Face hub is unreachable.*local path"):
        load_caption_set("hf:some/name", "train")
    assert time.monotonic() - start < 10
    with pytest.raises(DataError, match="image root applies only"):
        load_caption_set("hf:some/name", "train", image_root="/tmp")


def test_hf_local_data_files_go_through_load_dataset(tmp_path, monkeypatch):
    datasets = _hf()
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    originals = _hf_images(2)
    datasets.Dataset.from_dict({"image": originals, "caption": ["p0", "p1"]}).to_parquet(str(tmp_path / "t.parquet"))
    examples, _ = load_caption_set(tmp_path / "t.parquet", "test", cache_dir=tmp_path / "c")
    assert [(e.image_id, e.captions, e.split) for e in examples] == [("test/0", ["p0"], "test"),
                                                                    ("test/1", ["p1"], "test")]  # a file: one split
    assert [_pixels(load_image(e.image)) for e in examples] == [_pixels(im) for im in originals]
    # a data directory without metadata.jsonl, read by load_dataset when a column is named (imagefolder + csv)
    folder = tmp_path / "folder"
    _images(folder, "x.png", "y.png")
    (folder / "metadata.csv").write_text("file_name,text\nx.png,an x\ny.png,a y\n")
    examples, _ = load_caption_set(folder, "train", caption_column="text", cache_dir=tmp_path / "c2")
    assert sorted((os.path.basename(e.image), e.captions[0]) for e in examples) == [("x.png", "an x"), ("y.png", "a y")]
    assert all(os.path.dirname(e.image) == str(folder) for e in examples)  # files on disk: used in place
    assert not (tmp_path / "c2").exists()


def test_imagefolder_reads_metadata_csv_and_parquet(tmp_path):
    # Hugging Face's imagefolder takes metadata.csv (one row per caption) and metadata.parquet too
    csv_root = tmp_path / "csv"
    _images(csv_root / "train", "a.png", "b.png")
    (csv_root / "train" / "metadata.csv").write_text("file_name,caption\na.png,a cat\na.png,the cat\nb.png,a dog\n")
    examples, _ = load_caption_set(csv_root, "train")
    assert [(e.image_id, e.captions) for e in examples] == [("train/a", ["a cat", "the cat"]), ("train/b", ["a dog"])]
    assert load_references(csv_root, split="train") == {"train/a": ["a cat", "the cat"], "train/b": ["a dog"]}
    (csv_root / "train" / "metadata.csv").write_text("file_name,caption\n../outside.png,escapes\n")
    with pytest.raises(DataError, match="outside"):
        read_imagefolder(csv_root, "train", strict=True)

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq_root = tmp_path / "pq"
    _images(pq_root, "x.png", "y.png")
    pq.write_table(pa.table({"file_name": ["x.png", "y.png"], "captions": [["an x", "the x"], ["a y"]]}),
                   pq_root / "metadata.parquet")
    examples, _ = read_imagefolder(pq_root)
    assert [(e.image_id, e.captions, os.path.basename(e.image)) for e in examples] == [
        ("x", ["an x", "the x"], "x.png"), ("y", ["a y"], "y.png")]
    (pq_root / "metadata.jsonl").write_text(json.dumps({"file_name": "x.png", "caption": "other"}) + "\n")
    with pytest.raises(DataError, match="metadata.jsonl and metadata.parquet; keep one"):
        read_imagefolder(pq_root)
    (pq_root / "metadata.jsonl").unlink()
    (pq_root / "metadata.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="not a readable parquet file"):
        read_imagefolder(pq_root)


def test_table_image_paths_relative_to_an_image_root(tmp_path):
    _images(tmp_path / "pics", "a.png", "sub/b.png")
    (tmp_path / "pics" / "secret.txt").write_text("x")
    (tmp_path / "outside.png").write_bytes(b"")
    (tmp_path / "meta").mkdir()
    table = tmp_path / "meta" / "caps.csv"
    table.write_text("image,caption\na.png,a cat\nsub/b.png,a dog\n../outside.png,escapes\n")
    examples, report = load_caption_set(table, "train", image_root=tmp_path / "pics")
    assert [(e.image_id, e.captions, e.image) for e in examples] == [
        ("a.png", ["a cat"], str(tmp_path / "pics" / "a.png")),
        ("sub/b.png", ["a dog"], str(tmp_path / "pics" / "sub" / "b.png"))]
    assert [p for p in report.problems if "outside" in str(p)]  # the escape check is against the image root
    with pytest.raises(DataError, match="image root applies only to COCO/Karpathy JSON files and caption tables"):
        load_caption_set(tmp_path / "pics", "train", image_root=tmp_path)


def test_predictions_of_a_chosen_rank(tmp_path, caplog):
    import logging

    from captioner.cli import main

    (tmp_path / "out.csv").write_text("image,rank,caption\na.png,0,a cat\na.png,1,a dog\na.png,2,a cow\n"
                                      "b.png,0,b zero\nb.png,1,b one\nb.png,2,b two\n")
    with caplog.at_level(logging.INFO, logger="captioner"):
        assert read_predictions(tmp_path / "out.csv") == {"a.png": "a cat", "b.png": "b zero"}
    assert "3 captions per item (ranks 0-2); scoring rank 0" in caplog.text
    assert read_predictions(tmp_path / "out.csv", rank=2) == {"a.png": "a cow", "b.png": "b two"}
    with pytest.raises(DataError, match=r"no predictions of rank 3 \(the file has ranks 0-2\)"):
        read_predictions(tmp_path / "out.csv", rank=3)
    (tmp_path / "only2.csv").write_text("image,rank,caption\na.png,2,a cow\n")
    with pytest.raises(DataError, match=r"no predictions of rank 0 \(the file has ranks 2\)"):
        read_predictions(tmp_path / "only2.csv")
    assert read_predictions(tmp_path / "only2.csv", rank=2) == {"a.png": "a cow"}
    (tmp_path / "out.jsonl").write_text(json.dumps({"image": "a.png", "caption": "x", "captions": ["x", "y"]}) + "\n")
    assert read_predictions(tmp_path / "out.jsonl", rank=1) == {"a.png": "y"}
    (tmp_path / "refs.csv").write_text("image,caption\na.png,a cow\nb.png,b two\n")
    assert main(["score", "--predictions", str(tmp_path / "out.csv"), "--references", str(tmp_path / "refs.csv"),
                 "--rank", "2", "-o", str(tmp_path / "s.json")]) == 0
    assert json.loads((tmp_path / "s.json").read_text())["corpus"]["ROUGE_L"] > 0.99  # rank 2 matches exactly
