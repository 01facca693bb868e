"""CLI in-process: train -> caption -> files written; bad inputs; and the end-to-end learning test."""

import csv
import json
from pathlib import Path

import pytest

from captioner.cli import main
from captioner.data import read_imagefolder
from captioner.demo.runs import most_frequent_caption
from captioner.scoring.metrics import score_captions
from captioner.demo.tiny import TINY_CLIP
from conftest import tiny_train_argv

# Learning-test bar: a model that ignores the image cannot beat the most-frequent-caption baseline
# (1.37 CIDEr on this set); a model that reads colour, shape and position scores about 5.
CIDER_THRESHOLD = 3.5
BASELINE_FACTOR = 3.0


@pytest.fixture(scope="module")
def trained(shapes_data, tmp_path_factory):
    """Train through the CLI once for this module."""
    root = tmp_path_factory.mktemp("cli")
    train_ex, _ = read_imagefolder(shapes_data, "train")
    argv = tiny_train_argv(shapes_data, root, train_ex, epochs=14, batch_size=64,
                           extra=["--warmup-steps", "30", "--weight-decay", "0", "--val-images", "30",
                                  "--log-every", "5"])
    assert main(argv) == 0
    return root / "run", train_ex


def test_train_writes_run_dir(trained):
    run, _ = trained
    assert (run / "best" / "config.json").exists() and (run / "last" / "model.safetensors").exists()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if "val_loss" in r]
    assert len(epochs) == 14 and all("val_cider" in r for r in epochs)
    steps = [r for r in records if "loss" in r]
    assert steps[-1]["loss"] < steps[0]["loss"]  # it trains
    cfg = json.loads((run / "train_config.json").read_text())
    assert cfg["epochs"] == 14 and cfg["model"]["prefix_length"] == 4
    assert "--finetune-lm" in (run / "command.txt").read_text()


def test_learning_beats_most_frequent_caption(trained, shapes_data, tmp_path):
    """End to end: held-out CIDEr (COCO tokenisation) far above a fixed bar and the trivial baseline."""
    run, train_ex = trained
    out = tmp_path / "test.jsonl"
    code = main(["caption", str(Path(shapes_data) / "test"), "--model", str(run / "best"), "--output", str(out),
                 "--strategy", "beam", "--num-beams", "3", "--batch-size", "16"])
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    test_ex, _ = read_imagefolder(shapes_data, "test")
    assert len(rows) == len(test_ex)
    by_path = {r["image"]: r["caption"] for r in rows}
    refs = {ex.image_id: ex.captions for ex in test_ex}
    model = score_captions({ex.image_id: by_path[ex.image] for ex in test_ex}, refs, metrics=("CIDEr",)).corpus["CIDEr"]
    frequent = most_frequent_caption(train_ex)
    baseline = score_captions({ex.image_id: frequent for ex in test_ex}, refs, metrics=("CIDEr",)).corpus["CIDEr"]
    print(f"learning test: CIDEr {model:.4f} vs baseline {baseline:.4f} (threshold {CIDER_THRESHOLD})")
    assert model > CIDER_THRESHOLD
    assert model > BASELINE_FACTOR * baseline


def test_caption_outputs_and_bad_inputs(trained, shapes_data, tmp_path, capsys):
    run, _ = trained
    test_dir = Path(shapes_data) / "test"
    good = sorted(test_dir.glob("*.png"))[:3]
    notimg = tmp_path / "fake.png"
    notimg.write_text("this is not an image")
    missing = tmp_path / "missing.jpg"
    argv = ["caption", str(good[0]), str(missing), str(notimg), str(good[1]), str(good[2]), "--model", str(run / "best"),
            "--strategy", "greedy"]
    assert main(argv) == 1  # failures make the exit code non-zero
    out, err = capsys.readouterr()
    lines = [line.split("\t") for line in out.strip().splitlines()]
    assert [p for p, _ in lines] == [str(g) for g in good]  # the good images are all captioned
    assert all(c.strip() for _, c in lines)
    assert f"{missing}: no such file" in err and f"{notimg}: not an image" in err and "2 failed" in err

    csv_out = tmp_path / "out.csv"
    assert main(["caption", str(test_dir / "*.png"), "--model", str(run / "best"), "-o", str(csv_out),
                 "--strategy", "sample", "--num-captions", "2", "--seed", "0"]) == 0
    rows = list(csv.DictReader(csv_out.open()))
    assert len(rows) == 2 * len(list(test_dir.glob("*.png"))) and set(rows[0]) == {"image", "rank", "caption"}


def test_hub_name_offline_is_one_clear_line(trained, shapes_data, tmp_path, capsys, monkeypatch):
    from captioner import hub
    monkeypatch.setattr(hub, "hub_reachable", lambda *a, **k: False)
    code = main(["train", "--data", str(shapes_data), "--output-dir", str(tmp_path / "r"), "--lm", "gpt2",
                 "--clip-config", json.dumps(TINY_CLIP), "--clip-pretrained", "none", "--epochs", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "'gpt2'" in err[0] and "unreachable" in err[0] and "local path" in err[0]


def test_usage_errors(tmp_path, capsys):
    assert main(["caption", "x.png", "--model", str(tmp_path)]) == 2
    assert "config.json: missing" in capsys.readouterr().err
    assert main(["caption", "--model", str(tmp_path)]) == 2  # no images and no --audio
    assert "give images (files, folders, globs) and/or --audio files" in capsys.readouterr().err
    assert main(["train", "--epochs", "1"]) == 2
    assert "--data is required" in capsys.readouterr().err


def test_help_explains_every_command(capsys):
    for cmd in ([], ["caption"], ["train"], ["demo"]):
        with pytest.raises(SystemExit) as e:
            main([*cmd, "--help"])
        assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--num-beams", "--length-penalty", "--top-p", "--max-new-tokens", "--prefix-length",
                 "--finetune-lm", "--mapper", "--clip-pretrained", "--prompt", "--output", "--audio",
                 "--modalities", "--modality-dropout", "--audio-encoder", "--audio-model", "--audio-root"):
        assert flag in text


TINY_SCORE_CLIP = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16,
                                                   "head_width": 16},
                   "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def test_eval_writes_scores_predictions_report_and_score_agrees(trained, shapes_data, tmp_path, capsys):
    run, _ = trained
    clip_json = tmp_path / "score_clip.json"
    clip_json.write_text(json.dumps(TINY_SCORE_CLIP))
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(run / "best"), "--data", str(shapes_data), "--split", "test",
                 "--output-dir", str(out), "--strategy", "greedy", "--clip-score-model", str(clip_json),
                 "--clip-score-pretrained", "none"]) == 0
    printed = capsys.readouterr().out
    scores = json.loads((out / "scores.json").read_text())
    for key in ("Bleu_1", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "CLIPScore", "RefCLIPScore"):
        assert key in scores["corpus"] and key in printed
    assert scores["coco_exact"] is True and len(scores["per_image"]) == 60
    assert scores["corpus"]["CIDEr"] > 3.0  # the trained model, greedy
    html = (out / "report.html").read_text()
    assert html.count("data:image/") >= 60
    # the COCO results file scores the same through `captioner score`
    preds = json.loads((out / "predictions.json").read_text())
    assert len(preds) == 60 and set(preds[0]) == {"image_id", "caption"}
    assert main(["score", "--predictions", str(out / "predictions.json"), "--references", str(shapes_data),
                 "--split", "test", "-o", str(tmp_path / "s.json")]) == 0
    again = json.loads((tmp_path / "s.json").read_text())
    for key in ("Bleu_4", "METEOR", "ROUGE_L", "CIDEr"):
        assert again["corpus"][key] == pytest.approx(scores["corpus"][key], abs=1e-9)
    assert again["per_image"].keys() == scores["per_image"].keys()


def test_eval_without_clip_text_tower_says_clipscore_skipped(trained, shapes_data, capsys):
    run, _ = trained
    assert main(["eval", "--model", str(run / "best"), "--data", str(shapes_data), "--limit", "6",
                 "--strategy", "greedy"]) == 0
    out = capsys.readouterr().out
    assert "CLIPScore skipped" in out and "--clip-score-model" in out and "CIDEr" in out


def test_score_accepts_caption_output_and_rejects_malformed_predictions(trained, shapes_data, tmp_path, capsys):
    run, _ = trained
    test_dir = Path(shapes_data) / "test"
    captions = tmp_path / "captions.jsonl"
    assert main(["caption", str(test_dir), "--model", str(run / "best"), "-o", str(captions),
                 "--strategy", "greedy"]) == 0
    # our own JSONL output (image paths) matches imagefolder reference ids
    assert main(["score", "--predictions", str(captions), "--references", str(shapes_data)]) == 0
    capsys.readouterr()
    refs = json.loads("[" + ",".join((test_dir / "metadata.jsonl").read_text().split("\n")[:-1]) + "]")
    good = [{"image_id": f"test/{Path(r['file_name']).stem}", "caption": "a red circle"} for r in refs]

    def score(entries, raw=None):
        p = tmp_path / "p.json"
        p.write_text(raw if raw is not None else json.dumps(entries))
        code = main(["score", "--predictions", str(p), "--references", str(shapes_data)])
        return code, capsys.readouterr().err
    assert score(good)[0] == 0
    code, err = score(good[1:])
    assert code == 2 and "have no prediction" in err and good[0]["image_id"] in err
    code, err = score(good + [{"image_id": "test/99999", "caption": "x"}])
    assert code == 2 and "not in the references: test/99999" in err
    code, err = score(good + [good[3]])
    assert code == 2 and "duplicate" in err.lower() and good[3]["image_id"] in err
    code, err = score(None, raw='[{"image_id": "test/00000", "caption": "x"},')
    assert code == 2 and "p.json" in err and "JSON" in err
    code, err = score(good[:5] + [{"image_id": "test/00005"}] + good[6:])
    assert code == 2 and "entry 5" in err and "caption" in err


def test_captioner_evaluate_api(trained, shapes_data):
    from captioner.api import Captioner
    from captioner.config import DecodeConfig
    from captioner.data import read_imagefolder

    run, _ = trained
    examples, _ = read_imagefolder(shapes_data, "test")
    broken = examples[:4] + [examples[4].__class__(image_id="broken", image=str(shapes_data / "nope.png"),
                                                  captions=["x"])]
    result = Captioner.from_pretrained(run / "best").evaluate(broken, decode=DecodeConfig(strategy="greedy"))
    assert set(result.predictions) == {ex.image_id for ex in examples[:4]}
    assert any("nope.png: no such file" in s for s in result.skipped)
    assert set(result.per_image) == set(result.predictions) and "CIDEr" in result.corpus


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_decoding_matches_transformers_generate(trained, shapes_data, strategy):
    """Our batched KV-cached search == transformers' generate(inputs_embeds=...) on a trained model
    (captions of different lengths ending in EOS): same tokens, and the same beam scores."""
    import torch

    from captioner.api import Captioner
    from captioner.config import DecodeConfig
    from captioner.decoding.search import LMStepper, generate

    run, _ = trained
    cap = Captioner.from_pretrained(run / "best", device="cpu")
    test_ex, _ = read_imagefolder(shapes_data, "test")
    from captioner.data import load_image
    with torch.no_grad():
        embeds = cap.model.prefix_embeds(cap.encode([load_image(ex.image) for ex in test_ex[:16]]))[0]
        eos = cap.tokenizer.eos_token_id
        ours = generate(LMStepper(cap.model.lm), embeds, DecodeConfig(strategy=strategy, num_beams=3,
                                                                      max_new_tokens=20), eos_id=eos, pad_id=eos)
        hf = cap.model.lm.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                                   max_new_tokens=20, do_sample=False, num_beams=1 if strategy == "greedy" else 3,
                                   length_penalty=1.0, eos_token_id=eos, pad_token_id=eos,
                                   output_scores=True, return_dict_in_generate=True)

    def cut(seq):
        seq = seq.tolist()
        return seq[: seq.index(eos) + 1] if eos in seq else seq
    lengths = {len(cut(s)) for s in ours.tokens[:, 0]}
    assert len(lengths) > 1 and all(cut(s)[-1] == eos for s in ours.tokens[:, 0])  # EOS at different lengths
    assert [cut(s) for s in ours.tokens[:, 0]] == [cut(s) for s in hf.sequences]
    if strategy == "beam":
        torch.testing.assert_close(ours.scores[:, 0], hf.sequences_scores, rtol=1e-4, atol=1e-4)
