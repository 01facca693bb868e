"""Training that cannot silently go wrong: non-finite losses, early stops, changed configs on resume,
untrusted state files, and the global state a run touches."""

import json
import logging
import os
from pathlib import Path

import pytest
import torch

from captioner.config import ConfigError
from captioner.demo.shapes import make_shapes_dataset
from captioner.demo.tiny import tiny_config
from captioner.errors import CheckpointError, TrainingError
from captioner.train.loop import train
from test_training import _config as training_config


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_shapes_dataset(tmp_path_factory.mktemp("rel_train"), n_train=24, n_val=8, n_test=0, seed=4)


def _config(data, out, tokenizer, **kw):
    return training_config(data, out, tokenizer, **{"batch_size": 16, "warmup_steps": 2, **kw})


def _finite(run: Path, name: str = "last") -> bool:
    from safetensors.torch import load_file

    return all(torch.isfinite(t).all() for t in load_file(str(run / name / "model.safetensors")).values())


def _steps(run: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().split("\n") if '"loss"' in x]


def test_exploding_loss_stops_with_one_line_error_and_true_message(data, tmp_path, tokenizer):
    """A learning rate far too large: after the first step the loss is not finite, those steps are
    skipped, and after max_nonfinite_steps of them training stops; the message names exactly what exists."""
    out = tmp_path / "run"
    with pytest.raises(TrainingError) as e:
        train(_config(data, out, tokenizer, lr=1e30, warmup_steps=0, max_nonfinite_steps=2), tokenizer=tokenizer)
    message = str(e.value)
    assert "\n" not in message and "not finite for 2 optimiser steps in a row" in message
    assert not (out / "best").exists()  # no finite validation score: no best
    for name in ("last", "best", "state"):
        assert (f" {name}/ (step" in message) == (out / name).exists(), name


def test_exploding_loss_through_the_cli_exits_with_an_error(data, tmp_path, tokenizer, capsys):
    from captioner.cli import main
    from captioner.demo.tiny import TINY_CLIP, tiny_gpt2

    tokenizer.save_pretrained(tmp_path / "tok")
    out = tmp_path / "run"
    rc = main(["train", "--data", str(data), "--output-dir", str(out), "--epochs", "1", "--batch-size", "16",
               "--lr", "1e30", "--warmup-steps", "0", "--val-images", "0", "--clip-config", json.dumps(TINY_CLIP),
               "--clip-pretrained", "none", "--tokenizer", str(tmp_path / "tok"),
               "--lm-config", json.dumps(tiny_gpt2(len(tokenizer))), "--prefix-length", "4", "--finetune-lm"])
    captured = capsys.readouterr()
    assert rc == 2 and "best captioner saved" not in captured.out
    lines = [x for x in captured.err.split("\n") if x.startswith("captioner train: error:")]
    assert len(lines) == 1 and "not finite" in lines[0] and "Traceback" not in captured.err


def test_transient_nonfinite_steps_are_skipped(data, tmp_path, tokenizer, monkeypatch):
    """Two bad batches in a row (fewer than max_nonfinite_steps) are skipped: the weights stay finite and
    training ends normally, with two optimiser steps fewer."""
    from captioner.model.model import CaptionModel

    clean = tmp_path / "clean"
    train(_config(data, clean, tokenizer), tokenizer=tokenizer)
    forward, calls = CaptionModel.forward, [0]

    def poisoned(self, *args, **kwargs):
        result = forward(self, *args, **kwargs)
        if self.training:
            calls[0] += 1
            if calls[0] in (2, 3):
                result.loss = result.loss * float("nan")
        return result
    monkeypatch.setattr(CaptionModel, "forward", poisoned)
    out = tmp_path / "run"
    best = train(_config(data, out, tokenizer, max_nonfinite_steps=3), tokenizer=tokenizer)
    assert best == out / "best" and best.exists() and _finite(out, "last") and _finite(out, "best")
    assert _steps(out) == list(range(1, _steps(clean)[-1] - 1))  # every step counted once, two skipped


def test_max_steps_mid_epoch_saves_the_final_model_and_contains_global_state(data, tmp_path, tokenizer):
    """Stopping before the first epoch ends still leaves a loadable last/ and a best/ (validated), and the
    returned path exists; accelerate's singletons and logger levels are as before the run."""
    from accelerate.state import AcceleratorState, GradientState

    from captioner.api import Captioner

    before = (dict(AcceleratorState._shared_state), dict(GradientState._shared_state),
              logging.getLogger("accelerate.utils.other").level)
    out = tmp_path / "run"
    best = train(_config(data, out, tokenizer, max_steps=1), tokenizer=tokenizer)
    assert best == out / "best" and best.is_dir()
    assert json.loads((out / "last" / "config.json").read_text())["step"] == 1
    Captioner.from_pretrained(out / "last", device="cpu")
    assert (dict(AcceleratorState._shared_state), dict(GradientState._shared_state),
            logging.getLogger("accelerate.utils.other").level) == before
    # resuming a run already at max_steps trains nothing more
    train(_config(data, out, tokenizer, max_steps=1, resume=True), tokenizer=tokenizer)
    assert _steps(out) == [1]


@pytest.fixture(scope="module")
def cut_run(data, tmp_path_factory, tokenizer):
    """A run stopped after 1 step, with a resumable state."""
    out = tmp_path_factory.mktemp("cut") / "run"
    train(_config(data, out, tokenizer, max_steps=1), tokenizer=tokenizer)
    return out


@pytest.mark.parametrize("change, named", [
    (dict(lr=1e-3), "lr (0.002 -> 0.001)"),
    (dict(batch_size=8), "batch_size"),
    (dict(epochs=3), "epochs"),
    (dict(data="elsewhere"), "data"),
    (dict(model_prefix_length=5), "model.prefix_length"),
])
def test_resume_refuses_a_changed_config(cut_run, data, tmp_path, tokenizer, change, named):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(cut_run, run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    model_kw = {k[len("model_"):]: v for k, v in change.items() if k.startswith("model_")}
    kw = {k: v for k, v in change.items() if not k.startswith("model_")}
    config = _config(kw.pop("data", data), run, tokenizer, resume=True, max_steps=2,
                     model=tiny_config(tokenizer, **model_kw), **kw)
    with pytest.raises(ConfigError) as e:
        train(config, tokenizer=tokenizer)
    assert named in str(e.value) and "\n" not in str(e.value) and "cannot resume" in str(e.value)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # nothing was touched


def test_resume_lists_fields_that_may_change(cut_run, data, tmp_path, tokenizer, caplog):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(cut_run, run)
    with caplog.at_level(logging.INFO, logger="captioner"):
        train(_config(data, run, tokenizer, resume=True, max_steps=2, log_every=2), tokenizer=tokenizer)
    assert "resuming with changed max_steps (1 -> 2), log_every (1 -> 2)" in caplog.text
    assert json.loads((run / "state" / "progress.json").read_text())["step"] == 2


class _Payload:
    """Unpickling this runs os.mkdir(marker): what a crafted state file could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.mark.parametrize("target", ["optimizer.pt", None])
def test_crafted_pickle_in_state_is_never_run(cut_run, data, tmp_path, tokenizer, target):
    """A pickle that runs code, put where the state files are (ours, and the pickles accelerate's
    save_state wrote): resume refuses it with one line, or never reads it; the code never runs."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(cut_run, run)
    marker = tmp_path / "pwned"
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl"):
        torch.save(_Payload(marker), run / "state" / name)
    try:
        if target:
            torch.save({"optimizer": _Payload(marker)}, run / "state" / target)
            with pytest.raises(CheckpointError) as e:
                train(_config(data, run, tokenizer, resume=True), tokenizer=tokenizer)
            assert "refused" in str(e.value) and "\n" not in str(e.value)
        else:
            train(_config(data, run, tokenizer, resume=True, max_steps=2), tokenizer=tokenizer)
    finally:
        assert not marker.exists()


def test_state_of_another_architecture_is_one_line(cut_run, data, tmp_path, tokenizer):
    """A state whose weights do not fit (config check bypassed: train_config.json edited along)."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(cut_run, run)
    config = _config(data, run, tokenizer, resume=True, model=tiny_config(tokenizer, prefix_length=3))
    saved = json.loads((run / "state" / "train_config.json").read_text())
    saved["model"]["prefix_length"] = 3
    (run / "state" / "train_config.json").write_text(json.dumps(saved))
    with pytest.raises(CheckpointError, match="model.safetensors: does not fit the model") as e:
        train(config, tokenizer=tokenizer)
    assert "\n" not in str(e.value)


def test_state_is_strict_json_and_an_old_pickled_state_is_refused(cut_run, data, tmp_path, tokenizer):
    import shutil

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))

    progress = strict((cut_run / "state" / "progress.json").read_text())
    assert progress["step"] == 1 and progress["saved"] == {"last": 1, "best": 1, "state": 1}
    strict((cut_run / "state" / "rng_0.json").read_text())
    run = tmp_path / "run"
    shutil.copytree(cut_run, run)
    del progress["format"]  # what accelerate's save_state left, with its pickles beside it
    (run / "state" / "progress.json").write_text(json.dumps(progress))
    with pytest.raises(CheckpointError, match="earlier version"):
        train(_config(data, run, tokenizer, resume=True), tokenizer=tokenizer)
