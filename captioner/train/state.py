"""Resumable training state in `<run>/state/`, written and read without pickles of arbitrary objects.

- `model.safetensors`: the whole model (tied weights stored once);
- `optimizer.pt`: optimizer, scheduler and gradient-scaler state dicts (tensors, numbers, lists), read back
  with `torch.load(weights_only=True)`, which refuses any other object;
- `rng_<rank>.json`: the Python, NumPy and torch (CPU, CUDA) random states of each process;
- `train_config.json`: the config the state belongs to; a resume with a changed config is checked
  against it (`check_resume_config`);
- `progress.json`: step, epoch, batch, best score (null before the first), what was saved (strict JSON);
  written last, so its presence marks a complete state.

A save is written to `state.tmp/` and swapped in by two renames; a kill leaves `state/` or `state.old/`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from captioner.config import TrainConfig, save_json, to_dict
from captioner.errors import CheckpointError, ConfigError
from captioner.files import plain_mode

logger = logging.getLogger(__name__)

STATE_FORMAT = 2  # 1 (no "format" key): accelerate's save_state, with pickles: not loaded
# Fields that only change how the rest of a run is stopped, logged, saved or fed; every other field
# (data, schedule, batch size, model, ...) would mix two runs in one, so a resume refuses a change.
RESUMABLE_CHANGES = ("max_steps", "log_every", "val_every", "save_every", "val_images", "num_workers",
                     "feature_cache", "encode_batch_size", "max_nonfinite_steps", "resume", "output_dir",
                     "val_strategy", "val_num_beams", "overwrite")
_PATHS = ("data", "image_root", "audio_root")  # compared after normalisation ("./x" == "x")


def latest_state(out: Path) -> Path | None:
    """The newest complete saved state: state/, or state.old/ if a kill fell between the two renames."""
    for name in ("state", "state.old"):
        if (out / name / "progress.json").exists():
            return out / name
    return None


def _flat(config: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in config.items():
        if k == "model" and isinstance(v, dict) and not prefix:
            flat.update(_flat(v, "model."))
        else:
            flat[prefix + k] = os.path.normpath(v) if k in _PATHS and isinstance(v, str) and v else v
    return flat


def check_resume_config(config: TrainConfig, state_dir: Path) -> None:
    """Refuse to resume with a changed field that would mix two runs (one line naming each); log the
    fields that may change."""
    path = state_dir / "train_config.json"
    if not path.exists():  # an older state: the run's own copy (not yet rewritten by this run)
        path = state_dir.parent / "train_config.json"
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read the config of the run being resumed ({e})") from None
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    defaults, now = _flat(to_dict(TrainConfig())), _flat(to_dict(config))
    saved = {**defaults, **_flat(saved)}  # fields added since the state was written have their defaults
    diff = {k: (saved[k], now[k]) for k in now if saved.get(k) != now[k]}
    fixed = [k for k in diff if k not in RESUMABLE_CHANGES]
    if fixed:
        changes = ", ".join(f"{k} ({diff[k][0]!r} -> {diff[k][1]!r})" for k in fixed)
        raise ConfigError(f"{state_dir}: cannot resume with a changed {changes}: the run was trained with the "
                          "earlier values; use them, or train into a new output directory")
    changed = [k for k in diff if k not in ("resume", "output_dir")]
    if changed:
        logger.info("resuming with changed %s", ", ".join(f"{k} ({diff[k][0]!r} -> {diff[k][1]!r})" for k in changed))


def _rng_state() -> dict:
    version, key, gauss = random.getstate()
    kind, mt, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(key), gauss], "numpy": [kind, mt.tolist(), pos, has_gauss, cached],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: dict) -> None:
    version, key, gauss = state["python"]
    random.setstate((version, tuple(key), gauss))
    kind, mt, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(mt, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def save_state(accelerator, out: Path, *, model, optimizer, scheduler, config: TrainConfig, progress: dict) -> None:
    """Write the resumable state, swapped in atomically: a kill mid-save leaves the previous state intact."""
    from safetensors.torch import save_model

    tmp, final, old = out / "state.tmp", out / "state", out / "state.old"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        save_model(accelerator.unwrap_model(model), str(tmp / "model.safetensors"))
        os.chmod(tmp / "model.safetensors", plain_mode())  # safetensors creates it 0600; others may resume or read it
        scaler = getattr(accelerator, "scaler", None)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None}, tmp / "optimizer.pt")
        save_json(config, tmp / "train_config.json")
    accelerator.wait_for_everyone()
    (tmp / f"rng_{accelerator.process_index}.json").write_text(json.dumps(_rng_state()))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        best = progress["best"] if math.isfinite(progress["best"]) else None  # strict JSON: no Infinity
        (tmp / "progress.json").write_text(json.dumps({**progress, "best": best, "format": STATE_FORMAT}))
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)  # a leftover of an earlier kill; final is complete
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _load_tensors(path: Path, map_location="cpu"):
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; the saved state is incomplete") from None
    except Exception as e:  # weights_only refuses any object that is not plain tensors and containers
        reason = str(e).strip().split("\n")[0][:200]
        raise CheckpointError(f"{path}: not a plain tensor file, refused without running it ({reason})") from None


def load_state(accelerator, state_dir: Path, *, model, optimizer, scheduler) -> dict:
    """Restore what `save_state` wrote; returns the progress record. Errors are one CheckpointError line."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    try:
        progress = json.loads((state_dir / "progress.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{state_dir / 'progress.json'}: unreadable ({e})") from None
    if not isinstance(progress, dict) or progress.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{state_dir}: saved by an earlier version (pickled accelerate state), which is not "
                              "loaded because unpickling can run code; start the run again without resuming")
    if progress.get("best") is None:
        progress["best"] = float("inf")
    try:
        load_model(accelerator.unwrap_model(model), str(state_dir / "model.safetensors"),
                   device=str(accelerator.device))
    except (OSError, RuntimeError, SafetensorError) as e:
        reason = " ".join(str(e).split())[:300]
        raise CheckpointError(f"{state_dir / 'model.safetensors'}: does not fit the model ({reason})") from None
    blob = _load_tensors(state_dir / "optimizer.pt")
    try:
        optimizer.load_state_dict(blob["optimizer"])
        scheduler.load_state_dict(blob["scheduler"])
        scaler = getattr(accelerator, "scaler", None)
        if scaler is not None and blob.get("scaler") is not None:
            scaler.load_state_dict(blob["scaler"])
    except (AttributeError, KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{state_dir / 'optimizer.pt'}: does not fit the optimizer ({e})") from None
    rng = state_dir / f"rng_{accelerator.process_index}.json"
    try:
        _set_rng_state(json.loads(rng.read_text()))
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{rng}: unreadable random state ({e})") from None
    return progress
