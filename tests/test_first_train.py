"""A new user's first training run: the tiny preset and the tokenizer command (offline), an earlier run
never silently replaced, a tokenizer that does not fit the LM or a frozen random LM refused before training,
validation decoded as the run says, and help that is fast and says each default once."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from captioner import cli
from captioner.config import ConfigError, ModelConfig, TrainConfig
from captioner.demo.shapes import make_shapes_dataset
from captioner.demo.tiny import TINY_CLIP, tiny_config, tiny_gpt2
from captioner.train.loop import train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_shapes_dataset(tmp_path_factory.mktemp("first_train"), n_train=24, n_val=8, n_test=4, seed=3)


def _config(data, out, tokenizer, **kw):
    base = dict(data=str(data), output_dir=str(out), epochs=1, batch_size=16, lr=2e-3, warmup_steps=2,
                val_images=0, max_steps=1, model=tiny_config(tokenizer))
    return TrainConfig(**{**base, **kw})


def test_tokenizer_command_and_tiny_preset_train_offline(data, tmp_path, capsys):
    assert cli.main(["tokenizer", "--data", str(data), "--output", str(tmp_path / "tok"), "--vocab-size", "300"]) == 0
    n_tokens = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())["model"]["vocab"]
    assert cli.main(["tokenizer", "--data", str(data), "--output", str(tmp_path / "tok")]) == cli.EXIT_USAGE
    assert "--overwrite" in capsys.readouterr().err
    run = tmp_path / "run"
    assert cli.main(["train", "--data", str(data), "--output-dir", str(run), "--preset", "tiny", "--tokenizer",
                     str(tmp_path / "tok"), "--epochs", "1", "--val-images", "2", "--warmup-steps", "1"]) == 0
    saved = json.loads((run / "train_config.json").read_text())
    # The demo's recipe, under the flags given explicitly (warmup_steps).
    assert (saved["lr"], saved["batch_size"], saved["warmup_steps"]) == (2e-3, 64, 1)
    model = saved["model"]
    assert model["clip_config"] == TINY_CLIP and model["clip_pretrained"] is None and model["finetune_lm"]
    assert model["lm_config"]["vocab_size"] == len(n_tokens) and model["prefix_length"] == 4
    assert (run / "best" / "tokenizer.json").exists()


def test_tiny_preset_without_a_tokenizer_trains_one_on_the_training_captions(data, tmp_path):
    from captioner.train.presets import apply_preset, preset_fields

    train_fields, model_fields = preset_fields("tiny")
    config = TrainConfig(data=str(data), **train_fields, model=ModelConfig(**model_fields))
    config, tok = apply_preset(config)
    assert config.model.lm_config["vocab_size"] == len(tok)
    assert tok("a red circle", add_special_tokens=False)["input_ids"]


def test_demo_and_preset_share_one_recipe(tokenizer):
    from captioner.demo.runs import demo_train_config
    from captioner.train.presets import preset_fields

    train_fields, model_fields = preset_fields("tiny")
    demo = demo_train_config(Path("d"), Path("o"), tokenizer, epochs=1, seed=0)
    assert {k: getattr(demo, k) for k in train_fields} == train_fields
    assert {k: getattr(demo.model, k) for k in model_fields} == model_fields


def test_train_refuses_an_earlier_run_and_overwrite_starts_clean(data, tmp_path, tokenizer, monkeypatch):
    from captioner.api import Captioner

    out = tmp_path / "run"
    (out / "last").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"old": 1}\n')
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="earlier run.*resume.*overwrite"):
        train(_config(data, out, tokenizer), tokenizer=tokenizer)
    assert (out / "metrics.jsonl").read_text() == '{"old": 1}\n' and not (out / "train_config.json").exists()

    decodes = []
    real = Captioner.caption_rows
    monkeypatch.setattr(Captioner, "caption_rows", lambda self, f, p, decode: decodes.append(decode) or real(
        self, f, p, decode))
    train(_config(data, out, tokenizer, overwrite=True, val_images=3), tokenizer=tokenizer)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().split("\n") if x]
    assert "old" not in records[0] and (out / "notes.txt").read_text() == "mine"
    # Validation captions use the run's decoding (beam, 3 beams by default) and say so.
    assert records[-1]["val_decoding"] == "beam3"
    assert {(d.strategy, d.num_beams) for d in decodes} == {("beam", 3)}


def test_cli_train_into_an_earlier_run_is_one_line(data, tmp_path, capsys):
    (tmp_path / "run" / "state").mkdir(parents=True)
    code = cli.main(["train", "--data", str(data), "--output-dir", str(tmp_path / "run"), "--preset", "tiny"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]
    assert code == cli.EXIT_USAGE and len(errors) == 1 and "resume" in errors[0] and "overwrite" in errors[0]


def test_tokenizer_larger_than_the_lm_vocabulary_is_refused_before_training(data, tmp_path, tokenizer):
    model = dataclasses.replace(tiny_config(tokenizer), lm_config=tiny_gpt2(len(tokenizer) - 20))
    with pytest.raises(ConfigError, match=f"{len(tokenizer)} token ids .* holds {len(tokenizer) - 20}"):
        train(_config(data, tmp_path / "run", tokenizer, model=model), tokenizer=tokenizer)
    assert not (tmp_path / "run" / "state").exists()


def test_frozen_random_lm_is_refused(data, tmp_path, tokenizer):
    model = dataclasses.replace(tiny_config(tokenizer), finetune_lm=False)
    with pytest.raises(ConfigError, match="fine-tune it"):
        train(_config(data, tmp_path / "run", tokenizer, model=model), tokenizer=tokenizer)
    assert not (tmp_path / "run").exists()


def test_clip_config_without_a_checkpoint_is_random_init(caplog):
    from captioner.errors import ModelLoadError
    from captioner.model.encoders import build_image_encoder

    with caplog.at_level("INFO", logger="captioner.model.encoders"):
        enc = build_image_encoder(ModelConfig(clip_config=TINY_CLIP))  # clip_pretrained: the default, openai
    assert enc.output_dim == TINY_CLIP["embed_dim"] and "randomly initialised" in caplog.text
    with pytest.raises(ModelLoadError, match="not a file"):
        build_image_encoder(ModelConfig(clip_config=TINY_CLIP, clip_pretrained="missing/tower.safetensors"))


def test_help_says_each_default_once():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name in ("train", "eval", "caption", "tokenizer"):
        text = " ".join(sub.choices[name].format_help().split())
        assert "(default: None)" not in text and "(default: )" not in text, name
        assert "auto-detect). (default" not in text, name


def test_help_imports_no_heavy_library():
    code = ("import sys, contextlib, io\nfrom captioner import cli\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    for argv in (['--help'], ['train', '--help'], ['caption', '--help']):\n"
            "        try:\n            cli.main(argv)\n        except SystemExit:\n            pass\n"
            "print(sorted(m for m in ('torch', 'transformers', 'open_clip', 'datasets', 'pycocoevalcap') "
            "if m in sys.modules))")
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                         env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert out.stdout.strip() == "[]", out.stderr
