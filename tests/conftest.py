"""Shared fixtures: a tokenizer trained on the fly, tiny captioners, a generated shapes caption set."""

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

CAPTIONS = ["a red circle at the top left", "a blue square in the center", "a green triangle at the bottom right",
            "a small yellow circle in the top right corner", "there is a large blue triangle at the bottom left"]


@pytest.fixture(scope="session")
def tokenizer():
    from captioner.tiny import train_tokenizer

    return train_tokenizer(CAPTIONS * 20, vocab_size=300)


@pytest.fixture
def make_captioner(tokenizer):
    from captioner.api import Captioner
    from captioner.tiny import tiny_config

    def make(seed=0, **overrides):
        torch.manual_seed(seed)
        return Captioner.from_config(tiny_config(tokenizer, **overrides), tokenizer=tokenizer, device="cpu")
    return make


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory):
    from captioner.shapes import make_shapes_dataset

    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), n_train=360, n_val=30, n_test=60, seed=1)
