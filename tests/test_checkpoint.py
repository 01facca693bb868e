"""save_pretrained / from_pretrained: exact round trip, what is saved, strict errors."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from captioner.api import Captioner
from captioner.model.checkpoint import CheckpointError, saved_parts
from captioner.config import DecodeConfig, ModelConfig
from captioner.model.tokens import encode_captions

from conftest import CAPTIONS


@pytest.mark.parametrize("overrides", [dict(mapper="mlp", prompt="a photo of"),
                                       dict(mapper="transformer", finetune_lm=False)])
def test_round_trip_identical_logits_and_captions(make_captioner, tmp_path, overrides):
    cap = make_captioner(**overrides)
    cap.model.mappers["image"].feature_norm.fit(torch.randn(20, cap.model.image_encoder.output_dim))
    cap.save_pretrained(tmp_path / "m")
    assert {p.name for p in (tmp_path / "m").iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}
    back = Captioner.from_pretrained(tmp_path / "m", device="cpu")
    from captioner.config import to_dict
    a, b = to_dict(cap.config), to_dict(back.config)
    assert b.pop("lm_config")["n_embd"] == a.pop("lm_config")["n_embd"]  # resolved to the full LM config
    assert a == b
    images = torch.rand(3, 3, 64, 64)
    ids, mask = encode_captions(cap.tokenizer, CAPTIONS[:3], max_tokens=20, prompt=cap.config.prompt)
    with torch.no_grad():
        f1, f2 = cap.model.encode_images(images), back.model.encode_images(images)
        torch.testing.assert_close(f1, f2, rtol=0, atol=0)
        torch.testing.assert_close(cap.model(f1, ids, mask).logits, back.model(f2, ids, mask).logits, rtol=0, atol=0)
    for strategy in ("greedy", "beam"):
        cfg = DecodeConfig(strategy=strategy, max_new_tokens=8)
        assert cap.caption_features(f1, cfg) == back.caption_features(f2, cfg)
    assert back.tokenizer("a red circle")["input_ids"] == cap.tokenizer("a red circle")["input_ids"]


def test_saved_parts_follow_what_can_be_refetched():
    assert saved_parts(ModelConfig()) == ("mappers", "modality_embed")  # CLIP by tag, frozen gpt2 by name
    assert saved_parts(ModelConfig(finetune_lm=True)) == ("mappers", "modality_embed", "lm")
    assert saved_parts(ModelConfig(clip_pretrained=None, lm_config={"model_type": "gpt2"})) == (
        "mappers", "modality_embed", "encoders.image", "lm")
    # audio: a hub-named encoder is re-fetched, an inline (random) one is saved
    assert "encoders.audio" not in saved_parts(ModelConfig(modalities=["image", "audio"]))
    assert saved_parts(ModelConfig(modalities=["audio"], audio_config={"projection_dim": 8})) == (
        "mappers", "modality_embed", "encoders.audio")


def test_frozen_named_lm_is_not_saved(make_captioner, tmp_path):
    cap = make_captioner(finetune_lm=False)
    cap.save_pretrained(tmp_path / "m")
    keys = load_file(str(tmp_path / "m" / "model.safetensors")).keys()
    assert any(k.startswith("mappers.image.") for k in keys)
    # tiny LM from an inline config is not re-fetchable, so it is saved; tied lm_head stored once
    assert "lm.transformer.wte.weight" in keys and "lm.lm_head.weight" not in keys


def _saved(make_captioner, tmp_path):
    cap = make_captioner()
    d = tmp_path / "m"
    cap.save_pretrained(d)
    return d


def test_missing_and_unexpected_tensors_are_errors(make_captioner, tmp_path):
    d = _saved(make_captioner, tmp_path)
    state = load_file(str(d / "model.safetensors"))
    removed = sorted(k for k in state if k.startswith("mappers.image."))[0]
    del state[removed]
    state["mappers.image.extra.weight"] = torch.zeros(2)
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing:.*" + removed.replace(".", r"\.") + ".*unexpected:.*extra"):
        Captioner.from_pretrained(d)


def test_config_weight_mismatch_is_an_error(make_captioner, tmp_path):
    d = _saved(make_captioner, tmp_path)
    meta = json.loads((d / "config.json").read_text())
    meta["model"]["prefix_length"] = 6
    (d / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="shape mismatch"):
        Captioner.from_pretrained(d)


def test_corrupted_weights_unknown_keys_and_versions_are_errors(make_captioner, tmp_path):
    d = _saved(make_captioner, tmp_path)
    good = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="corrupted"):
        Captioner.from_pretrained(d)
    (d / "model.safetensors").write_bytes(good)
    meta = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**meta, "model": {**meta["model"], "prefix_lenght": 3}}))
    with pytest.raises(CheckpointError, match="unknown ModelConfig key.*prefix_lenght"):
        Captioner.from_pretrained(d)
    (d / "config.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(CheckpointError, match="format_version 99"):
        Captioner.from_pretrained(d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="invalid JSON"):
        Captioner.from_pretrained(d)
    with pytest.raises(CheckpointError, match="not a directory"):
        Captioner.from_pretrained(tmp_path / "nope")


# ------------------------------------------------------------------ tampered directories: one CheckpointError line


def test_config_json_of_the_wrong_type_is_one_line(make_captioner, tmp_path):
    d = _saved(make_captioner, tmp_path)
    (d / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"config\.json: not a captioner config \(a JSON list"):
        Captioner.from_pretrained(d)


@pytest.mark.parametrize("garbage", ['{"version": "1.0", "model": {"type": "BPE"}}', '{"model": 3}', "not json"])
def test_garbage_tokenizer_json_is_one_line(make_captioner, tmp_path, garbage):
    d = _saved(make_captioner, tmp_path)
    (d / "tokenizer.json").write_text(garbage)
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: ") as e:
        Captioner.from_pretrained(d)
    assert "\n" not in str(e.value)


def test_unknown_top_level_config_key_is_an_error_and_extras_round_trip(make_captioner, tmp_path):
    cap = make_captioner()
    d = cap.save_pretrained(tmp_path / "m", step=7, epoch=1, note="kept")
    meta = json.loads((d / "config.json").read_text())
    assert meta["step"] == 7 and meta["epoch"] == 1 and meta["extra"] == {"note": "kept"}
    Captioner.from_pretrained(d)  # what save_pretrained writes loads
    (d / "config.json").write_text(json.dumps({**meta, "prefix_length": 3}))  # misplaced: belongs under "model"
    with pytest.raises(CheckpointError, match=r"config\.json: unknown top-level key\(s\) 'prefix_length'"):
        Captioner.from_pretrained(d)


def test_nan_weights_are_refused(make_captioner, tmp_path):
    d = _saved(make_captioner, tmp_path)
    state = load_file(str(d / "model.safetensors"))
    name = sorted(k for k in state if k.startswith("mappers.image.") and state[k].is_floating_point())[0]
    state[name][..., 0] = float("nan")
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor\(s\) with NaN or infinite values: "
                                              + name.replace(".", r"\.")):
        Captioner.from_pretrained(d)


def _no_stdin(monkeypatch):
    """transformers asks on stdin before running shipped code: make any such question fail the test."""
    def refuse(*a, **k):
        raise AssertionError("asked on stdin whether to run code")
    monkeypatch.setattr("builtins.input", refuse)


EVIL = "import pathlib\npathlib.Path({marker!r}).write_text('ran')\n"


def test_model_dir_asking_to_run_code_is_refused(make_captioner, tmp_path, monkeypatch):
    _no_stdin(monkeypatch)
    d = _saved(make_captioner, tmp_path)
    marker = tmp_path / "ran.txt"
    (d / "evil.py").write_text(EVIL.format(marker=str(marker)) + "class EvilTokenizer: pass\n")
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.update(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": ["evil.EvilTokenizer", None]})
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"tokenizer_config\.json: asks to run custom code .*auto_map"):
        Captioner.from_pretrained(d)
    assert not marker.exists()


def test_lm_dir_asking_to_run_code_is_refused(tmp_path, monkeypatch):
    from captioner.model.encoders import ModelLoadError, build_lm

    _no_stdin(monkeypatch)
    lm_dir = tmp_path / "lm"
    lm_dir.mkdir()
    # a model type transformers does not know: only the shipped code could build it
    cfg = {"model_type": "evil_lm", "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilLM"}}
    (lm_dir / "config.json").write_text(json.dumps(cfg))
    marker = tmp_path / "ran.txt"
    (lm_dir / "evil.py").write_text(EVIL.format(marker=str(marker)))
    with pytest.raises(ModelLoadError, match=r"config\.json: asks to run custom code"):
        build_lm(ModelConfig(lm=str(lm_dir)))
    assert not marker.exists()


def test_hub_loads_never_trust_remote_code(monkeypatch):
    from captioner import hub

    seen = {}
    monkeypatch.setattr(hub, "hub_reachable", lambda *a, **k: True)
    hub.call_hub(lambda name, **kw: seen.update(kw), "LM", "some/hub-id")
    assert seen["trust_remote_code"] is False


def test_garbage_tokenizer_directory_for_training_is_one_line(tmp_path):
    from captioner.model.encoders import ModelLoadError, build_tokenizer

    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    (tok_dir / "tokenizer.json").write_text('{"model": 3}')
    (tok_dir / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')
    with pytest.raises(ModelLoadError, match="could not load tokenizer from local directory") as e:
        build_tokenizer(ModelConfig(tokenizer=str(tok_dir)))
    assert "\n" not in str(e.value) and "Offline" not in str(e.value)


def test_saved_and_run_files_have_plain_write_permissions(make_captioner, tmp_path):
    """Files written through a temporary file (config.json, model.safetensors, train_config.json, ...) get
    the mode a plain write gives under the umask, like the tokenizer files: others can load a shared model."""
    import os
    import stat

    from captioner.cli import main
    from captioner.data import load_caption_set
    from captioner.demo.shapes import make_shapes_dataset
    from conftest import tiny_train_argv

    old = os.umask(0o022)
    try:
        make_captioner().save_pretrained(tmp_path / "m")
        data = make_shapes_dataset(tmp_path / "shapes", n_train=16, n_val=4, n_test=4, seed=0)
        train_ex, _ = load_caption_set(data, "train")
        argv = tiny_train_argv(data, tmp_path, train_ex, epochs=1, batch_size=8)
        assert main(argv) == 0
    finally:
        os.umask(old)
    modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode)
             for root in (tmp_path / "m", tmp_path / "run") for p in root.rglob("*")}
    assert {"m/config.json", "m/model.safetensors", "run/train_config.json", "run/last/model.safetensors",
            "run/best/config.json"} <= set(modes)
    assert {k: oct(v) for k, v in modes.items() if v != (0o755 if (tmp_path / k).is_dir() else 0o644)} == {}
