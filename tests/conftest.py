"""Shared fixtures: a tokenizer trained on the fly, tiny captioners, a generated shapes caption set."""

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))
# Tiny captioners run on CPU; eval/gpu_bench.sh sets cuda to run the decoding tests on a GPU.
DEVICE = os.environ.get("CAPTIONER_TEST_DEVICE", "cpu")

CAPTIONS = ["a red circle at the top left", "a blue square in the center", "a green triangle at the bottom right",
            "a small yellow circle in the top right corner", "there is a large blue triangle at the bottom left"]


@pytest.fixture(scope="session")
def tokenizer():
    from captioner.demo.tiny import train_tokenizer

    return train_tokenizer(CAPTIONS * 20, vocab_size=300)


@pytest.fixture
def make_captioner(tokenizer):
    from captioner.api import Captioner
    from captioner.demo.tiny import tiny_config

    def make(seed=0, **overrides):
        torch.manual_seed(seed)
        return Captioner.from_config(tiny_config(tokenizer, **overrides), tokenizer=tokenizer, device=DEVICE)
    return make


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory):
    from captioner.demo.shapes import make_shapes_dataset

    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), n_train=360, n_val=30, n_test=60, seed=1)


def tiny_train_argv(data, root, examples, *, epochs: int, batch_size: int, extra=()) -> list[str]:
    """argv of `captioner train` for a tiny captioner on `data`, with a tokenizer trained on the
    examples' captions and saved under root; lr 2e-3, fine-tuned tiny GPT-2, prefix 4."""
    import json

    from captioner.demo.tiny import TINY_CLIP, tiny_gpt2, train_tokenizer

    tok = train_tokenizer([c for ex in examples for c in ex.captions])
    tok.save_pretrained(root / "tokenizer")
    return ["train", "--data", str(data), "--output-dir", str(root / "run"), "--epochs", str(epochs),
            "--batch-size", str(batch_size), "--lr", "2e-3", "--clip-config", json.dumps(TINY_CLIP),
            "--clip-pretrained", "none", "--lm-config", json.dumps(tiny_gpt2(len(tok))),
            "--tokenizer", str(root / "tokenizer"), "--finetune-lm", "--prefix-length", "4", *extra]


@pytest.fixture(autouse=True)
def _fresh_hub_probe():
    """hub_reachable caches its network answer per process: every test starts without one (no order dependence)."""
    from captioner import hub

    hub.reset_hub_probe()
