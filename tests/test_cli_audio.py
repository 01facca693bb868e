"""CLI with audio: train an image+audio captioner on generated scenes (feature cache for both inputs),
caption sounds, images and pairs, evaluate from one input, and refuse audio for an image-only model."""

import json
from pathlib import Path

import pytest

from captioner.cli import main
from captioner.data import read_imagefolder
from captioner.demo.sounds import make_scenes_dataset
from conftest import tiny_train_argv


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return make_scenes_dataset(tmp_path_factory.mktemp("scenes"), n_train=108, n_val=12, n_test=12, seed=3)


@pytest.fixture(scope="module")
def run(scenes, tmp_path_factory):
    root = tmp_path_factory.mktemp("audio_cli")
    from captioner.demo.tiny import tiny_clap_config

    train_ex, _ = read_imagefolder(scenes, "train")
    argv = tiny_train_argv(scenes, root, train_ex, epochs=1, batch_size=32, extra=[
        "--modalities", "image,audio", "--modality-dropout", "0.5", "--audio-config", json.dumps(tiny_clap_config()),
        "--val-images", "8", "--feature-cache", str(root / "cache"), "--num-workers", "0"])
    assert main(argv) == 0
    return root, argv


def test_training_caches_image_and_audio_features(run):
    root, argv = run
    keys = sorted(p.name for p in (root / "cache").iterdir())
    assert len(keys) == 2  # one folder per encoder: the image tower and the audio tower
    shards = {k: sorted((root / "cache" / k).glob("shard-*.npy")) for k in keys}
    dims = sorted(json.loads((root / "cache" / k / "meta.json").read_text())["dim"] for k in keys)
    assert dims == [32, 128]  # tiny CLAP, tiny CLIP
    # a second run encodes nothing: no new shards, the old ones untouched
    mtimes = {p: p.stat().st_mtime_ns for ps in shards.values() for p in ps}
    assert main([*argv[:4], str(root / "run2"), *argv[5:]]) == 0
    assert {p: p.stat().st_mtime_ns for k in keys for p in sorted((root / "cache" / k).glob("shard-*.npy"))} == mtimes
    cfg = json.loads((root / "run" / "best" / "config.json").read_text())["model"]
    assert cfg["modalities"] == ["image", "audio"]


def test_caption_sounds_images_and_pairs(run, scenes, tmp_path, capsys):
    root, _ = run
    model = str(root / "run" / "best")
    test = Path(scenes) / "test"
    wavs, pngs = sorted(test.glob("*.wav"))[:3], sorted(test.glob("*.png"))[:3]
    out = tmp_path / "audio.jsonl"
    assert main(["caption", "--model", model, "--audio", *map(str, wavs), "-o", str(out),
                 "--strategy", "greedy"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["audio"] for r in rows] == list(map(str, wavs)) and all(r["caption"] for r in rows)
    out = tmp_path / "pairs.jsonl"
    assert main(["caption", *map(str, pngs), "--model", model, "--audio", *map(str, wavs), "-o", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["image"], r["audio"]) for r in rows] == list(zip(map(str, pngs), map(str, wavs)))
    capsys.readouterr()
    assert main(["caption", str(test), "--model", model, "--strategy", "greedy"]) == 0  # images alone
    printed = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert len(printed) == 12 and all(p[0].endswith(".png") and p[1] for p in printed)
    # pairs must match in number
    assert main(["caption", *map(str, pngs), "--model", model, "--audio", str(wavs[0])]) == 2
    assert "counts must match" in capsys.readouterr().err


def test_eval_from_one_input_and_spider_headline(run, scenes, tmp_path, capsys):
    root, _ = run
    model = str(root / "run" / "best")
    assert main(["eval", "--model", model, "--data", str(scenes), "--split", "test", "--modalities", "audio",
                 "--strategy", "greedy", "--output-dir", str(tmp_path / "e")]) == 0
    out = capsys.readouterr().out
    assert "inputs: audio" in out and "headline: " in out  # SPIDEr with SPICE jars, else CIDEr with a note
    scores = json.loads((tmp_path / "e" / "scores.json").read_text())
    assert "CIDEr" in scores["corpus"] and len(scores["per_image"]) == 12


def test_eval_ablation_scores_each_input_alone(run, scenes, tmp_path, capsys):
    root, _ = run
    model = str(root / "run" / "best")
    assert main(["eval", "--model", model, "--data", str(scenes), "--split", "test", "--ablate",
                 "--strategy", "greedy", "--output-dir", str(tmp_path / "e"), "--num-workers", "0"]) == 0
    assert "ablation (same items, each input alone)" in capsys.readouterr().out
    ablation = json.loads((tmp_path / "e" / "scores.json").read_text())["ablation"]
    assert list(ablation) == ["image+audio", "image only", "audio only"]
    assert all("CIDEr" in v for v in ablation.values())
    assert main(["eval", "--model", model, "--data", str(scenes), "--ablate", "--modalities", "audio"]) == 2


def test_image_model_refuses_audio(trained_image_model, scenes, capsys):
    wav = str(sorted((Path(scenes) / "test").glob("*.wav"))[0])
    assert main(["caption", "--model", str(trained_image_model), "--audio", wav]) == 2
    err = capsys.readouterr().err
    assert "trained on image only" in err and "cannot use audio" in err


@pytest.fixture
def trained_image_model(make_captioner, tmp_path):
    cap = make_captioner()
    return cap.save_pretrained(tmp_path / "image_model")


def test_caption_from_an_input_table(run, scenes, tmp_path):
    root, _ = run
    test = Path(scenes) / "test"
    table = test / "inputs.csv"
    table.write_text("image,audio,note\n00000.png,00000.wav,a\n,00001.wav,b\n00002.png,,c\n,,d\n")
    out = tmp_path / "t.jsonl"
    assert main(["caption", "--model", str(root / "run" / "best"), "--table", str(table), "-o", str(out),
                 "--strategy", "greedy"]) == 1  # the empty row is a failure, the rest are captioned
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(Path(r["image"]).name, Path(r["audio"]).name if "audio" in r else None) for r in rows] == [
        ("00000.png", "00000.wav"), ("00001.wav", "00001.wav"), ("00002.png", None)]
    errors = (tmp_path / "t.jsonl.errors.jsonl").read_text()
    assert "inputs.csv:5: row has no input" in errors


def test_audio_only_captioner_trains_and_captions(tmp_path, capsys):
    from captioner.demo.tiny import tiny_clap_config
    from captioner.demo.sounds import make_sounds_dataset

    sounds = make_sounds_dataset(tmp_path / "sounds", n_train=36, n_val=9, n_test=9, seed=1)
    train_ex, _ = read_imagefolder(sounds, "train")
    assert all(ex.image is None and ex.audio for ex in train_ex)
    argv = tiny_train_argv(sounds, tmp_path, train_ex, epochs=1, batch_size=16, extra=[
        "--modalities", "audio", "--audio-config", json.dumps(tiny_clap_config()), "--val-images", "4"])
    assert main(argv) == 0
    best = tmp_path / "run" / "best"
    assert json.loads((best / "config.json").read_text())["model"]["modalities"] == ["audio"]
    capsys.readouterr()
    assert main(["caption", "--model", str(best), "--audio", str(Path(sounds) / "test"), "--strategy", "greedy"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 9 and all(line.split("\t")[0].endswith(".wav") for line in printed)
    png = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(png)
    assert main(["caption", str(png), "--model", str(best)]) == 2
    assert "trained on audio only" in capsys.readouterr().err
