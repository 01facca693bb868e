"""Input shards for sharded captioning: tar/parquet/CSV/folder expansion, item reading, tar write-back."""

import csv
import io
import json
import os
import pickle
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from captioner.shards import tar as shard_tar
from captioner.shards.sources import (CsvShard, FileShard, Item, ParquetShard, SourceError, TarShard, expand_shards,
                               split_tar_member_name, write_tar_with_captions)


def image_bytes(color=(255, 0, 0), fmt="JPEG", size=(8, 8)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def make_tar(path, members, dirs=()):
    """members: [(name, bytes)] in order; dirs: directory entries to add first."""
    with tarfile.open(path, "w") as tf:
        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            tf.addfile(info)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def sample_members(key, *, text=None, ext="jpg", color=(255, 0, 0)):
    members = [(f"{key}.{ext}", image_bytes(color, "PNG" if ext.lower() == "png" else "JPEG"))]
    members.append((f"{key}.json", json.dumps({"key": key}).encode()))
    if text is not None:
        members.append((f"{key}.txt", text.encode()))
    return members


# ------------------------------------------------------------------------------------ expansion


def test_brace_expansion_keeps_pattern_order(tmp_path):
    for stem in ["00000", "00001", "00002", "00010", "a", "b", "c"]:
        make_tar(tmp_path / f"{stem}.tar", sample_members("k"))
    shards = expand_shards([str(tmp_path / "{00000..00002}.tar"), str(tmp_path / "{c,a,b}.tar"),
                            str(tmp_path / "000*.tar")])
    names = [s.name for s in shards]
    # brace order kept (c, a, b is not sorted); glob matches sorted; a file named twice is used once
    assert names == ["00000", "00001", "00002", "c", "a", "b", "00010"]
    assert all(isinstance(s, TarShard) for s in shards)
    assert shards[3].source == str(tmp_path / "c.tar")


def test_missing_brace_shard_is_a_clear_error(tmp_path):
    for i in (0, 1, 3):
        make_tar(tmp_path / f"{i:05d}.tar", sample_members("k"))
    with pytest.raises(SourceError, match=r"00002\.tar") as info:
        expand_shards([str(tmp_path / "{00000..00003}.tar")])
    assert isinstance(info.value, ValueError)
    assert "00000.tar" not in str(info.value)
    with pytest.raises(SourceError, match="no files match"):
        expand_shards([str(tmp_path / "nothing-*.tar")])
    with pytest.raises(SourceError, match="unsupported input"):
        (tmp_path / "notes.txt").write_text("x")
        expand_shards([str(tmp_path / "notes.txt")])


def test_duplicate_stems_are_disambiguated_and_stable(tmp_path):
    for d in ("d1", "d2"):
        (tmp_path / d).mkdir()
        make_tar(tmp_path / d / "part.tar", sample_members("k"))
    make_tar(tmp_path / "d1" / "other.tar", sample_members("k"))
    inputs = [str(tmp_path / "d1" / "part.tar"), str(tmp_path / "d2" / "part.tar"), str(tmp_path / "d1" / "other.tar")]
    names = [s.name for s in expand_shards(inputs)]
    assert len(set(names)) == 3
    assert names[0].startswith("part-") and names[1].startswith("part-") and names[2] == "other"
    assert all(n.replace("-", "").replace("_", "").isalnum() for n in names)
    assert [s.name for s in expand_shards(inputs)] == names  # same inputs, same names
    # the hash comes from the file, not the position: reversing the inputs keeps each file's name
    again = {s.source: s.name for s in expand_shards(list(reversed(inputs)))}
    assert again == dict(zip(inputs, names))


def test_folder_files_grouped_into_stable_shards(tmp_path):
    root = tmp_path / "imgs"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "__MACOSX").mkdir()
    paths = [root / "b.jpg", root / "a.png", root / "sub" / "c.JPG", root / "sub" / "deeper" / "d.webp",
             root / "e.jpeg", root / "sub" / "f.png"]
    for i, p in enumerate(paths):
        Image.new("RGB", (4, 4), (i * 40, 0, 0)).save(p, format="PNG" if p.suffix.lower() in (".png", ".webp") else "JPEG")
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.jpg").write_bytes(image_bytes())
    (root / "__MACOSX" / "._b.jpg").write_bytes(b"junk")
    single = tmp_path / "single.png"
    single.write_bytes(image_bytes(fmt="PNG"))

    shards = expand_shards([str(root), str(single)], files_per_shard=3)
    assert [s.name for s in shards] == ["files-00000", "files-00001", "files-00002"]
    assert all(isinstance(s, FileShard) for s in shards)
    assert [s.size for s in shards] == [3, 3, 1]
    items = [item for s in shards for item in s]
    keys = [item.key for item in items]
    expected = sorted(os.path.normpath(str(p)) for p in paths + [single])
    assert keys == expected
    assert all(item.path == item.key and item.data is None and item.error is None for item in items)
    # same input set in another order (and a file named twice): same shards
    again = expand_shards([str(single), str(root), str(root / "b.jpg")], files_per_shard=3)
    assert [(s.name, s.paths) for s in again] == [(s.name, s.paths) for s in shards]
    with pytest.raises(ValueError):
        expand_shards([str(root)], files_per_shard=0)


def test_mixed_inputs_put_tables_first_then_loose_files(tmp_path):
    make_tar(tmp_path / "s.tar", sample_members("k"))
    (tmp_path / "img.jpg").write_bytes(image_bytes())
    pq.write_table(pa.table({"image": [image_bytes()]}), tmp_path / "t.parquet")
    shards = expand_shards([str(tmp_path / "img.jpg"), str(tmp_path / "s.tar"), str(tmp_path / "t.parquet")])
    assert [(s.kind, s.name) for s in shards] == [("tar", "s"), ("parquet", "t"), ("files", "files-00000")]


def test_shards_pickle_for_worker_processes(tmp_path):
    make_tar(tmp_path / "s.tar", sample_members("k1") + sample_members("k2"))
    shard = expand_shards([str(tmp_path / "s.tar")])[0]
    clone = pickle.loads(pickle.dumps(shard))
    assert [i.key for i in clone] == [i.key for i in shard] == ["k1", "k2"]


# ------------------------------------------------------------------------------------------ tars


def test_split_tar_member_name_follows_webdataset():
    assert split_tar_member_name("a/b/000123.jpg") == ("a/b/000123", "jpg")
    assert split_tar_member_name("a.b/000123.seg.png") == ("a.b/000123", "seg.png")
    assert split_tar_member_name("000123.json") == ("000123", "json")
    for junk in ("__MACOSX/a/._x.jpg", "a/._x.jpg", ".DS_Store", "README", "__index__"):
        assert split_tar_member_name(junk) is None


def test_tar_grouping_keys_in_subfolders_extra_members_and_image_choice(tmp_path):
    red, blue, green = image_bytes((255, 0, 0)), image_bytes((0, 0, 255), "PNG"), image_bytes((0, 255, 0))
    members = [
        ("a/b/000001.jpg", red), ("a/b/000001.json", b'{"w": 8}'), ("a/b/000001.txt", b"alt text"),
        # png listed before jpg in the tar, but jpg is preferred
        ("a/b/000002.png", blue), ("a/b/000002.jpg", green), ("a/b/000002.txt", b"two"),
        ("c/000003.JPEG", red), ("c/000003.Seg.PNG", blue),  # case-insensitive, multi-part suffix
        ("__MACOSX/a/b/._000004.jpg", b"junk"), ("a/b/._000005.jpg", b"junk"), (".DS_Store", b"junk"),
    ]
    path = make_tar(tmp_path / "shard.tar", members, dirs=["a", "a/b", "c"])
    shard = expand_shards([str(path)])[0]
    assert isinstance(shard, TarShard) and shard.name == "shard" and shard.size is None
    items = list(shard)
    assert [i.key for i in items] == ["a/b/000001", "a/b/000002", "c/000003"]
    assert all(i.error is None and i.path is None for i in items)
    first, second, third = items
    assert first.data == red and first.extra == {"json": b'{"w": 8}', "txt": b"alt text"}
    assert first.source == f"{path}:a/b/000001.jpg"
    assert second.data == green and second.extra == {"png": blue, "txt": b"two"}
    assert third.data == red and third.extra == {"seg.png": blue}
    with Image.open(io.BytesIO(first.data)) as im:
        assert im.size == (8, 8)


def test_tar_sample_without_image_is_an_error_item(tmp_path):
    path = make_tar(tmp_path / "s.tar", sample_members("000001") +
                    [("000002.json", b"{}"), ("000002.txt", b"no picture")] + sample_members("000003"))
    items = list(TarShard(name="s", source=str(path), path=str(path)))
    assert [i.key for i in items] == ["000001", "000002", "000003"]
    bad = items[1]
    assert bad.error and "no image member" in bad.error and bad.data is None and bad.path is None
    assert items[0].error is None and items[2].error is None


def test_truncated_tar_mid_member_yields_earlier_items_and_one_error(tmp_path):
    path = make_tar(tmp_path / "t.tar", sample_members("000001", text="one") + sample_members("000002", text="two")
                    + [("000003.jpg", image_bytes(size=(64, 64)))] + sample_members("000004"))
    data = path.read_bytes()
    with tarfile.open(path) as tf:
        victim = tf.getmember("000003.jpg")
    path.write_bytes(data[: victim.offset_data + victim.size // 2])  # cut inside 000003.jpg
    items = list(expand_shards([str(path)])[0])  # must not raise
    assert [i.key for i in items] == ["000001", "000002", "000003"]
    assert all(i.error is None for i in items[:2]) and items[0].extra["txt"] == b"one"
    assert items[2].error and "000003.jpg" in items[2].error and items[2].data is None


def test_truncated_tar_inside_a_later_member_of_a_sample_reports_that_key_once(tmp_path):
    path = make_tar(tmp_path / "t.tar", sample_members("000001") +
                    [("000002.jpg", image_bytes()), ("000002.json", b"x" * 3000)])
    with tarfile.open(path) as tf:
        victim = tf.getmember("000002.json")
    path.write_bytes(path.read_bytes()[: victim.offset_data + 100])
    items = list(TarShard(name="t", source=str(path), path=str(path)))
    assert [(i.key, i.error is None) for i in items] == [("000001", True), ("000002", False)]


def test_tar_truncated_at_a_member_boundary_is_not_silently_complete(tmp_path):
    path = make_tar(tmp_path / "t.tar", sample_members("000001") + sample_members("000002"))
    with tarfile.open(path) as tf:
        boundary = tf.getmember("000002.jpg").offset  # header of the second sample
    path.write_bytes(path.read_bytes()[:boundary])
    items = list(TarShard(name="t", source=str(path), path=str(path)))
    assert [i.key for i in items] == ["000001", "t:tar"]
    assert items[0].error is None
    assert "truncated" in items[1].error
    # an intact tar has no such error item
    intact = make_tar(tmp_path / "ok.tar", sample_members("000001"))
    assert [i.error for i in TarShard(name="ok", source=str(intact), path=str(intact))] == [None]


def test_truncated_or_garbled_compressed_tar_reports_an_error(tmp_path):
    import gzip

    make_tar(tmp_path / "plain.tar", [m for i in range(20) for m in sample_members(f"{i:06d}", text="x" * 50)])
    packed = gzip.compress((tmp_path / "plain.tar").read_bytes())
    (tmp_path / "t.tar.gz").write_bytes(packed[: len(packed) // 2])
    shard = expand_shards([str(tmp_path / "t.tar.gz")])[0]
    assert shard.name == "t"
    items = list(shard)
    good = [i for i in items if i.error is None]
    assert 0 < len(good) < 20 and [i.key for i in good] == [f"{i:06d}" for i in range(len(good))]
    assert items[-1].error and len(items) - len(good) == 1
    # junk where the end-of-archive block should be
    make_tar(tmp_path / "g.tar", sample_members("000001"))
    raw = (tmp_path / "g.tar").read_bytes()
    with tarfile.open(tmp_path / "g.tar") as tf:
        end = max(m.offset_data + -(-m.size // 512) * 512 for m in tf.getmembers())
    (tmp_path / "g.tar").write_bytes(raw[:end] + b"\x07garbage" * 100)
    items = list(TarShard(name="g", source=str(tmp_path / "g.tar"), path=str(tmp_path / "g.tar")))
    assert [(i.key, i.error is None) for i in items] == [("000001", True), ("g:tar", False)]


def test_unreadable_tar_gives_a_shard_level_error_item(tmp_path):
    path = tmp_path / "junk.tar"
    path.write_bytes(b"this is not a tar file at all" * 10)
    items = list(expand_shards([str(path)])[0])
    assert len(items) == 1 and items[0].key == "junk:tar" and items[0].error


def test_non_contiguous_duplicate_key_keeps_keys_unique(tmp_path):
    path = make_tar(tmp_path / "d.tar", sample_members("k1") + sample_members("k2") + sample_members("k1"))
    items = list(TarShard(name="d", source=str(path), path=str(path)))
    assert len({i.key for i in items}) == 3
    assert [i.error is None for i in items] == [True, True, False]
    assert "duplicate" in items[2].error


# --------------------------------------------------------------------------------------- parquet


def test_parquet_bytes_column_key_detection_and_null_image(tmp_path):
    red, blue = image_bytes((255, 0, 0)), image_bytes((0, 0, 255), "PNG")
    pq.write_table(pa.table({"id": [10, 11, 12], "caption": ["a", "b", "c"],
                             "jpg": pa.array([red, None, blue], pa.binary())}), tmp_path / "p.parquet")
    shard = expand_shards([str(tmp_path / "p.parquet")])[0]
    assert isinstance(shard, ParquetShard) and shard.size == 3
    assert (shard.image_column, shard.image_kind, shard.key_column) == ("jpg", "bytes", "id")
    items = list(shard)
    assert [i.key for i in items] == ["10", "11", "12"]
    assert items[0].data == red and items[2].data == blue and items[0].path is None
    assert items[1].error and "null" in items[1].error and items[1].data is None
    assert items[1].source == f"{tmp_path / 'p.parquet'}:row 1"


def test_parquet_hf_image_struct_and_row_index_keys(tmp_path):
    red = image_bytes()
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "x.png").write_bytes(image_bytes(fmt="PNG"))
    struct = pa.array([{"bytes": red, "path": "a.jpg"}, {"bytes": None, "path": "imgs/x.png"}, None],
                      pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(pa.table({"image": struct, "text": ["a", "b", "c"]}), tmp_path / "hf.parquet")
    shard = expand_shards([str(tmp_path / "hf.parquet")])[0]
    assert (shard.image_kind, shard.key_column) == ("struct", None)
    items = list(shard)
    assert [i.key for i in items] == ["0", "1", "2"]
    assert items[0].data == red
    assert items[1].path == os.path.join(str(tmp_path), "imgs/x.png") and items[1].data is None
    assert items[2].error


def test_parquet_path_column_relative_to_file_and_urls_not_fetched(tmp_path):
    sub = tmp_path / "meta"
    (sub / "pics").mkdir(parents=True)
    (sub / "pics" / "a.jpg").write_bytes(image_bytes())
    pq.write_table(pa.table({"key": ["a", "b", "c", "d"],
                             "image_path": ["pics/a.jpg", "pics/missing.jpg", "http://example.com/x.jpg", None]}),
                   sub / "index.parquet")
    items = list(expand_shards([str(sub / "index.parquet")])[0])
    assert [i.key for i in items] == ["a", "b", "c", "d"]
    assert items[0].path == os.path.join(str(sub), "pics/a.jpg") and items[0].error is None
    assert "not found" in items[1].error
    assert "URL" in items[2].error and items[2].path is None
    assert items[3].error


def test_parquet_column_overrides_and_detection_errors(tmp_path):
    pq.write_table(pa.table({"url": ["http://x/1.jpg"], "caption": ["c"]}), tmp_path / "meta.parquet")
    with pytest.raises(SourceError, match="url"):
        expand_shards([str(tmp_path / "meta.parquet")])
    pq.write_table(pa.table({"name": ["n1"], "blob": [image_bytes()], "key": ["k"]}), tmp_path / "custom.parquet")
    shard = expand_shards([str(tmp_path / "custom.parquet")], image_column="blob", key_column="name")[0]
    assert [(i.key, i.error) for i in shard] == [("n1", None)]
    with pytest.raises(SourceError, match="nope"):
        expand_shards([str(tmp_path / "custom.parquet")], image_column="blob", key_column="nope")
    with pytest.raises(SourceError, match="image_column="):
        expand_shards([str(tmp_path / "custom.parquet")])


def test_parquet_iterates_in_bounded_record_batches(tmp_path, monkeypatch):
    n = 1000
    table = pa.table({"key": [f"k{i:04d}" for i in range(n)], "bytes": [b"img%d" % i for i in range(n)],
                      "big": ["x" * 100] * n})
    pq.write_table(table, tmp_path / "many.parquet", row_group_size=100)
    calls, consumed = [], []
    original = pq.ParquetFile.iter_batches

    def spy(self, *args, **kwargs):
        calls.append(kwargs)
        for batch in original(self, *args, **kwargs):
            consumed.append(batch.num_rows)
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    monkeypatch.setattr(pq, "read_table", lambda *a, **k: pytest.fail("whole-table read"))
    shard = expand_shards([str(tmp_path / "many.parquet")], parquet_batch_size=64)[0]
    it = iter(shard)
    first = next(it)
    assert first.key == "k0000" and first.data == b"img0"
    assert consumed == [64]  # one batch read so far, not the file
    rest = list(it)
    assert len(rest) == n - 1 and rest[-1].key == "k0999" and rest[-1].data == b"img999"
    assert len(consumed) > 10 and max(consumed) <= 64 and sum(consumed) == n
    assert calls[0]["batch_size"] == 64 and set(calls[0]["columns"]) == {"bytes", "key"}  # "big" not read


def test_corrupt_parquet_is_a_source_error(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 garbage")
    with pytest.raises(SourceError, match="bad.parquet"):
        expand_shards([str(tmp_path / "bad.parquet")])


# ------------------------------------------------------------------------------------------- csv


def test_csv_and_tsv_path_columns(tmp_path):
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "a.jpg").write_bytes(image_bytes())
    (tmp_path / "pics" / "b.png").write_bytes(image_bytes(fmt="PNG"))
    with open(tmp_path / "list.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_id", "file_name", "caption"])
        w.writerows([["1", "pics/a.jpg", "x, y"], ["2", "", "empty"], ["3", str(tmp_path / "pics" / "b.png"), "abs"]])
    (tmp_path / "list.tsv").write_text("path\tcaption\npics/b.png\tb\npics/a.jpg\ta\n")
    csv_shard, tsv_shard = expand_shards([str(tmp_path / "list.csv"), str(tmp_path / "list.tsv")])
    assert isinstance(csv_shard, CsvShard) and csv_shard.name == "list-" + csv_shard.name.split("-")[1]
    assert csv_shard.name != tsv_shard.name  # same stem "list": disambiguated
    assert (csv_shard.path_column, csv_shard.key_column) == ("file_name", "image_id")
    items = list(csv_shard)
    assert [i.key for i in items] == ["1", "2", "3"]
    assert items[0].path == os.path.join(str(tmp_path), "pics/a.jpg") and items[0].error is None
    assert items[1].error and items[1].path is None
    assert items[2].path == str(tmp_path / "pics" / "b.png")
    assert items[0].source.endswith("list.csv:line 2")
    assert [(i.key, os.path.basename(i.path)) for i in tsv_shard] == [("0", "b.png"), ("1", "a.jpg")]
    (tmp_path / "urls.csv").write_text("url,caption\nhttp://x/1.jpg,c\n")
    with pytest.raises(SourceError, match="url"):
        expand_shards([str(tmp_path / "urls.csv")])


# -------------------------------------------------------------------------------------- write-back


def test_write_tar_with_captions_round_trip(tmp_path):
    members = (sample_members("a/000001", text="alt one") + sample_members("a/000002", text="alt two")
               + sample_members("a/000003") + [("a/000004.json", b"{}")])
    src = make_tar(tmp_path / "in.tar", members)
    shard = expand_shards([str(src)])[0]
    captions = {"a/000001": "a red square", "a/000003": ["first caption", "second caption"], "zzz": "unknown key"}
    out = tmp_path / "out" / "in.tar"
    assert write_tar_with_captions(shard, captions, out) == 2
    with tarfile.open(out) as tf:
        names = tf.getnames()
        texts = {n: tf.extractfile(n).read() for n in names}
    assert names == ["a/000001.jpg", "a/000001.json", "a/000001.txt", "a/000003.jpg", "a/000003.json",
                     "a/000003.txt"]
    assert texts["a/000001.txt"] == b"a red square"  # the alt text member is replaced, not duplicated
    assert texts["a/000003.txt"] == b"first caption"
    original = dict(members)
    assert texts["a/000001.jpg"] == original["a/000001.jpg"] and texts["a/000003.json"] == original["a/000003.json"]
    assert os.listdir(tmp_path / "out") == ["in.tar"]  # no temp file left behind

    out_json = tmp_path / "out" / "in-json.tar"
    assert write_tar_with_captions(shard, captions, out_json, suffix="json") == 2
    with tarfile.open(out_json) as tf:
        names = tf.getnames()
        meta = json.loads(tf.extractfile("a/000003.json").read())
        kept_txt = tf.extractfile("a/000001.txt").read()
    assert meta == {"caption": "first caption", "captions": ["first caption", "second caption"]}
    assert kept_txt == b"alt one" and names.count("a/000003.json") == 1
    # the written tar reads back as a shard with the captions in extra
    back = {i.key: i for i in TarShard(name="b", source=str(out), path=str(out))}
    assert set(back) == {"a/000001", "a/000003"} and back["a/000001"].extra["txt"] == b"a red square"


def test_write_back_only_for_tar_shards_and_keeps_old_file_on_failure(tmp_path, monkeypatch):
    (tmp_path / "x.jpg").write_bytes(image_bytes())
    files = expand_shards([str(tmp_path / "x.jpg")])[0]
    with pytest.raises(SourceError, match="tar"):
        write_tar_with_captions(files, {str(tmp_path / "x.jpg"): "c"}, tmp_path / "o.tar")
    src = make_tar(tmp_path / "in.tar", sample_members("k1"))
    shard = expand_shards([str(src)])[0]
    out = tmp_path / "o.tar"
    out.write_bytes(b"previous")

    def boom(*a, **k):
        raise RuntimeError("disk full")
        yield  # pragma: no cover

    monkeypatch.setattr(shard_tar, "_iter_tar_samples", boom)
    with pytest.raises(RuntimeError):
        write_tar_with_captions(shard, {"k1": "c"}, out)
    assert out.read_bytes() == b"previous" and sorted(os.listdir(tmp_path)) == ["in.tar", "o.tar", "x.jpg"]


def test_item_defaults():
    item = Item(key="k", source="s", data=b"x", path=None)
    assert item.ok and item.extra == {} and Item(key="k", source="s", data=None, path=None, error="e").ok is False


def test_csv_shards_read_by_the_one_table_reader(tmp_path):
    # every image-path column name of captioner.data.columns; bad rows become error items with their line
    (tmp_path / "a.jpg").write_bytes(image_bytes())
    long_name = "d/" * 3000 + "x.jpg"
    (tmp_path / "t.csv").write_text(f"img,caption\na.jpg,x\n{long_name},long\n\"a.jpg\",too,many\n\n")
    (shard,) = expand_shards([str(tmp_path / "t.csv")])
    assert shard.path_column == "img"
    items = list(shard)
    assert [i.key for i in items] == ["0", "1", "2"] and items[0].path == os.path.join(str(tmp_path), "a.jpg")
    assert "longer than 4096 bytes" in items[1].error and len(items[1].error) < 300
    assert items[2].source.endswith("t.csv:line 4") and "3 fields" in items[2].error
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(SourceError, match="header"):
        expand_shards([str(tmp_path / "empty.csv")])


def test_folders_walked_the_same_for_captioning_and_shards(tmp_path):
    # one walker: `caption DIR` and `caption DIR --output-dir` see the same files (hidden and macOS debris left out)
    from captioner.data import collect_images

    for name in ("b.jpg", "sub/a.PNG", "._b.jpg", ".hidden/c.jpg", "__MACOSX/d.jpg", "notes.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(image_bytes())
    paths, errors = collect_images([str(tmp_path)])
    (shard,) = expand_shards([str(tmp_path)])
    assert paths == shard.paths == [str(tmp_path / "b.jpg"), str(tmp_path / "sub" / "a.PNG")] and not errors
