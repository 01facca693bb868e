"""CLIPScore / RefCLIPScore against direct computations, on a tiny random open_clip model and on a
fixed-vector stand-in whose cosines are chosen exactly. Offline: no pretrained weights."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from captioner.scoring.clipscore import CLIPScorer
from captioner.model.encoders import ModelLoadError

PROMPT = "A photo depicts "
TINY_CLIP_TEXT = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
CAPTIONS = ["a red circle", "two dogs on a beach", "a blue square in the center", "a man riding a horse",
            "green triangle", "an empty street at night"]


def random_images(n, seed=0, size=40):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def scorer():
    torch.manual_seed(1)  # a seed whose random towers give mostly positive image-text cosines
    return CLIPScorer.from_open_clip("tiny-test", None, clip_config=TINY_CLIP_TEXT)


@torch.no_grad()
def direct_image(scorer, images):
    pixels = torch.stack([scorer.preprocess(im) for im in images])
    return F.normalize(scorer.model.encode_image(pixels), dim=-1)


@torch.no_grad()
def direct_text(scorer, texts):
    return F.normalize(scorer.model.encode_text(scorer.tokenizer(list(texts))), dim=-1)


def direct_clip_s(scorer, images, captions, prefix=PROMPT):
    img = direct_image(scorer, images)
    txt = direct_text(scorer, [prefix + c for c in captions])
    return 2.5 * (img * txt).sum(-1).clamp(min=0)


# ---------------------------------------------------------------------- a fixed-vector stand-in


class FixedCLIP(nn.Module):
    """encode_image returns the preprocessed vector; encode_text looks token id 0 up in a table."""

    def __init__(self, text_vectors):
        super().__init__()
        self.register_buffer("table", torch.tensor(text_vectors, dtype=torch.float32))
        self.image_calls = 0

    def encode_image(self, x):
        self.image_calls += 1
        return x

    def encode_text(self, tokens):
        return self.table[tokens[:, 0]]


def fixed_scorer(image_vectors, text_vectors, **kw):
    """Images are solid-colour PIL images whose colour indexes `image_vectors`; texts (exactly as fed
    to the model, prompt included) are the keys of `text_vectors`; an unknown text raises KeyError."""
    names = list(text_vectors)
    seen = []

    def tokenizer(texts):
        seen.extend(texts)
        return torch.tensor([[names.index(t)] for t in texts])

    def preprocess(im):
        return torch.tensor(image_vectors[im.getpixel((0, 0))[0]], dtype=torch.float32)

    model = FixedCLIP([text_vectors[n] for n in names])
    images = [Image.new("RGB", (2, 2), (i, 0, 0)) for i in range(len(image_vectors))]
    return CLIPScorer(model=model, preprocess=preprocess, tokenizer=tokenizer, **kw), images, seen


# ---------------------------------------------------------------------- CLIPScore


def test_tiny_config_builds_both_towers_and_its_tokenizer(scorer):
    tokens = scorer.tokenizer(["a photo", "b"])
    assert tokens.shape == (2, 32) and tokens.dtype == torch.long
    assert not scorer.model.training
    assert scorer.image_embeddings(random_images(3)).shape == (3, 32)
    emb = scorer.text_embeddings(["a", "b c"])
    assert emb.shape == (2, 32)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_clipscore_equals_direct_computation_with_prompt(scorer):
    images = random_images(len(CAPTIONS))
    expected = direct_clip_s(scorer, images, CAPTIONS)
    unprompted = direct_clip_s(scorer, images, CAPTIONS, prefix="")
    assert (expected > 0).sum() >= 2 and not torch.allclose(expected, unprompted, atol=1e-4)  # a meaningful check

    out = scorer.score(images, CAPTIONS)
    got = torch.tensor([row["CLIPScore"] for row in out["per_image"]])
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, unprompted, atol=1e-4)
    assert out["corpus"]["CLIPScore"] == pytest.approx(float(expected.mean()), abs=1e-6)
    assert set(out["corpus"]) == {"CLIPScore"} and all(set(r) == {"CLIPScore"} for r in out["per_image"])


def test_prompt_reaches_the_model_for_candidates_and_references():
    vec = {PROMPT + "cat": [1, 0, 0], PROMPT + "a cat": [1, 0, 0]}
    s, images, seen = fixed_scorer({0: [1, 0, 0]}, vec)
    out = s.score(images, ["cat"], [["a cat"]])  # unprompted texts would raise KeyError in the tokenizer
    assert sorted(seen) == sorted(vec)
    assert out["per_image"][0] == {"CLIPScore": pytest.approx(2.5), "RefCLIPScore": pytest.approx(2 * 2.5 / 3.5)}
    # references verbatim when asked
    s, images, seen = fixed_scorer({0: [1, 0, 0]}, {PROMPT + "cat": [1, 0, 0], "a cat": [0, 1, 0]},
                                   prompt_references=False)
    assert s.score(images, ["cat"], [["a cat"]])["per_image"][0]["RefCLIPScore"] == 0.0
    assert "a cat" in seen


def test_negative_cosine_is_clipped_to_zero_and_refclipscore_has_no_nan():
    x, y = [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]
    neg_x = [-1.0, 0.0, 0.0]
    vec = {PROMPT + "opposite": neg_x, PROMPT + "aligned": x, PROMPT + "ref x": x, PROMPT + "ref -x": neg_x,
           PROMPT + "ref y": y}
    s, images, _ = fixed_scorer({0: x, 1: x, 2: x}, vec)
    out = s.score(images, ["opposite", "opposite", "aligned"], [["ref -x"], ["ref x"], ["ref -x"]])
    rows = out["per_image"]
    # cos(image, candidate) = -1 -> CLIPScore exactly 0 (not -2.5)
    assert rows[0]["CLIPScore"] == 0.0 and rows[1]["CLIPScore"] == 0.0
    assert rows[2]["CLIPScore"] == pytest.approx(2.5)
    assert rows[0]["RefCLIPScore"] == 0.0  # CLIP-S 0, text sim +1: harmonic mean with a 0 term is 0
    assert rows[1]["RefCLIPScore"] == 0.0  # CLIP-S 0, text sim -1 clipped to 0: 0/0 must not be NaN
    assert rows[2]["RefCLIPScore"] == 0.0  # CLIP-S 2.5, text sim -1 clipped to 0
    for v in (*out["corpus"].values(), *(v for r in rows for v in r.values())):
        assert math.isfinite(v)
    assert out["corpus"] == {"CLIPScore": pytest.approx(2.5 / 3), "RefCLIPScore": 0.0}


def test_negative_cosine_on_the_open_clip_model_is_clipped(scorer, monkeypatch):
    images = random_images(3, seed=3)
    v = direct_image(scorer, images[:1])  # (1, D)
    # every image embeds to v and every text to -3v: image-text cosines are all -1, text-text +1
    monkeypatch.setattr(scorer.model, "encode_image", lambda pixels: v.expand(len(pixels), -1))
    monkeypatch.setattr(scorer.model, "encode_text", lambda tokens: -3.0 * v.expand(len(tokens), -1))
    out = scorer.score(images, ["x", "y", "z"], [["r"], ["r", "x"], ["r"]])
    assert [r["CLIPScore"] for r in out["per_image"]] == [0.0, 0.0, 0.0]
    assert [r["RefCLIPScore"] for r in out["per_image"]] == [0.0, 0.0, 0.0]
    assert out["corpus"] == {"CLIPScore": 0.0, "RefCLIPScore": 0.0}


# ---------------------------------------------------------------------- RefCLIPScore


def test_refclipscore_equals_harmonic_mean_of_direct_computation(scorer):
    images = random_images(len(CAPTIONS), seed=1)
    refs = [["a red ball", "a circle", "red"], ["dogs running"], ["a square", "blue"], ["horse riding", "a man"],
            ["a triangle", "red"], ["night street", "a road", "a city at night"]]
    clip_s = direct_clip_s(scorer, images, CAPTIONS)
    cand = direct_text(scorer, [PROMPT + c for c in CAPTIONS])
    text_sim = torch.stack([(direct_text(scorer, [PROMPT + r for r in rs]) @ cand[i]).max()
                            for i, rs in enumerate(refs)]).clamp(min=0)
    expected = torch.where(clip_s + text_sim > 0, 2 * clip_s * text_sim / (clip_s + text_sim), torch.zeros(()))
    assert (expected > 0).sum() >= 2  # the check below is not all zeros

    out = scorer.score(images, CAPTIONS, refs)
    got = torch.tensor([r["RefCLIPScore"] for r in out["per_image"]])
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(torch.tensor([r["CLIPScore"] for r in out["per_image"]]), clip_s, atol=1e-5)
    # corpus = mean of per-image harmonic means
    assert out["corpus"]["RefCLIPScore"] == pytest.approx(float(expected.mean()), abs=1e-6)
    assert out["corpus"]["CLIPScore"] == pytest.approx(float(clip_s.mean()), abs=1e-6)


def test_refclipscore_uses_the_best_reference_and_mean_of_per_image_values():
    s2 = 1 / math.sqrt(2)
    vec = {PROMPT + "diag": [s2, s2, 0], PROMPT + "y": [0, 1, 0], PROMPT + "diag ref": [s2, s2, 0],
           PROMPT + "x": [1, 0, 0], PROMPT + "z": [0, 0, 1]}
    s, images, _ = fixed_scorer({0: [1, 0, 0], 1: [0, 0, 1]}, vec)
    clip_s = 2.5 * s2
    one = s.score(images[:1], ["diag"], [["y"]])["per_image"][0]
    assert one["CLIPScore"] == pytest.approx(clip_s)
    assert one["RefCLIPScore"] == pytest.approx(2 * clip_s * s2 / (clip_s + s2))
    # the best reference counts (max, not mean or first), whatever its position
    for refs in (["y", "diag ref", "z"], ["diag ref", "z"], ["z", "y", "diag ref"]):
        row = s.score(images[:1], ["diag"], [refs])["per_image"][0]
        assert row["RefCLIPScore"] == pytest.approx(2 * clip_s * 1.0 / (clip_s + 1.0))
    # corpus RefCLIPScore is the mean of per-image harmonic means, not the harmonic mean of the corpus means
    out = s.score(images, ["diag", "z"], [["diag ref"], ["y", "x"]])
    h0 = 2 * clip_s / (clip_s + 1.0)
    assert [r["RefCLIPScore"] for r in out["per_image"]] == [pytest.approx(h0), 0.0]  # cos(z, x|y) = 0
    assert out["corpus"]["RefCLIPScore"] == pytest.approx(h0 / 2)
    assert out["corpus"]["CLIPScore"] == pytest.approx((clip_s + 2.5) / 2)


def test_each_unique_text_is_encoded_once():
    vec = {PROMPT + t: [1, 0, 0] for t in ("a", "b", "r1", "r2")}
    s, images, seen = fixed_scorer({0: [1, 0, 0], 1: [0, 1, 0]}, vec, batch_size=2)
    s.score(images * 2, ["a", "b", "a", "b"], [["r1", "r2"], ["r2", "r1", "r2"], ["r1"], ["a"]])
    assert sorted(seen) == sorted(vec)  # each distinct text once; a reference equal to a candidate shared
    assert s.model.image_calls == 2  # 4 images in batches of 2


# ---------------------------------------------------------------------- batching, inputs, loading


def test_batching_does_not_change_results(scorer):
    images = random_images(len(CAPTIONS), seed=2)
    refs = [[c, "something else"] for c in reversed(CAPTIONS)]
    results = {}
    for bs in (1, 4, 64):
        scorer.batch_size = bs
        results[bs] = scorer.score(images, CAPTIONS, refs)
    scorer.batch_size = 64
    for bs in (1, 4):
        for key in ("CLIPScore", "RefCLIPScore"):
            assert results[bs]["corpus"][key] == pytest.approx(results[64]["corpus"][key], abs=1e-5)
            for a, b in zip(results[bs]["per_image"], results[64]["per_image"]):
                assert a[key] == pytest.approx(b[key], abs=1e-5)
    one = CLIPScorer(model=scorer.model, preprocess=scorer.preprocess, tokenizer=scorer.tokenizer, batch_size=1)
    assert torch.allclose(one.image_embeddings(images), scorer.image_embeddings(images), atol=1e-5)
    assert torch.allclose(one.text_embeddings(CAPTIONS), scorer.text_embeddings(CAPTIONS), atol=1e-5)


def test_mismatched_inputs_are_rejected(scorer):
    images = random_images(2)
    with pytest.raises(ValueError, match="one per image"):
        scorer.score(images, ["only one"])
    with pytest.raises(ValueError, match="reference lists"):
        scorer.score(images, ["a", "b"], [["r"]])
    with pytest.raises(ValueError, match=r"references\[1\]"):
        scorer.score(images, ["a", "b"], [["r"], []])


def test_unknown_model_name_is_a_model_load_error():
    with pytest.raises(ModelLoadError, match="no-such-clip-arch"):
        CLIPScorer.from_open_clip("no-such-clip-arch", None)


def test_inline_config_with_missing_checkpoint_is_a_model_load_error(tmp_path):
    missing = str(tmp_path / "nope.pt")
    with pytest.raises(ModelLoadError, match="nope.pt"):
        CLIPScorer.from_open_clip("tiny-test", missing, clip_config=TINY_CLIP_TEXT)
