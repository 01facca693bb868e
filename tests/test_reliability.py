"""Killed jobs: batch captioning and training survive SIGKILL at random points and resume exactly."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from captioner.demo.shapes import make_shapes_dataset
from captioner.demo.tiny import TINY_CLIP, tiny_gpt2

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer):
    from captioner.api import Captioner
    from captioner.demo.tiny import tiny_config
    import torch

    root = tmp_path_factory.mktemp("rel")
    data = make_shapes_dataset(root / "data", n_train=40, n_val=8, n_test=0, seed=2)
    torch.manual_seed(0)
    Captioner.from_config(tiny_config(tokenizer), tokenizer=tokenizer, device="cpu").save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "tok")
    return root, data


def _lines(path):
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def test_caption_killed_at_random_points_resumes_exactly_once(setup, tmp_path):
    root, data = setup
    images = sorted(str(p) for p in (data / "train").glob("*.png"))
    out = tmp_path / "captions.jsonl"
    cmd = [sys.executable, "-m", "captioner", "caption", str(data / "train"), "--model", str(root / "model"),
           "-o", str(out), "--resume", "--batch-size", "2", "--strategy", "greedy", "--max-new-tokens", "25"]
    rng = random.Random(1234)
    counts = []
    for trial in range(10):
        before = _lines(out)
        target = before + rng.randrange(0, max(1, (len(images) - before) // 3))  # a point in this run
        proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while proc.poll() is None and _lines(out) < target and time.time() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.03))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        counts.append(_lines(out))
    final = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=120)
    assert final.returncode == 0, final.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]  # every line parses
    seen = [r["image"] for r in rows]
    assert sorted(seen) == images  # each image exactly once: nothing lost, nothing duplicated
    assert len(set(counts)) > 3 and 0 < max(counts) < len(images)  # kills landed at many points mid-run
    assert "skipped (already in the output)" in final.stderr


def test_resume_cuts_half_written_line_and_errors_file(setup, tmp_path):
    from captioner.cli import main

    root, data = setup
    images = sorted(str(p) for p in (data / "train").glob("*.png"))[:4]
    out = tmp_path / "c.jsonl"
    out.write_text(json.dumps({"image": images[0], "caption": "x"}) + "\n" + '{"image": "' + images[1][:10])
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"")
    assert main(["caption", *images, str(bad), "--model", str(root / "model"), "-o", str(out), "--resume",
                 "--strategy", "greedy", "--max-new-tokens", "5"]) == 1
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["image"] for r in rows] == images  # the cut line's image was captioned again
    assert rows[0]["caption"] == "x"  # earlier results are kept
    errors = [json.loads(line) for line in Path(f"{out}.errors.jsonl").read_text().splitlines()]
    assert [e["image"] for e in errors] == [str(bad)] and "bad.png" in errors[0]["error"]
    assert main(["caption", images[0], "--model", str(root / "model"), "-o", str(out)]) == 2  # no silent overwrite
    # resuming a finished run has nothing left to caption: success, file unchanged
    before = out.read_text()
    assert main(["caption", *images, "--model", str(root / "model"), "-o", str(out), "--resume"]) == 0
    assert out.read_text() == before


def test_training_killed_during_checkpoint_write_resumes(setup, tmp_path, tokenizer):
    root, data = setup
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "captioner", "train", "--data", str(data), "--output-dir", str(out), "--epochs", "3",
           "--batch-size", "16", "--lr", "2e-3", "--val-images", "0", "--log-every", "1", "--save-every", "3",
           "--clip-config", json.dumps(TINY_CLIP), "--clip-pretrained", "none", "--tokenizer", str(root / "tok"),
           "--lm-config", json.dumps(tiny_gpt2(len(tokenizer))), "--finetune-lm", "--prefix-length", "4", "--resume"]
    # 1) kill while a checkpoint is being written (state.tmp exists), 2) kill at a random later moment
    for wait_for in ("state.tmp", "random"):
        proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        if wait_for == "state.tmp":
            while proc.poll() is None and not (out / "state.tmp").exists() and time.time() < deadline:
                time.sleep(0.001)
        else:
            while proc.poll() is None and not (out / "state").exists() and time.time() < deadline:
                time.sleep(0.01)
            time.sleep(random.Random(7).uniform(0.5, 2.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
    saved = [out / n / "progress.json" for n in ("state", "state.old") if (out / n / "progress.json").exists()]
    resumed_from = json.loads(saved[0].read_text())["step"] if saved else 0
    final = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr[-3000:]
    assert f"at step {resumed_from}" in final.stderr or resumed_from == 0
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    n_pairs = sum(len(json.loads(x)["captions"]) for x in (data / "train" / "metadata.jsonl").open())
    total = 3 * -(-n_pairs // 16)
    assert steps[-1] == total and set(steps) == set(range(1, total + 1))  # every step ran; none is missing
    from captioner.api import Captioner
    Captioner.from_pretrained(out / "last", device="cpu")  # the final checkpoint loads (strict)


def test_pixel_limit_is_configurable_from_the_cli(setup, tmp_path, capsys):
    from captioner.cli import main

    root, data = setup
    image = sorted((data / "train").glob("*.png"))[0]  # 64 x 64 = 4096 pixels
    out = tmp_path / "c.jsonl"
    assert main(["caption", str(image), "--model", str(root / "model"), "-o", str(out), "--max-pixels", "4000",
                 "--strategy", "greedy", "--max-new-tokens", "3"]) == 1
    assert "too large (64 x 64 pixels > limit 4000" in capsys.readouterr().err
    assert main(["caption", str(image), "--model", str(root / "model"), "-o", str(out), "--overwrite",
                 "--max-pixels", "4096", "--strategy", "greedy", "--max-new-tokens", "3"]) == 0


def test_batch_with_many_kinds_of_bad_images(setup, tmp_path, capsys):
    """Good and bad files mixed in the same batches: every good one captioned, every bad one listed."""
    from test_images import _bad_files, _good_files

    from captioner.cli import main

    root, _ = setup
    bad = _bad_files(tmp_path)
    good = [path for path, _, _ in _good_files(tmp_path)]
    assert len({reason for _, reason in bad}) >= 15
    mixed = [str(p) for pair in zip(good, [p for p, _ in bad]) for p in pair]
    mixed += [str(p) for p in good[len(bad):]] + [str(p) for p, _ in bad[len(good):]]
    out = tmp_path / "c.jsonl"
    assert main(["caption", *mixed, "--model", str(root / "model"), "-o", str(out), "--batch-size", "8",
                 "--strategy", "greedy", "--max-new-tokens", "3"]) == 1
    captioned = [json.loads(x)["image"] for x in out.read_text().splitlines()]
    assert sorted(captioned) == sorted(str(p) for p in good)
    errors = {e["image"]: e["error"] for e in map(json.loads, Path(f"{out}.errors.jsonl").read_text().splitlines())}
    assert set(errors) == {str(p) for p, _ in bad}
    for path, reason in bad:
        if reason == "is a directory":  # the CLI takes folders as inputs: an empty one is reported as such
            reason = "folder holds no images"
        assert errors[str(path)].startswith(f"{path}: {reason}"), (errors[str(path)], reason)
    err = capsys.readouterr().err
    assert f"{len(bad)} input(s) failed" in err and f"captioned {len(good)} input(s)" in err
