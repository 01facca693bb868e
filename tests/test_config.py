"""Config: unknown keys and wrong types are errors; CLI flags come from the dataclasses."""

import json

import pytest

from captioner.config import ConfigError, DecodeConfig, ModelConfig, from_dict, load_json, to_dict


def test_round_trip_and_unknown_keys():
    cfg = ModelConfig(mapper="transformer", prefix_length=7, prompt="A photo of")
    assert from_dict(ModelConfig, to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="unknown ModelConfig key.*mappr"):
        from_dict(ModelConfig, {"mappr": "mlp"})


@pytest.mark.parametrize("data, match", [
    ({"prefix_length": "10"}, "prefix_length: expected int"),
    ({"finetune_lm": 1}, "finetune_lm: expected bool"),
    ({"clip_config": [1]}, "clip_config: expected dict"),
    ({"mapper": "lstm"}, "mapper must be"),
    ({"prefix_length": 0}, "prefix_length must be >= 1"),
])
def test_bad_model_values(data, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(ModelConfig, data)


@pytest.mark.parametrize("data, match", [
    ({"strategy": "topk"}, "strategy must be"),
    ({"num_beams": 2, "num_captions": 3}, "cannot exceed num_beams"),
    ({"strategy": "greedy", "num_captions": 2}, "greedy decoding returns one"),
    ({"top_p": 0.0}, "top_p"),
    ({"temperature": 0}, "temperature"),
])
def test_bad_decode_values(data, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(DecodeConfig, data)


def test_load_json_errors_name_the_file(tmp_path):
    bad = tmp_path / "c.json"
    bad.write_text('{"a": 1,\n "b": }')
    with pytest.raises(ConfigError, match=r"c\.json: invalid JSON at line 2"):
        load_json(bad)
    bad.write_bytes(b'{"a": "\xff"}')
    with pytest.raises(ConfigError, match="not valid UTF-8"):
        load_json(bad)


def test_train_config_file_with_cli_overrides(tmp_path, monkeypatch):
    """--config supplies values; explicit flags override them; unknown keys in the file are errors."""
    import captioner.train.loop as training
    from captioner.cli import main

    seen = {}
    monkeypatch.setattr(training, "train", lambda config, **kw: seen.setdefault("cfg", config) and tmp_path)
    path = tmp_path / "train.json"
    path.write_text(json.dumps({"data": "somewhere", "epochs": 3, "lr": 0.1, "model": {"prefix_length": 5}}))
    assert main(["train", "--config", str(path), "--lr", "0.01", "--mapper", "transformer"]) == 0
    cfg = seen["cfg"]
    assert (cfg.data, cfg.epochs, cfg.lr) == ("somewhere", 3, 0.01)
    assert (cfg.model.prefix_length, cfg.model.mapper) == (5, "transformer")
    path.write_text(json.dumps({"data": "x", "epoch": 3}))
    assert main(["train", "--config", str(path)]) == 2


def test_yaml_config_file(tmp_path, monkeypatch):
    import captioner.train.loop as training
    from captioner.cli import main

    seen = {}
    monkeypatch.setattr(training, "train", lambda config, **kw: seen.setdefault("cfg", config) and tmp_path)
    path = tmp_path / "train.yaml"
    path.write_text("data: somewhere\nepochs: 4\nmodel:\n  mapper: transformer\n")
    assert main(["train", "--config", str(path)]) == 0
    assert (seen["cfg"].epochs, seen["cfg"].model.mapper) == (4, "transformer")
    path.write_text("data: [unclosed\n")
    assert main(["train", "--config", str(path)]) == 2


from hypothesis import given, settings, strategies as st

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
                           max_leaves=8)


@settings(max_examples=200, deadline=None)
@given(data=st.dictionaries(st.sampled_from(["mapper", "prefix_length", "finetune_lm", "clip_config", "prompt",
                                             "clip_pretrained", "bogus", "mlp_hidden"]), json_values, max_size=4))
def test_model_config_from_arbitrary_json_raises_only_config_error(data):
    try:
        from_dict(ModelConfig, data)
    except ConfigError:
        pass


@settings(max_examples=100, deadline=None)
@given(raw=st.binary(max_size=200))
def test_loading_arbitrary_bytes_raises_only_config_error(raw, tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "c.json"
    path.write_bytes(raw)
    try:
        from_dict(DecodeConfig, load_json(path))
    except ConfigError:
        pass


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("cls, field, value", [
    ("TrainConfig", "lr", NAN), ("TrainConfig", "lr", -1.0), ("TrainConfig", "lr", INF), ("TrainConfig", "lr", 0.0),
    ("TrainConfig", "weight_decay", -1.0), ("TrainConfig", "weight_decay", NAN),
    ("TrainConfig", "encode_batch_size", 0), ("TrainConfig", "log_every", 0), ("TrainConfig", "warmup_steps", -5),
    ("TrainConfig", "max_caption_tokens", 0), ("TrainConfig", "val_every", -1), ("TrainConfig", "save_every", -1),
    ("TrainConfig", "max_steps", 0), ("TrainConfig", "max_steps", -1), ("TrainConfig", "grad_clip", NAN),
    ("TrainConfig", "grad_clip", -1.0), ("TrainConfig", "num_workers", -1), ("TrainConfig", "val_images", -1),
    ("TrainConfig", "seed", -1), ("TrainConfig", "modality_dropout", NAN), ("TrainConfig", "max_nonfinite_steps", 0),
    ("TrainConfig", "epochs", 0), ("TrainConfig", "batch_size", -2),
    ("DecodeConfig", "temperature", NAN), ("DecodeConfig", "temperature", INF), ("DecodeConfig", "top_p", NAN),
    ("DecodeConfig", "top_p", 1.5), ("DecodeConfig", "num_beams", 0), ("DecodeConfig", "max_new_tokens", 0),
    ("DecodeConfig", "top_k", -1), ("DecodeConfig", "length_penalty", NAN),
    ("ModelConfig", "mlp_hidden", 0), ("ModelConfig", "whisper_pool", -1), ("ModelConfig", "audio_prefix_length", 0),
])
def test_numeric_fields_are_checked_up_front(cls, field, value):
    """NaN, infinite, negative or zero where not allowed: one line naming the field."""
    from captioner import config

    with pytest.raises(ConfigError) as e:
        from_dict(getattr(config, cls), {field: value}, source="cfg")
    assert f"{field} must be" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("argv", [
    ["--lr", "nan"], ["--lr", "-1"], ["--weight-decay", "-1"], ["--encode-batch-size", "0"], ["--log-every", "0"],
    ["--warmup-steps", "-5"], ["--max-caption-tokens", "0"], ["--val-every", "-1"], ["--max-steps", "0"],
])
def test_bad_numeric_train_flags_fail_before_any_output(tmp_path, capsys, argv):
    from captioner.cli import main

    out = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path), "--output-dir", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert f"{argv[0][2:].replace('-', '_')} must be" in err and len(err.strip().split("\n")) == 1
    assert not out.exists()


@pytest.mark.parametrize("argv, flag", [
    (["--batch-size", "0"], "--batch-size"), (["--max-pixels", "-1"], "--max-pixels"),
    (["--num-workers", "-1"], "--num-workers"),
    (["--output-dir", "OUT", "--files-per-shard", "0"], "--files-per-shard"),
    (["--temperature", "nan", "--strategy", "sample"], "temperature"),
])
def test_bad_numeric_caption_flags_fail_before_any_output(tmp_path, capsys, make_captioner, argv, flag):
    """Refused while parsing, before the output exists (a crash there used to leave an output that blocks
    the rerun)."""
    from captioner.cli import main

    make_captioner().save_pretrained(tmp_path / "model")
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    out = tmp_path / "c.jsonl"
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    try:
        rc = main(["caption", str(tmp_path / "a.png"), "--model", str(tmp_path / "model"), "-o", str(out), *argv])
    except SystemExit as e:  # argparse: usage error
        rc = e.code
    assert rc == 2 and flag in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "out").exists()
