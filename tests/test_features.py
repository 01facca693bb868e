"""Feature cache: once per unique image, keyed by encoder, resumable."""

import pytest
import torch
from PIL import Image

from captioner.config import ModelConfig
from captioner.train.features import FeatureCache, encoder_key
from captioner.demo.tiny import TINY_CLIP


@pytest.fixture
def images(tmp_path):
    paths = []
    for i in range(10):
        p = tmp_path / f"im{i}.png"
        Image.new("RGB", (16, 16), (i * 20, 0, 0)).save(p)
        paths.append(str(p))
    return paths


def preprocess(im):
    return torch.tensor(im.getpixel((0, 0)), dtype=torch.float)  # (3,)


class Encoder:
    def __init__(self, fail_after=None):
        self.rows, self.fail_after, self.calls = 0, fail_after, 0

    def __call__(self, x):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt  # the process is interrupted mid-extraction
        self.rows += len(x)
        return x * 2  # (B, 3)


def test_each_unique_image_encoded_once(tmp_path, images):
    cache = FeatureCache(tmp_path / "c", "k", 3)
    enc = Encoder()
    paths = images + images[:4]  # duplicates, e.g. one row per caption
    feats = cache.get(paths, enc, preprocess, batch_size=3)
    assert enc.rows == 10
    assert feats.shape == (14, 3) and torch.equal(feats[10:], feats[:4])
    assert feats[3, 0].item() == 2 * 60
    enc2 = Encoder()
    again = FeatureCache(tmp_path / "c", "k", 3).get(paths[::-1], enc2, preprocess, batch_size=3)
    assert enc2.rows == 0 and torch.equal(again, feats.flip(0))
    # a modified file is encoded again
    Image.new("RGB", (16, 16), (1, 2, 3)).save(images[0])
    enc3 = Encoder()
    assert cache.get(images[:1], enc3, preprocess)[0].tolist() == [2, 4, 6] and enc3.rows == 1


def test_interrupted_extraction_resumes_without_recomputing(tmp_path, images):
    cache = FeatureCache(tmp_path / "c", "k", 3)
    with pytest.raises(KeyboardInterrupt):
        cache.get(images, Encoder(fail_after=2), preprocess, batch_size=3)  # 6 of 10 rows done
    enc = Encoder()
    feats = cache.get(images, enc, preprocess, batch_size=3)
    assert enc.rows == 4
    assert torch.equal(feats, torch.stack([preprocess(Image.open(p)) * 2 for p in images]))


def test_encoder_key_changes_with_encoder_and_preprocessing():
    a = ModelConfig(clip_config=TINY_CLIP, clip_pretrained=None)
    b = ModelConfig(clip_config={**TINY_CLIP, "embed_dim": 64}, clip_pretrained=None)
    c = ModelConfig(clip_model="ViT-B-32", clip_pretrained="openai")
    d = ModelConfig(clip_model="ViT-B-32", clip_pretrained="laion2b_s34b_b79k")
    keys = {encoder_key(x, "resize 224") for x in (a, b, c, d)}
    assert len(keys) == 4
    assert encoder_key(a, "resize 224") != encoder_key(a, "resize 256")
    assert encoder_key(a, "resize 224") == encoder_key(ModelConfig(clip_config=TINY_CLIP, clip_pretrained=None),
                                                       "resize 224")
