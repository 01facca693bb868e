"""Training loop: sampler sharding, resume equivalence, gradient accumulation, two processes."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from captioner.config import ConfigError
from captioner.demo.shapes import make_shapes_dataset
from captioner.demo.tiny import tiny_config
from captioner.train.loop import CaptionBatchSampler, TrainConfig, lr_lambda, train


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("bucket", [True, False])
def test_sampler_uses_each_pair_once_with_equal_batch_counts(world, bucket):
    lengths = [(i * 7) % 13 + 1 for i in range(101)]
    samplers = [CaptionBatchSampler(lengths, batch_size=8, seed=1, bucket=bucket, rank=r, world=world)
                for r in range(world)]
    for epoch in range(2):
        seen = []
        for s in samplers:
            s.set_epoch(epoch)
            batches = list(s)
            assert all(batches) and len(batches) == len(samplers[0])
            seen += [i for b in batches for i in b]
        assert sorted(seen) == list(range(101))
    a, b = (CaptionBatchSampler(lengths, batch_size=8, seed=1, bucket=bucket) for _ in range(2))
    a.set_epoch(0), b.set_epoch(1)
    assert list(a) != list(b)  # a new order each epoch
    a.set_epoch(1, start=3)
    assert list(a) == list(b)[3:]  # resuming mid-epoch skips finished batches


def test_bucketing_reduces_padding():
    lengths = [(i * 7919) % 37 + 1 for i in range(2000)]

    def padding(bucket):
        s = CaptionBatchSampler(lengths, batch_size=32, seed=0, bucket=bucket)
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in s)
    assert padding(True) < 0.2 * padding(False)


def test_lr_schedule():
    assert lr_lambda(0, warmup=10, total=100, schedule="cosine") == pytest.approx(0.1)
    assert lr_lambda(10, warmup=10, total=100, schedule="cosine") == pytest.approx(1.0)
    assert lr_lambda(100, warmup=10, total=100, schedule="cosine") == pytest.approx(0.0)
    assert lr_lambda(55, warmup=10, total=100, schedule="linear") == pytest.approx(0.5)
    with pytest.raises(ConfigError):
        TrainConfig(schedule="step")


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    return make_shapes_dataset(tmp_path_factory.mktemp("small"), n_train=40, n_val=8, n_test=0, seed=3)


def _config(data, out, tokenizer, **kw):
    base = dict(data=str(data), output_dir=str(out), epochs=2, batch_size=32, lr=2e-3, warmup_steps=3,
                val_images=0, log_every=1, seed=5, model=tiny_config(tokenizer))
    return TrainConfig(**{**base, **kw})


def _weights(run):
    return load_file(str(Path(run) / "last" / "model.safetensors"))


@pytest.mark.parametrize("accum", [1, 2])
def test_resume_matches_uninterrupted_run(small_data, tmp_path, tokenizer, accum):
    """Stopped after k optimiser steps (mid-epoch) and resumed == never stopped."""
    train(_config(small_data, tmp_path / "full", tokenizer, grad_accum_steps=accum), tokenizer=tokenizer)
    cut = _config(small_data, tmp_path / "cut", tokenizer, grad_accum_steps=accum, max_steps=3)
    train(cut, tokenizer=tokenizer)
    progress = json.loads((tmp_path / "cut" / "state" / "progress.json").read_text())
    assert progress["step"] == cut.max_steps and progress["batch"] > 0  # stopped mid-epoch
    train(_config(small_data, tmp_path / "cut", tokenizer, grad_accum_steps=accum, resume=True), tokenizer=tokenizer)
    full, resumed = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert full.keys() == resumed.keys()
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=1e-5, atol=1e-6)
    steps = [json.loads(x)["step"] for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == sorted(set(steps))  # no optimiser step was done twice
    n_pairs = sum(len(json.loads(x)["captions"]) for x in (small_data / "train" / "metadata.jsonl").open())
    per_epoch = -(-(-(-n_pairs // 32)) // accum)
    assert steps[-1] == 2 * per_epoch


def test_resume_with_modality_dropout_matches_uninterrupted_run(tmp_path, tokenizer):
    """Image + audio with modality dropout: the dropped inputs are the same after a resume."""
    from captioner.demo.sounds import make_scenes_dataset

    data = make_scenes_dataset(tmp_path / "scenes", n_train=48, n_val=0, n_test=0, seed=2)
    model = tiny_config(tokenizer, modalities=["image", "audio"])
    kw = dict(val_split=None, model=model, modality_dropout=0.5, batch_size=16)
    train(_config(data, tmp_path / "full", tokenizer, **kw), tokenizer=tokenizer)
    train(_config(data, tmp_path / "cut", tokenizer, max_steps=4, **kw), tokenizer=tokenizer)
    train(_config(data, tmp_path / "cut", tokenizer, resume=True, **kw), tokenizer=tokenizer)
    full, resumed = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert any(k.startswith("mappers.audio.") for k in full) and "modality_embed" in full
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=1e-5, atol=1e-6)
    # and the dropout does change training: without it the weights differ
    train(_config(data, tmp_path / "nodrop", tokenizer, **{**kw, "modality_dropout": 0.0}), tokenizer=tokenizer)
    assert not torch.allclose(_weights(tmp_path / "nodrop")["modality_embed"], full["modality_embed"])


def test_two_processes_train_one_consistent_checkpoint(small_data, tmp_path, tokenizer):
    """torchrun with 2 CPU processes (gloo), through the CLI as users launch it."""
    import os
    import subprocess
    import sys

    from captioner.demo.tiny import TINY_CLIP, tiny_gpt2

    tokenizer.save_pretrained(tmp_path / "tok")
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "captioner", "train", "--data", str(small_data), "--output-dir", str(out), "--epochs", "1",
           "--batch-size", "16", "--lr", "2e-3", "--val-images", "0", "--log-every", "1",
           "--clip-config", json.dumps(TINY_CLIP), "--clip-pretrained", "none", "--tokenizer", str(tmp_path / "tok"),
           "--lm-config", json.dumps(tiny_gpt2(len(tokenizer))), "--finetune-lm", "--prefix-length", "4"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from captioner.api import Captioner
    cap = Captioner.from_pretrained(out / "last", device="cpu")
    assert cap.caption_features(torch.randn(2, cap.model.image_encoder.output_dim))  # loads and decodes
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    n_pairs = sum(len(json.loads(x)["captions"]) for x in (small_data / "train" / "metadata.jsonl").open())
    assert steps == list(range(1, -(-n_pairs // 16) + 1))  # one line per global step, from the main process only
    assert "; 2 processes x 13 batches per epoch" in proc.stderr


def test_val_every_validates_and_saves_mid_epoch(small_data, tmp_path, tokenizer):
    cfg = _config(small_data, tmp_path / "run", tokenizer, epochs=1, batch_size=8, val_every=2, val_images=4)
    train(cfg, tokenizer=tokenizer)
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    validations = [r["step"] for r in records if "val_loss" in r]
    n_steps = max(r["step"] for r in records)
    assert validations == [*range(2, n_steps, 2), n_steps]  # every 2 steps, and at the epoch's end
    assert all("val_cider" in r for r in records if "val_loss" in r)
    assert json.loads((tmp_path / "run" / "last" / "config.json").read_text())["step"] == n_steps
