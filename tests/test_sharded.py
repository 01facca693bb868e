"""Sharded captioning: two processes == one process, kill + rerun, per-key errors, merge."""

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import pytest
from PIL import Image

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _jpeg(color):
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), color).save(buf, format="JPEG")
    return buf.getvalue()


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer):
    import torch

    from captioner.api import Captioner
    from captioner.demo.tiny import tiny_config

    root = tmp_path_factory.mktemp("sharded")
    torch.manual_seed(0)
    Captioner.from_config(tiny_config(tokenizer), tokenizer=tokenizer, device="cpu").save_pretrained(root / "model")
    (root / "shards").mkdir()
    for s in range(4):
        with tarfile.open(root / "shards" / f"{s:05d}.tar", "w") as tar:
            for i in range(6):
                key = f"{s:02d}{i:04d}"
                _add(tar, f"{key}.jpg", _jpeg((40 * i, 60 * s, 100)))
                _add(tar, f"{key}.json", json.dumps({"i": i}).encode())
    return root


def _cmd(root, out, *extra, procs=1):
    base = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port",
            "29531"] if procs > 1 else [sys.executable]
    return [*base, "-m", "captioner", "caption", str(root / "shards" / "{00000..00003}.tar"), "--model",
            str(root / "model"), "--output-dir", str(out), "--strategy", "greedy", "--max-new-tokens", "12",
            "--batch-size", "4", "--num-workers", "1", *extra]


def _merged(out):
    return [json.loads(x) for x in (out / "captions.jsonl").read_text().splitlines()]


def test_two_processes_equal_one_process_each_key_once(setup, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = subprocess.run(_cmd(setup, one), env=ENV, capture_output=True, text=True, timeout=300)
    assert r1.returncode == 0, r1.stderr[-2000:]
    r2 = subprocess.run(_cmd(setup, two, procs=2), env=ENV, capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0, r2.stderr[-2000:]
    assert "[rank 0/2]" in r2.stderr and "[rank 1/2]" in r2.stderr
    a, b = _merged(one), _merged(two)
    keys = [r["key"] for r in b]
    assert len(keys) == len(set(keys)) == 24
    assert {(r["key"], r["caption"]) for r in a} == {(r["key"], r["caption"]) for r in b}
    index = json.loads((two / "index.json").read_text())
    assert index["rows"] == 24 and len(index["shards"]) == 4
    assert all(r["source"].endswith(".jpg") for r in b)


def test_killed_run_resumes_without_duplicates_and_keeps_done_shards(setup, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen(_cmd(setup, out, "--batch-size", "1"), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        done = list((out / "shards").glob("*.done")) if (out / "shards").exists() else []
        partial = (out / "shards" / "00001.jsonl")
        if done and partial.exists() and partial.read_bytes().count(b"\n") >= 2:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("*") if p.suffix in (".done", ".jsonl")
                and (out / "shards" / (p.stem + ".done")).exists()}
    assert finished and not (out / "captions.jsonl").exists()
    r = subprocess.run(_cmd(setup, out), env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "already done" in r.stderr
    for name, mtime in finished.items():
        assert (out / "shards" / name).stat().st_mtime_ns == mtime  # finished shards untouched
    keys = [row["key"] for row in _merged(out)]
    assert len(keys) == len(set(keys)) == 24
    # the merge is idempotent
    before = (out / "captions.jsonl").read_bytes()
    from captioner.cli import main
    assert main(["merge", str(out)]) == 0
    assert (out / "captions.jsonl").read_bytes() == before


def test_bad_members_reported_per_key_and_shard_continues(setup, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    with tarfile.open(bad / "00000.tar", "w") as tar:
        _add(tar, "good1.jpg", _jpeg((255, 0, 0)))
        _add(tar, "broken.jpg", b"definitely not a jpeg")
        _add(tar, "noimage.json", b"{}")
        _add(tar, "trunc.jpg", _jpeg((0, 255, 0))[:100])
        _add(tar, "good2.png", _jpeg((0, 0, 255)))  # JPEG bytes with a .png name still decode
    out = tmp_path / "out"
    from captioner.cli import main
    code = main(["caption", str(bad / "00000.tar"), "--model", str(setup / "model"), "--output-dir", str(out),
                 "--strategy", "greedy", "--max-new-tokens", "5", "--num-workers", "0", "--write-shards", "txt"])
    assert code == 1  # some items failed
    rows = {r["key"] for r in _merged(out)}
    assert rows == {"good1", "good2"}
    errors = {json.loads(x)["key"]: json.loads(x)["error"] for x in
              (out / "shards" / "00000.errors.jsonl").read_text().splitlines()}
    assert set(errors) == {"broken", "noimage", "trunc"}
    assert "no image member" in errors["noimage"]
    with tarfile.open(out / "wds" / "00000.tar") as tar:
        names = set(tar.getnames())
    assert {"good1.txt", "good1.jpg", "good2.txt"} <= names and "broken.txt" not in names


def test_jpegs_decoded_on_device_give_the_same_rows_and_errors(setup, tmp_path, monkeypatch):
    """--jpeg-on-device (run here on CPU): tar members that are plain JPEGs go to the batched decoder; the
    merged captions and the per-key errors equal the PIL path's."""
    from captioner.cli import main
    from captioner.inputs.jpeg import JpegPipeline

    bad = tmp_path / "bad"
    bad.mkdir()
    with tarfile.open(bad / "00000.tar", "w") as tar:
        for i in range(5):
            _add(tar, f"good{i}.jpg", _jpeg((50 * i, 20, 200 - 30 * i)))
        _add(tar, "broken.jpg", b"definitely not a jpeg")
        _add(tar, "trunc.jpg", _jpeg((0, 255, 0))[:100])
    decoded = []
    call = JpegPipeline.__call__
    monkeypatch.setattr(JpegPipeline, "__call__", lambda self, datas, names: decoded.extend(names) or
                        call(self, datas, names))
    results = {}
    for flag in ("--no-jpeg-on-device", "--jpeg-on-device"):
        out = tmp_path / flag
        main(["caption", str(bad / "00000.tar"), "--model", str(setup / "model"), "--output-dir", str(out),
              "--strategy", "greedy", "--max-new-tokens", "6", "--num-workers", "1", "--batch-size", "3", flag])
        errors = (out / "shards" / "00000.errors.jsonl").read_text().splitlines()
        results[flag] = ([(r["key"], r["caption"]) for r in _merged(out)], sorted(errors))
    assert results["--jpeg-on-device"] == results["--no-jpeg-on-device"]
    assert len(results["--jpeg-on-device"][0]) == 5 and len(results["--jpeg-on-device"][1]) == 2
    assert decoded == [f"{bad / '00000.tar'}:good{i}.jpg" for i in range(5)]  # the damaged ones went to PIL


# ------------------------------------------------------------------ shard plan and merge

def _loose(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        path = os.path.join(os.fsencode(folder), name) if isinstance(name, bytes) else str(folder / name)
        with open(path, "wb") as f:
            f.write(_jpeg((20 * i, 100, 50)))


def _run_in_process(setup, inputs, out, *extra):
    from captioner.cli import main

    return main(["caption", *map(str, inputs), "--model", str(setup / "model"), "--output-dir", str(out),
                 "--strategy", "greedy", "--max-new-tokens", "3", "--batch-size", "4", "--num-workers", "0", *extra])


def test_rerun_with_changed_inputs_redoes_changed_shards_and_keeps_each_key_once(setup, tmp_path):
    folder, out = tmp_path / "imgs", tmp_path / "out"
    _loose(folder, [f"{i:02d}.jpg" for i in range(6)])
    assert _run_in_process(setup, [folder], out, "--files-per-shard", "4") == 0
    first = {r["key"]: r["caption"] for r in _merged(out)}
    _loose(folder, [f"{i:02d}.jpg" for i in range(6, 9)])  # files added to the folder
    assert _run_in_process(setup, [folder], out, "--files-per-shard", "4") == 0
    keys = [r["key"] for r in _merged(out)]
    assert sorted(keys) == sorted(str(folder / f"{i:02d}.jpg") for i in range(9))  # nothing missing, none twice
    assert {k: c for k, c in ((r["key"], r["caption"]) for r in _merged(out)) if k in first} == first
    assert _run_in_process(setup, [folder], out, "--files-per-shard", "2") == 0  # another shard size
    keys = [r["key"] for r in _merged(out)]
    assert len(keys) == len(set(keys)) == 9
    assert sorted(p.name for p in (out / "shards").glob("*.done")) == [f"files-{i:05d}.done" for i in range(5)]
    from captioner.shards.merge import read_index
    assert read_index(out)["rows"] == 9


def test_sharded_names_that_are_not_utf8_or_hold_line_separators(setup, tmp_path):
    folder, out = tmp_path / "imgs", tmp_path / "out"
    _loose(folder, [b"\xff.jpg", "a\u2028b.jpg", "c\x85d.jpg", "plain.jpg"])
    (folder / os.fsdecode(b"bad\xfe.jpg")).write_bytes(b"")
    assert _run_in_process(setup, [folder], out) == 1  # the bad file fails, the shard finishes
    keys = {os.fsencode(r["key"]) for r in _merged(out)}
    assert keys == {os.path.join(os.fsencode(folder), n)
                    for n in (b"\xff.jpg", "a\u2028b.jpg".encode(), "c\x85d.jpg".encode(), b"plain.jpg")}
    errors = [json.loads(x) for x in (out / "shards" / "files-00000.errors.jsonl").read_bytes().split(b"\n") if x]
    assert [os.fsencode(e["key"]) for e in errors] == [os.path.join(os.fsencode(folder), b"bad\xfe.jpg")]
    before = (out / "captions.jsonl").read_bytes()
    assert _run_in_process(setup, [folder], out) == 0  # the rerun reads every shard file back
    assert (out / "captions.jsonl").read_bytes() == before


def _fake_run(out, shards):
    """A finished sharded run written by hand: {shard name: [rows]}."""
    from captioner.shards.merge import prepare_shard, write_plan

    (out / "shards").mkdir(parents=True)
    plan = [{"name": name, "source": f"{name}.tar", "fingerprint": f"fp-{name}"} for name in shards]
    write_plan(out, plan)
    for entry in plan:
        prepare_shard(out, entry)
        name = entry["name"]
        (out / "shards" / f"{name}.jsonl").write_bytes(b"".join(
            json.dumps(row, ensure_ascii=False).encode() + b"\n" for row in shards[name]))
        (out / "shards" / f"{name}.done").write_text(json.dumps({"shard": name, "source": f"{name}.tar", "failed": 0}))
    return plan


def _rows(shard, n, caption="a caption"):
    return [{"key": f"{shard}-{i}", "source": f"{shard}.tar:{i}.jpg", "caption": caption} for i in range(n)]


def test_merge_bad_inputs_are_one_line_each(tmp_path, capsys):
    from captioner.cli import main

    assert main(["merge", str(tmp_path / "missing")]) == 2
    assert main(["merge", str(tmp_path)]) == 2  # a folder that is not a run
    out = tmp_path / "run"
    _fake_run(out, {"s0": _rows("s0", 3), "s1": _rows("s1", 3)})
    (out / "shards" / "s1.done").write_text("{not json")
    assert main(["merge", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len([x for x in err if x.startswith("captioner merge: error:")]) == 3 and "Traceback" not in "".join(err)
    assert "missing: no such folder" in err[0] and "shards.json" in err[1] and "s1.done" in err[-1]
    (out / "shards" / "s1.done").write_text(json.dumps({"shard": "s1", "source": "s1.tar", "failed": 0}))
    with open(out / "shards" / "s1.jsonl", "ab") as f:
        f.write(b"garbage\n")
    assert main(["merge", str(out)]) == 2
    assert "s1.jsonl:4: not a JSON line" in capsys.readouterr().err
    assert not (out / "captions.jsonl").exists() and not list(out.glob(".*.tmp"))  # nothing half-written


def test_merge_is_streamed_keys_once_and_the_pair_checked(tmp_path, monkeypatch):
    import tracemalloc

    from captioner.shards import merge as merging

    out = tmp_path / "run"
    shards = {f"s{s}": _rows(f"s{s}", 1500, caption="x" * 500) for s in range(4)}
    shards["s0"] += shards["s0"][:5]  # a key written twice (e.g. by an old version) is merged once
    _fake_run(out, shards)
    (out / ".captions.jsonl.1234.tmp").write_text("left by a killed merge")
    import logging
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # earlier CLI tests left handlers on closed streams
    tracemalloc.start()
    index = merging.merge(out)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    total = sum((out / "shards" / f"{n}.jsonl").stat().st_size for n in shards)
    assert peak < total / 4, (peak, total)  # never all rows in memory
    assert index["rows"] == 6000 and merging.read_index(out) == index
    assert not (out / ".captions.jsonl.1234.tmp").exists()
    # killed between the two renames: new captions, old index -> detected, and the next merge repairs it
    (out / "shards" / "s3.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows("s3", 2)))
    real = merging.atomic_write

    def killed(path, data, **kw):
        if path.name == "index.json":
            raise KeyboardInterrupt
        return real(path, data, **kw)

    monkeypatch.setattr(merging, "atomic_write", killed)
    with pytest.raises(KeyboardInterrupt):
        merging.merge(out)
    with pytest.raises(merging.OutputError, match="merge was interrupted"):
        merging.read_index(out)
    monkeypatch.setattr(merging, "atomic_write", real)
    assert merging.merge(out)["rows"] == 4502 and merging.read_index(out)["rows"] == 4502


def test_stale_shard_outputs_are_not_merged(tmp_path):
    from captioner.shards.merge import merge, prepare_shard, write_plan

    out = tmp_path / "run"
    plan = _fake_run(out, {"s0": _rows("s0", 2), "s1": _rows("s1", 2)})
    changed = [plan[0], {**plan[1], "fingerprint": "other"}]
    write_plan(out, changed[:1] + changed[1:])
    assert merge(out) is None  # s1's outputs belong to other inputs: pending, not merged
    assert not prepare_shard(out, changed[1]) and not (out / "shards" / "s1.jsonl").exists()
    write_plan(out, changed[:1])  # s1 dropped from the plan: its files go
    assert not list((out / "shards").glob("s1.*")) and merge(out)["rows"] == 2


def test_shard_fingerprint_follows_content(tmp_path):
    from captioner.shards.merge import shard_fingerprint
    from captioner.shards.sources import FileShard, TarShard

    files = FileShard(name="files-00000", source="a", paths=["a.jpg", "b.jpg"])
    assert shard_fingerprint(files) != shard_fingerprint(FileShard(name="files-00000", source="a",
                                                                   paths=["a.jpg", "b.jpg", "c.jpg"]))
    tar = tmp_path / "00000.tar"
    with tarfile.open(tar, "w") as t:
        _add(t, "k1.jpg", _jpeg((1, 2, 3)))
    before = shard_fingerprint(TarShard(name="00000", source=str(tar), path=str(tar)))
    assert before == shard_fingerprint(TarShard(name="00000", source=str(tar), path=str(tar)))
    with tarfile.open(tar, "w") as t:  # rewritten with another sample
        _add(t, "k1.jpg", _jpeg((1, 2, 3)))
        _add(t, "k2.jpg", _jpeg((4, 5, 6)))
    assert shard_fingerprint(TarShard(name="00000", source=str(tar), path=str(tar))) != before
