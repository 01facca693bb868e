"""Errors reach the user as one line with their exit code: every CaptionerError kind, OS errors (exit 3),
an unreadable sound during training; the library's evaluation workflow; `captioner bench` in-process."""

import json
import sys

import pytest
from PIL import Image

from captioner import errors
from captioner.cli import main
from conftest import tiny_train_argv


def _kinds(cls=errors.CaptionerError):
    for sub in cls.__subclasses__():
        yield sub
        yield from _kinds(sub)


def _score_raising(monkeypatch, exc):
    import captioner.data as sets

    def boom(*a, **k):
        raise exc
    monkeypatch.setattr(sets, "load_references", boom)
    return main(["score", "--predictions", "p.json", "--references", "r.json"])


@pytest.mark.parametrize("kind", sorted({*_kinds()}, key=lambda c: c.__name__), ids=lambda c: c.__name__)
def test_every_captioner_error_is_one_line_with_its_exit_code(kind, monkeypatch, capsys):
    code = _score_raising(monkeypatch, kind("x.wav: not a sound file"))
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["captioner score: error: x.wav: not a sound file"]
    assert code == kind.exit_code == (3 if issubclass(kind, errors.FileSystemError) else 2)


def test_os_errors_are_one_line_with_exit_3(monkeypatch, capsys):
    code = _score_raising(monkeypatch, PermissionError(13, "Permission denied", "/data/refs.json"))
    assert code == 3
    assert capsys.readouterr().err.strip().splitlines() == ["captioner score: error: /data/refs.json: Permission denied"]


def test_writing_under_a_file_is_one_line_with_exit_3(tmp_path, capsys):
    """A real OS error: the scores file is asked for inside a regular file."""
    refs = tmp_path / "refs.json"
    refs.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}],
                                "annotations": [{"id": 1, "image_id": 1, "caption": "a red circle"}]}))
    preds = tmp_path / "preds.json"
    preds.write_text(json.dumps([{"image_id": 1, "caption": "a red circle"}]))
    assert main(["score", "--predictions", str(preds), "--references", str(refs), "-o", str(tmp_path / "s.json")]) == 0
    written = json.loads((tmp_path / "s.json").read_text())
    assert written["corpus"]["Bleu_1"] == pytest.approx(1.0, abs=1e-6)  # the caption is its reference
    assert list(written["per_image"]) == ["1"] and written["predictions"] == str(preds)
    blocker = tmp_path / "file"
    blocker.write_text("")
    code = main(["score", "--predictions", str(preds), "--references", str(refs), "-o", str(blocker / "s.json")])
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # (Java's PTB notes aside)
    assert code == 3 and err == [f"captioner score: error: {blocker}: File exists"]


def test_unreadable_sound_during_training_is_one_line(tmp_path, capsys):
    from captioner.data import read_imagefolder
    from captioner.demo.sounds import make_sounds_dataset
    from captioner.demo.tiny import tiny_clap_config

    sounds = make_sounds_dataset(tmp_path / "sounds", n_train=8, n_val=2, n_test=2, seed=1)
    train_ex, _ = read_imagefolder(sounds, "train")
    bad = train_ex[3].audio
    with open(bad, "r+b") as f:  # a WAV header followed by garbage
        f.seek(12)
        f.write(b"\xff" * 64)
    argv = tiny_train_argv(sounds, tmp_path, train_ex, epochs=1, batch_size=4, extra=[
        "--modalities", "audio", "--audio-config", json.dumps(tiny_clap_config()), "--val-images", "2", "--strict"])
    capsys.readouterr()
    code = main(argv)
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "error" in line]
    assert code == 2 and len(err) == 1 and err[0].startswith("captioner train: error: ") and bad in err[0]


def test_help_lists_exit_codes(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "exit codes: 0 success; 1 some inputs failed" in text and "3 file system error" in text


def test_bench_runs_in_process_without_touching_sys_argv(capsys):
    before = list(sys.argv)
    assert main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: captioner bench") and "--batch-sizes" in out  # eval/bench.py's own options
    assert sys.argv == before


# ------------------------------------------------------------------ evaluation workflow in the library


@pytest.fixture
def shapes_examples(tmp_path):
    from captioner.data import CaptionExample

    out = []
    for i, (color, caption) in enumerate([("red", "a red circle"), ("blue", "a blue square"), ("green", "a green one")]):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (32, 32), color).save(path)
        out.append(CaptionExample(image_id=str(i), image=str(path), captions=[caption, "a shape"], split="test"))
    return out


def test_evaluate_captioner_writes_scores_predictions_and_report(make_captioner, shapes_examples, tmp_path):
    from captioner.config import DecodeConfig
    from captioner.scoring.evaluate import NO_TEXT_TOWER, evaluate_captioner

    cap = make_captioner()
    decode = DecodeConfig(strategy="greedy", max_new_tokens=4)
    ev = evaluate_captioner(cap, shapes_examples, decode=decode, metrics=("BLEU", "CIDEr"), output_dir=tmp_path / "e",
                            info={"model": "tiny"})
    assert NO_TEXT_TOWER in ev.skipped  # a tiny random CLIP has no text tower: said, not silently dropped
    assert [p.name for p in ev.files] == ["scores.json", "predictions.json", "report.html"]
    scores = json.loads((tmp_path / "e" / "scores.json").read_text())
    assert scores["model"] == "tiny" and scores["decode"]["max_new_tokens"] == 4
    assert scores["corpus"] == pytest.approx(ev.result.corpus) and set(scores["per_image"]) == {"0", "1", "2"}
    preds = json.loads((tmp_path / "e" / "predictions.json").read_text())
    assert preds == [{"image_id": k, "caption": v} for k, v in ev.result.predictions.items()]
    assert "a red circle" in (tmp_path / "e" / "report.html").read_text()


def test_ablation_is_refused_before_captioning_without_naming_flags(make_captioner, shapes_examples, monkeypatch):
    from captioner.scoring.evaluate import evaluate_captioner

    cap = make_captioner()
    monkeypatch.setattr(cap, "evaluate", lambda *a, **k: pytest.fail("captioned before refusing"))
    with pytest.raises(errors.ConfigError, match="two inputs") as e:
        evaluate_captioner(cap, shapes_examples, ablate=True)
    assert "--" not in str(e.value)


def test_clip_scorer_for_takes_a_model_with_random_weights(make_captioner, tmp_path):
    from captioner.scoring.evaluate import clip_scorer_for

    from test_cli import TINY_SCORE_CLIP

    clip_json = tmp_path / "score_clip.json"
    clip_json.write_text(json.dumps(TINY_SCORE_CLIP))
    scorer, note = clip_scorer_for(make_captioner(), model=str(clip_json), pretrained="none")  # as the CLI passes it
    assert note is None and scorer is not None
