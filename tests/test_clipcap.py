"""ClipCap checkpoints: conversion of both layouts, checked against an independent forward of ClipCap's
published architecture written here from its description (not from our modules), ClipCap's own greedy
and beam search, and the refusal of bad files."""

import pickle
import re

import pytest
import torch
import torch.nn.functional as F

from captioner.config import DecodeConfig
from captioner.demo.tiny import TINY_CLIP
from captioner.errors import CheckpointError

D, HEADS, FEAT = 32, 4, TINY_CLIP["embed_dim"]  # tiny GPT-2 width, its heads, the tiny CLIP feature width
ATOL = 1e-5


def gpt2_state(vocab, *, seed=0, legacy=True):
    """A tiny GPT-2 as ClipCap saved it: under `gpt.`, lm_head tied, the old attn.bias/masked_bias buffers."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=D, n_layer=2, n_head=HEADS, n_positions=128))
    state = {"gpt." + k: v.clone() for k, v in lm.state_dict().items()}
    # GPT-2's init (std 0.02) gives near-uniform next-token distributions whose beam orderings hinge on 1e-7
    # rounding; embeddings of std 0.6 give logits of a trained model's spread.
    state["gpt.transformer.wte.weight"] *= 30
    state["gpt.lm_head.weight"] = state["gpt.transformer.wte.weight"].clone()
    if legacy:
        for i in range(2):
            state[f"gpt.transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(128, 128)).view(1, 1, 128, 128)
            state[f"gpt.transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    return state


def mlp_checkpoint(vocab, prefix=3, hidden=48, seed=0):
    state = gpt2_state(vocab, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    state.update({"clip_project.model.0.weight": torch.randn(hidden, FEAT, generator=g) * 0.2,
                  "clip_project.model.0.bias": torch.randn(hidden, generator=g) * 0.1,
                  "clip_project.model.2.weight": torch.randn(prefix * D, hidden, generator=g) * 0.2,
                  "clip_project.model.2.bias": torch.randn(prefix * D, generator=g) * 0.1})
    return state


def transformer_checkpoint(vocab, prefix=4, clip_length=3, layers=2, seed=0):
    state = gpt2_state(vocab, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)

    def r(*shape, s=0.2):
        return torch.randn(*shape, generator=g) * s

    state.update({"clip_project.linear.weight": r(clip_length * D, FEAT, s=1.0), "clip_project.linear.bias": r(clip_length * D),
                  "clip_project.prefix_const": r(prefix, D, s=1.0)})
    for i in range(layers):
        p = f"clip_project.transformer.layers.{i}."
        state.update({p + "norm1.weight": 1 + r(D), p + "norm1.bias": r(D), p + "norm2.weight": 1 + r(D),
                      p + "norm2.bias": r(D), p + "attn.to_queries.weight": r(D, D),
                      p + "attn.to_keys_values.weight": r(2 * D, D), p + "attn.project.weight": r(D, D),
                      p + "attn.project.bias": r(D), p + "mlp.fc1.weight": r(2 * D, D), p + "mlp.fc1.bias": r(2 * D),
                      p + "mlp.fc2.weight": r(D, 2 * D), p + "mlp.fc2.bias": r(D)})
    return state


# ---------------------------------------------------------------- ClipCap's architecture, from its description


def clipcap_prefix(state, features, layout):
    """ClipCap's clip_project: features (B, F) -> prefix (B, P, D)."""
    s = state
    b = features.shape[0]
    if layout == "mlp":
        h = torch.tanh(features @ s["clip_project.model.0.weight"].T + s["clip_project.model.0.bias"])
        out = h @ s["clip_project.model.2.weight"].T + s["clip_project.model.2.bias"]
        return out.view(b, -1, D)
    x = features / features.norm(2, -1, keepdim=True)  # the transformer model's features are normalised
    clip_length = s["clip_project.linear.weight"].shape[0] // D
    x = (x @ s["clip_project.linear.weight"].T + s["clip_project.linear.bias"]).view(b, clip_length, D)
    x = torch.cat([x, s["clip_project.prefix_const"].unsqueeze(0).expand(b, -1, -1)], dim=1)
    heads, i = 8, 0  # ClipCap's mapper has 8 heads
    while f"clip_project.transformer.layers.{i}.norm1.weight" in s:
        p = f"clip_project.transformer.layers.{i}."
        y = F.layer_norm(x, (D,), s[p + "norm1.weight"], s[p + "norm1.bias"])
        n = y.shape[1]
        q = (y @ s[p + "attn.to_queries.weight"].T).reshape(b, n, heads, D // heads)
        kv = (y @ s[p + "attn.to_keys_values.weight"].T).reshape(b, n, 2, heads, D // heads)
        k, v = kv[:, :, 0], kv[:, :, 1]
        att = (torch.einsum("bnhd,bmhd->bnmh", q, k) * (D // heads) ** -0.5).softmax(dim=2)
        out = torch.einsum("bnmh,bmhd->bnhd", att, v).reshape(b, n, D)
        x = x + out @ s[p + "attn.project.weight"].T + s[p + "attn.project.bias"]
        y = F.layer_norm(x, (D,), s[p + "norm2.weight"], s[p + "norm2.bias"])
        y = torch.relu(y @ s[p + "mlp.fc1.weight"].T + s[p + "mlp.fc1.bias"])
        x = x + y @ s[p + "mlp.fc2.weight"].T + s[p + "mlp.fc2.bias"]
        i += 1
    return x[:, clip_length:]


def clipcap_gpt(state, vocab):
    """ClipCap's GPT2LMHeadModel with the checkpoint's gpt.* weights (legacy buffers not part of it today)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    lm = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=D, n_layer=2, n_head=HEADS, n_positions=128)).eval()
    gpt = {k[4:]: v for k, v in state.items() if k.startswith("gpt.") and not re.search(r"\.attn\.(bias|masked_bias)$", k)}
    lm.load_state_dict(gpt, strict=True)
    return lm


@torch.no_grad()
def clipcap_greedy(gpt, prefix, stop, max_len):
    """predict.py's generate2 with argmax: one image, stop token included."""
    generated, tokens = prefix[None], []
    for _ in range(max_len):
        token = int(gpt(inputs_embeds=generated).logits[0, -1].argmax())
        tokens.append(token)
        if token == stop:
            break
        generated = torch.cat([generated, gpt.transformer.wte.weight[token][None, None]], dim=1)
    return tokens


@torch.no_grad()
def clipcap_beam(gpt, prefix, stop, max_len, beam_size=5):
    """predict.py's generate_beam: stopped beams keep their length-averaged score; best average wins."""
    generated, tokens, scores = prefix[None], None, None
    lengths = torch.ones(beam_size)
    stopped = torch.zeros(beam_size, dtype=torch.bool)
    for _ in range(max_len):
        logits = gpt(inputs_embeds=generated).logits[:, -1].softmax(-1).log()
        if scores is None:
            scores, next_tokens = logits.topk(beam_size, -1)
            generated = generated.expand(beam_size, *generated.shape[1:])
            next_tokens, scores = next_tokens.permute(1, 0), scores.squeeze(0)
            tokens = next_tokens
        else:
            logits[stopped] = -float("inf")
            logits[stopped, 0] = 0
            scores_sum = scores[:, None] + logits
            lengths[~stopped] += 1
            avg, next_tokens = (scores_sum / lengths[:, None]).view(-1).topk(beam_size, -1)
            source = next_tokens // scores_sum.shape[1]
            lengths, next_tokens = lengths[source], (next_tokens % scores_sum.shape[1]).unsqueeze(1)
            tokens = torch.cat([tokens[source], next_tokens], dim=1)
            generated, scores, stopped = generated[source], avg * lengths, stopped[source]
        embed = gpt.transformer.wte(next_tokens.squeeze(1)).view(generated.shape[0], 1, -1)
        generated = torch.cat([generated, embed], dim=1)
        stopped = stopped | next_tokens.eq(stop).squeeze(1)
        if stopped.all():
            break
    best = int((scores / lengths).argmax())
    return tokens[best, : int(lengths[best])].tolist()


def text(tokenizer, ids):
    return tokenizer.decode(ids).strip()


# ---------------------------------------------------------------- helpers


def convert(tmp_path, state, tokenizer, name="ckpt.pt", **kwargs):
    from captioner.api import Captioner
    from captioner.model.clipcap import convert_clipcap

    path = tmp_path / name
    torch.save(state, path)
    out = convert_clipcap(path, tmp_path / "converted", tokenizer=tokenizer, clip_pretrained=None,
                          clip_config=TINY_CLIP, lm_heads=HEADS, **kwargs)
    return Captioner.from_pretrained(out, device="cpu"), out


def dot_at(state, tokenizer, layout, features, step=2, max_len=12):
    """Make the reference's greedy caption of image 0 reach '.' at `step`: swap the embedding rows of '.'
    and the token it picks there (steps before are unchanged unless they used either token)."""
    dot = tokenizer(".", add_special_tokens=False)["input_ids"][0]
    gpt = clipcap_gpt(state, len(tokenizer))
    tokens = clipcap_greedy(gpt, clipcap_prefix(state, features, layout)[0], -1, max_len)
    wte = state["gpt.transformer.wte.weight"]
    # The first step whose token is new (random models repeat tokens), so the steps before keep their tokens.
    step = next((k for k in range(step, len(tokens)) if tokens[k] not in tokens[:k]), 0)
    other = tokens[step]
    if other != dot and dot not in tokens[:step]:
        wte[[dot, other]] = wte[[other, dot]]
        state["gpt.lm_head.weight"] = wte.clone()
    return dot


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("layout", ["mlp", "transformer"])
def test_converted_model_matches_clipcap_forward_and_search(tmp_path, tokenizer, layout):
    vocab = len(tokenizer)
    state = mlp_checkpoint(vocab) if layout == "mlp" else transformer_checkpoint(vocab)
    features = torch.randn(2, FEAT, generator=torch.Generator().manual_seed(3)) * 2
    dot = dot_at(state, tokenizer, layout, features)
    cap, out = convert(tmp_path, state, tokenizer)
    assert cap.config.mapper == layout and cap.config.stop_tokens == [dot]
    assert cap.config.normalize_features == (layout == "transformer") and not cap.config.standardize_features

    ref_prefix = clipcap_prefix(state, features, layout)
    with torch.no_grad():
        ours, _ = cap.model.prefix_embeds(features)
    assert torch.allclose(ours, ref_prefix, atol=ATOL), (ours - ref_prefix).abs().max()

    gpt = clipcap_gpt(state, vocab)
    ids = torch.randint(1, vocab, (2, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = gpt(inputs_embeds=torch.cat([ref_prefix, gpt.transformer.wte(ids)], dim=1)).logits
        got = cap.model(features, ids, torch.ones_like(ids)).logits
    p = ref_prefix.shape[1]
    assert torch.allclose(got, ref[:, p - 1: p - 1 + ids.shape[1]], atol=ATOL), (got - ref[:, p - 1:-1]).abs().max()

    max_len = 12
    greedy = [text(tokenizer, clipcap_greedy(gpt, ref_prefix[i], dot, max_len)) for i in range(2)]
    assert greedy[0].endswith(".") and greedy[0].count(".") == 1  # stopped at the first '.', kept
    for extra in ({}, {"static_cache": True}, {"use_cache": False}):
        decode = DecodeConfig(strategy="greedy", max_new_tokens=max_len, **extra)
        assert [c[0] for c in cap.caption_features(features, decode)] == greedy, extra
    beam = [text(tokenizer, clipcap_beam(gpt, ref_prefix[i], dot, max_len)) for i in range(2)]
    for extra in ({}, {"static_cache": True}):
        decode = DecodeConfig(strategy="beam", num_beams=5, max_new_tokens=max_len, **extra)
        assert [c[0] for c in cap.caption_features(features, decode)] == beam, extra
    # Sampling (near-greedy, so image 0 meets its "."): no caption runs past its first "."
    samples = cap.caption_features(features, DecodeConfig(strategy="sample", num_captions=4, temperature=0.01, seed=0,
                                                          max_new_tokens=max_len))
    dotted = [s for row in samples for s in row if "." in s]
    assert dotted and all(s.endswith(".") and s.count(".") == 1 for s in dotted)


def test_converted_directory_loads_and_captions_images(tmp_path, tokenizer):
    from PIL import Image

    from captioner.api import Captioner
    from captioner.cli import main

    state = mlp_checkpoint(len(tokenizer))
    torch.save(state, tmp_path / "coco_weights.pt")
    tokenizer.save_pretrained(tmp_path / "tok")
    import json

    assert main(["convert", "clipcap", str(tmp_path / "coco_weights.pt"), "--output", str(tmp_path / "m"),
                 "--tokenizer", str(tmp_path / "tok"), "--clip-pretrained", "none",
                 "--clip-config", json.dumps({**TINY_CLIP})]) == 2  # GPT-2 width 32 is not 64-d heads: refused
    torch.manual_seed(0)  # the image tower is random (not in ClipCap's file): both conversions draw the same one
    cap, out = convert(tmp_path, state, tokenizer)
    Image.new("RGB", (80, 60), (200, 30, 30)).save(tmp_path / "red.png")
    first = cap.caption([str(tmp_path / "red.png")], decode=DecodeConfig(strategy="greedy", max_new_tokens=8))
    torch.manual_seed(0)
    again = Captioner.from_clipcap(tmp_path / "coco_weights.pt", tokenizer=tokenizer, clip_pretrained=None,
                                   clip_config=TINY_CLIP, lm_heads=HEADS, device="cpu")
    assert again.caption([str(tmp_path / "red.png")], decode=DecodeConfig(strategy="greedy", max_new_tokens=8)) == first
    assert json.loads((out / "config.json").read_text())["model"]["stop_tokens"] == cap.config.stop_tokens


class Boom:
    def __reduce__(self):
        import os

        return (os.system, ("touch RAN_CODE",))


def test_pickle_that_runs_code_is_refused_without_running(tmp_path, tokenizer, monkeypatch):
    from captioner.model.clipcap import convert_clipcap

    monkeypatch.chdir(tmp_path)
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"clip_project.model.0.weight": Boom()}, f)
    with pytest.raises(CheckpointError, match="refused") as e:
        convert_clipcap(tmp_path / "evil.pt", tmp_path / "out", tokenizer=tokenizer)
    assert "\n" not in str(e.value) and not (tmp_path / "RAN_CODE").exists() and not (tmp_path / "out").exists()
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="not a state dict"):
        convert_clipcap(tmp_path / "list.pt", tmp_path / "out", tokenizer=tokenizer)


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("clip_project.model.2.bias"), r"missing key clip_project\.model\.2\.bias \(expected shape \(96,\)\)"),
    (lambda s: s.pop("gpt.transformer.h.1.mlp.c_fc.weight"), r"missing key gpt\.transformer\.h\.1\.mlp\.c_fc\.weight "
                                                             r"\(expected shape \(32, 128\)\)"),
    (lambda s: s.__setitem__("clip_project.extra.weight", torch.zeros(2)), r"unknown key clip_project\.extra\.weight"),
    (lambda s: s.__setitem__("clip_project.model.0.bias", torch.zeros(47)),
     r"key clip_project\.model\.0\.bias has shape \(47,\), expected \(48,\)"),
    (lambda s: s.pop("gpt.transformer.wte.weight"), r"missing key gpt\.transformer\.wte\.weight"),
])
def test_missing_unknown_and_misshapen_keys_are_named(tmp_path, tokenizer, edit, message):
    state = mlp_checkpoint(len(tokenizer))
    edit(state)
    with pytest.raises(CheckpointError, match=message) as e:
        convert(tmp_path, state, tokenizer)
    assert "\n" not in str(e.value)


def test_transformer_keys_are_checked(tmp_path, tokenizer):
    state = transformer_checkpoint(len(tokenizer))
    state["clip_project.transformer.layers.1.attn.to_keys_values.weight"] = torch.zeros(D, D)
    with pytest.raises(CheckpointError, match=r"to_keys_values\.weight has shape \(32, 32\), expected \(64, 32\)"):
        convert(tmp_path, state, tokenizer)
    state = transformer_checkpoint(len(tokenizer))
    state.pop("clip_project.transformer.layers.0.attn.to_queries.weight")
    with pytest.raises(CheckpointError, match=r"missing key clip_project\.transformer\.layers\.0\.attn\.to_queries"):
        convert(tmp_path, state, tokenizer)


def test_existing_transformer_mapper_is_unchanged(make_captioner):
    """The new options default to the old mapper: same parameter names, a trainable q/k/v bias, GELU."""
    cap = make_captioner(mapper="transformer")
    names = set(cap.model.mappers["image"].state_dict())
    assert "net.layers.layers.0.self_attn.in_proj_bias" in names and "net.queries" in names
    layer = cap.model.mappers["image"].net.layers.layers[0]
    assert layer.activation is F.gelu or getattr(layer, "activation_relu_or_gelu", 2) == 2


def test_openai_clip_preprocessing():
    """ViT-B-32's eval transform is OpenAI CLIP's: bicubic resize of the short side to 224, centre crop, CLIP mean/std."""
    from torchvision import transforms as T

    from captioner.config import ModelConfig
    from captioner.model.encoders import build_image_encoder

    enc = build_image_encoder(ModelConfig(clip_model="ViT-B-32", clip_pretrained=None), load_weights=False)
    steps = enc.preprocess.transforms
    resize = next(s for s in steps if isinstance(s, T.Resize))
    crop = next(s for s in steps if isinstance(s, T.CenterCrop))
    norm = next(s for s in steps if isinstance(s, T.Normalize))
    assert resize.size in (224, [224]) and resize.interpolation == T.InterpolationMode.BICUBIC
    assert tuple(crop.size) == (224, 224)
    assert torch.allclose(torch.tensor(norm.mean), torch.tensor((0.48145466, 0.4578275, 0.40821073)))
    assert torch.allclose(torch.tensor(norm.std), torch.tensor((0.26862954, 0.26130258, 0.27577711)))
