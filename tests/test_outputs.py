"""Result files and the caption-to-file workflow: nothing modified before it is known to be ours, inputs
never overwritten, any file name round-trips, one writer at a time, resume by resolved path."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from captioner.errors import OutputError
from captioner.shards.caption_file import caption_to_file
from captioner.shards.outputs import ErrorLog, ResultWriter

GREEDY = ["--strategy", "greedy", "--max-new-tokens", "3"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    import torch

    from captioner.api import Captioner
    from captioner.demo.tiny import tiny_config

    root = tmp_path_factory.mktemp("outputs")
    torch.manual_seed(0)
    Captioner.from_config(tiny_config(tokenizer), tokenizer=tokenizer, device="cpu").save_pretrained(root / "model")
    return root / "model"


@pytest.fixture(scope="module")
def captioner(model_dir):
    from captioner.api import Captioner

    return Captioner.from_pretrained(model_dir, device="cpu")


def _images(folder: Path, names) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, name in enumerate(names):
        path = os.path.join(os.fsencode(folder), name) if isinstance(name, bytes) else str(folder / name)
        Image.new("RGB", (32, 32), (40 * i, 90, 200 - 30 * i)).save(path, format="PNG")
        paths.append(os.fsdecode(path))
    return paths


def _caption(captioner, items, output, **kw):
    from captioner.config import DecodeConfig

    return caption_to_file(captioner, items, output, decode=DecodeConfig(strategy="greedy", max_new_tokens=3),
                           batch_size=2, **kw)


def _rows(path: Path) -> list[dict]:
    text = path.read_bytes().decode("utf-8")  # strict: result files are valid UTF-8
    return [json.loads(line) for line in text.split("\n") if line]


# ------------------------------------------------------------------------------ library workflow

def test_caption_to_file_counts_resume_and_errors(captioner, tmp_path):
    images = _images(tmp_path / "imgs", ["a.png", "b.png", "c.png", "d.png"])
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    out = tmp_path / "out.jsonl"
    first = _caption(captioner, images[:3], out)
    assert (first.captioned, first.failed, first.skipped) == (3, 0, 0)
    second = _caption(captioner, [*images, str(bad)], out, resume=True)
    assert (second.captioned, second.failed, second.skipped) == (1, 1, 3)
    assert [r["image"] for r in _rows(out)] == images
    assert second.errors_path == Path(f"{out}.errors.jsonl")
    assert [e["image"] for e in _rows(second.errors_path)] == [str(bad)]
    with pytest.raises(OutputError, match="exists"):
        _caption(captioner, images, out)


def test_resume_matches_inputs_by_resolved_path(captioner, tmp_path, monkeypatch):
    images = _images(tmp_path / "imgs", ["a.png", "b.png"])
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out.jsonl"
    _caption(captioner, [os.path.join("imgs", "a.png"), os.path.join("imgs", "b.png")], out)
    again = _caption(captioner, images, out, resume=True)  # absolute paths this time
    assert (again.captioned, again.skipped) == (0, 2)
    assert len(_rows(out)) == 2


# --------------------------------------------------------------- nothing modified that is not ours

NOT_OURS = {
    "image": (b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, "out.jsonl"),
    "json without newline": (b'{"a": 1}', "out.jsonl"),
    "jsonl of other rows": (b'{"image": "x.png", "caption": "a"}\n{"id": 3}\n', "out.jsonl"),
    "csv of another kind": (b"id,label\n1,cat\n", "out.csv"),
}


@pytest.mark.parametrize("kind", sorted(NOT_OURS))
def test_resume_refuses_files_that_are_not_ours_and_leaves_them_intact(tmp_path, kind):
    data, name = NOT_OURS[kind]
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(OutputError, match="left untouched"):
        ResultWriter(path, resume=True)
    assert path.read_bytes() == data


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_resume_cuts_only_a_killed_write_of_our_rows(tmp_path, fmt):
    path = tmp_path / f"out.{fmt}"
    writer = ResultWriter(path)
    writer.add("a.png", ["x"])
    writer.close()
    whole = path.read_bytes()
    path.write_bytes(whole + (b'{"image": "b.p' if fmt == "jsonl" else b'b.png,"half'))
    writer = ResultWriter(path, resume=True)
    assert writer.done == {"a.png"}
    writer.close()
    assert path.read_bytes() == whole


def test_output_or_errors_file_that_is_an_input_is_refused(captioner, tmp_path):
    images = _images(tmp_path / "imgs", ["a.png", "b.png"])
    before = Path(images[0]).read_bytes()
    with pytest.raises(OutputError, match="one of the inputs"):
        _caption(captioner, images, images[0], overwrite=True)
    with pytest.raises(OutputError, match="one of the inputs"):
        _caption(captioner, images, tmp_path / "out.jsonl", errors=images[1], overwrite=True)
    with pytest.raises(OutputError, match="cannot be the output"):
        _caption(captioner, images, tmp_path / "out.jsonl", errors=tmp_path / "out.jsonl")
    alias = tmp_path / "alias.png"
    os.link(images[0], alias)  # the same file under another name
    with pytest.raises(OutputError, match="one of the inputs"):
        _caption(captioner, images, alias, resume=True)
    assert Path(images[0]).read_bytes() == before and not (tmp_path / "out.jsonl").exists()


def test_cli_resume_into_an_input_image_leaves_it_intact(model_dir, tmp_path, capsys):
    from captioner.cli import main

    images = _images(tmp_path / "imgs", ["a.png", "b.png"])
    before = Path(images[0]).read_bytes()
    assert main(["caption", *images, "--model", str(model_dir), "-o", images[0], "--resume", *GREEDY]) == 2
    err = capsys.readouterr().err.strip()
    assert "one of the inputs" in err and len(err.splitlines()) == 1
    assert Path(images[0]).read_bytes() == before
    other = tmp_path / "photo.png"  # not an input, still not a result file
    other.write_bytes(before)
    assert main(["caption", images[1], "--model", str(model_dir), "-o", str(other), "--resume", *GREEDY]) == 2
    assert other.read_bytes() == before


def test_errors_file_follows_the_output_rules(captioner, tmp_path):
    images = _images(tmp_path / "imgs", ["a.png"])
    precious = tmp_path / "notes.txt"
    precious.write_bytes(b"my notes, not an errors file")
    with pytest.raises(OutputError, match="exists"):
        _caption(captioner, images, tmp_path / "out.jsonl", errors=precious)
    with pytest.raises(OutputError, match="left untouched"):
        _caption(captioner, images, tmp_path / "out2.jsonl", errors=precious, resume=True)
    assert precious.read_bytes() == b"my notes, not an errors file"
    log = tmp_path / "errors.jsonl"
    log.write_text('{"image": "old.png", "error": "old.png: not an image"}\n')
    result = _caption(captioner, images, tmp_path / "out3.jsonl", errors=log, resume=True)
    assert result.captioned == 1 and not log.exists()  # ours: replaced by this run's (no) failures: removed
    with pytest.raises(OutputError, match="left untouched"):
        ErrorLog(images[0], resume=True)


def test_a_second_writer_is_refused_while_the_first_holds_the_file(tmp_path):
    out = tmp_path / "out.jsonl"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom captioner.shards.outputs import ResultWriter\n"
                               f"w = ResultWriter({str(out)!r})\nprint('locked', flush=True)\ntime.sleep(60)"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputError, match="in use by another process"):
            ResultWriter(out, resume=True)
    finally:
        holder.kill()
        holder.wait()
    ResultWriter(out, resume=True).close()  # the lock ends with its process


# ------------------------------------------------------------------------------ unusual file names

def test_name_that_is_not_utf8_round_trips_and_does_not_stop_the_run(model_dir, tmp_path, capsys):
    from captioner.cli import main

    folder = tmp_path / "imgs"
    _images(folder, [b"\xff.png", "good.png"])
    (folder / os.fsdecode(b"bad\xfe.png")).write_bytes(b"")
    for fmt in ("jsonl", "csv"):
        out = tmp_path / f"out.{fmt}"
        assert main(["caption", str(folder), "--model", str(model_dir), "-o", str(out), *GREEDY]) == 1
        if fmt == "jsonl":
            names = {os.fsencode(r["image"]) for r in _rows(out)}
            assert b"\\udcff" in out.read_bytes()  # the documented escape of byte 0xff
        else:
            import csv
            lines = out.read_bytes().decode("utf-8", "surrogateescape").splitlines()
            names = {os.fsencode(r[0]) for r in list(csv.reader(lines))[1:]}
        assert names == {os.path.join(os.fsencode(folder), n) for n in (b"\xff.png", b"good.png")}
        errors = _rows(Path(f"{out}.errors.jsonl"))
        assert [os.fsencode(e["image"]) for e in errors] == [os.path.join(os.fsencode(folder), b"bad\xfe.png")]
        capsys.readouterr()
        assert main(["caption", str(folder), "--model", str(model_dir), "-o", str(out), "--resume", *GREEDY]) == 1
        assert "captioned 0 input(s), 1 failed, 2 skipped" in capsys.readouterr().err


def test_names_with_line_separators_survive_writing_resume_and_old_files(captioner, tmp_path):
    images = _images(tmp_path / "imgs", ["a\u2028b.png", "c\x85d.png", "e\u2029f.png"])
    out = tmp_path / "out.jsonl"
    assert _caption(captioner, images, out).captioned == 3
    assert "\u2028".encode() not in out.read_bytes()  # escaped on write
    assert [r["image"] for r in _rows(out)] == images
    # a file written raw (by an older version) is read by "\n" only
    out.write_bytes(b"".join(json.dumps({"image": p, "caption": "x"}, ensure_ascii=False).encode() + b"\n"
                             for p in images))
    again = _caption(captioner, images, out, resume=True)
    assert (again.captioned, again.skipped) == (0, 3)


def test_os_errors_are_file_system_errors(captioner, tmp_path):
    from captioner.errors import FileSystemError

    images = _images(tmp_path / "imgs", ["a.png"])
    (tmp_path / "a-file").write_text("")
    with pytest.raises(FileSystemError, match="a-file.*cannot create"):  # (a missing folder is created)
        _caption(captioner, images, tmp_path / "a-file" / "sub" / "out.jsonl")
    from captioner.shards.merge import merge
    with pytest.raises(OutputError, match="no such folder"):
        merge(tmp_path / "no-such-run")


def test_clean_run_leaves_no_errors_file_and_removes_a_stale_one(captioner, tmp_path):
    images = _images(tmp_path / "imgs", ["a.png", "b.png"])
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    out = tmp_path / "out.jsonl"
    errors = Path(f"{out}.errors.jsonl")
    first = _caption(captioner, images, out)
    assert first.failed == 0 and first.errors_path is None and not errors.exists()
    failed = _caption(captioner, [str(bad)], out, resume=True)
    assert failed.errors_path == errors and [e["image"] for e in _rows(errors)] == [str(bad)]
    bad.unlink()
    _images(tmp_path, ["bad.png"])  # fixed: the next run captions it, and the stale errors file goes
    fixed = _caption(captioner, [*images, str(bad)], out, overwrite=True)
    assert (fixed.captioned, fixed.failed) == (3, 0) and not errors.exists()
    precious = tmp_path / "notes.jsonl"
    precious.write_text("not ours\n")
    with pytest.raises(OutputError, match="left untouched"):
        _caption(captioner, images, tmp_path / "out2.jsonl", errors=precious, resume=True)
    assert precious.read_text() == "not ours\n"  # a file not ours is never removed


def test_missing_output_folders_are_created(model_dir, tmp_path, capsys):
    from captioner.cli import main

    images = _images(tmp_path / "imgs", ["a.png"])
    out = tmp_path / "new" / "deeper" / "caps.jsonl"
    assert main(["caption", *images, "--model", str(model_dir), "-o", str(out), *GREEDY]) == 0
    assert [r["image"] for r in _rows(out)] == images
    errors = tmp_path / "elsewhere" / "errs.jsonl"
    assert main(["caption", *images, str(tmp_path / "nope.png"), "--model", str(model_dir), "-o",
                 str(tmp_path / "b" / "caps.csv"), "--errors", str(errors), *GREEDY]) == 1
    assert [e["image"] for e in _rows(errors)] == [str(tmp_path / "nope.png")]
