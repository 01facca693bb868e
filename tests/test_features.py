"""Feature cache: once per unique image, keyed by encoder, resumable."""

import dataclasses

import pytest
import torch
from PIL import Image

from captioner.config import ModelConfig
from captioner.errors import ImageError
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


def test_any_file_name_survives_an_interrupted_extraction(tmp_path):
    """Keys hold the path, size and mtime joined by "|"; a name containing "|" once made the resumed
    extraction read a path cut at its first "|" (no such file) on every rerun."""
    folder = tmp_path / "a|b"
    folder.mkdir()
    paths = []
    for i, name in enumerate(["x|1.png", "y|2|3.png", "z.png", "w\u2028.png"]):
        Image.new("RGB", (8, 8), (10 * i + 5, 0, 0)).save(folder / name)
        paths.append(str(folder / name))
    cache = FeatureCache(tmp_path / "c", "k", 3)
    with pytest.raises(KeyboardInterrupt):
        cache.get(paths, Encoder(fail_after=1), preprocess, batch_size=2)  # killed after the first batch
    enc = Encoder()
    feats = cache.get(paths, enc, preprocess, batch_size=2)
    assert enc.rows == 2 and feats[:, 0].tolist() == [10.0, 30.0, 50.0, 70.0]


def test_removed_bad_image_does_not_block_later_runs(tmp_path, images):
    """A corrupt image stops a strict extraction; once the user removes it, the next run encodes the rest
    instead of trying to resume the removed file's row for ever."""
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    paths = images[:3] + [str(bad)] + images[3:6]
    cache = FeatureCache(tmp_path / "c", "k", 3)
    with pytest.raises(ImageError, match="bad.png"):
        cache.get(paths, Encoder(), preprocess, batch_size=2)
    bad.unlink()
    paths.remove(str(bad))
    enc = Encoder()
    feats = cache.get(paths, enc, preprocess, batch_size=2)
    assert feats[:, 0].tolist() == [2.0 * 20 * i for i in range(6)]
    assert enc.rows <= 6 - 2  # the first batch was kept


def test_unreadable_inputs_are_reported_and_the_rest_encoded(tmp_path, images):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    paths = [images[2], str(bad), str(tmp_path / "gone.png"), images[1], str(bad)]
    errors = {}
    feats = FeatureCache(tmp_path / "c", "k", 3).get(paths, Encoder(), preprocess, batch_size=2, errors=errors)
    assert sorted(errors) == sorted([str(bad), str(tmp_path / "gone.png")])
    assert "gone.png: no such file" in errors[str(tmp_path / "gone.png")]
    assert feats[:, 0].tolist() == [80.0, 0.0, 0.0, 40.0, 0.0]  # bad rows are zeros, the others encoded
    errors2 = {}
    again = FeatureCache(tmp_path / "c", "k", 3).get(paths, Encoder(), preprocess, errors=errors2)
    assert errors2 == errors and torch.equal(again, feats)


@pytest.fixture
def broken_set(tmp_path):
    """A tiny shapes caption set with one corrupt and one truncated training image."""
    from captioner.demo.shapes import make_shapes_dataset

    data = make_shapes_dataset(tmp_path / "shapes", n_train=10, n_val=0, n_test=0, seed=4)
    files = sorted((data / "train").glob("*.png"))
    files[2].write_bytes(b"not a png at all")
    files[5].write_bytes(files[5].read_bytes()[:60])
    return data, [str(files[2]), str(files[5])]


@pytest.mark.parametrize("cache", [False, True])
def test_training_encoding_skips_unreadable_inputs_unless_strict(make_captioner, broken_set, tmp_path, caplog, cache):
    from captioner.config import TrainConfig
    from captioner.data import load_caption_set
    from captioner.train.loop import encode_examples

    data, bad = broken_set
    cap = make_captioner()
    examples = load_caption_set(str(data), "train")[0]
    config = TrainConfig(data=str(data), encode_batch_size=3,
                         feature_cache=str(tmp_path / "cache") if cache else None)
    with caplog.at_level("WARNING"):
        kept, feats = encode_examples(cap, examples, config, desc="encoding train")
    assert [ex.image for ex in kept] == [ex.image for ex in examples if ex.image not in bad]
    warnings = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(warnings) == 1 and "2 unreadable input(s) skipped, 2 of 10 items dropped" in warnings[0]
    assert all(name in warnings[0] for name in bad)
    expected = cap.encode_inputs([{"image": ex.image} for ex in kept])["image"]
    torch.testing.assert_close(feats.features["image"], expected, rtol=1e-5, atol=1e-6)
    assert feats.present["image"].all()
    with pytest.raises(ImageError, match="shapes/train/"):
        encode_examples(cap, examples, dataclasses.replace(config, strict=True), desc="encoding train")


def test_training_runs_past_an_unreadable_image(broken_set, tmp_path, tokenizer):
    from captioner.config import TrainConfig
    from captioner.demo.tiny import tiny_config
    from captioner.train.loop import train

    data, _ = broken_set
    config = TrainConfig(data=str(data), output_dir=str(tmp_path / "run"), epochs=1, batch_size=8, val_split=None,
                         val_images=0, model=tiny_config(tokenizer))
    assert (train(config, tokenizer=tokenizer) / "model.safetensors").exists()
    with pytest.raises(ImageError):
        train(dataclasses.replace(config, strict=True, output_dir=str(tmp_path / "strict")), tokenizer=tokenizer)
