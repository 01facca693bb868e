"""Model: shapes, loss masking, freezing, EOS handling."""

import pytest
import torch
import torch.nn.functional as F

from captioner.model.model import IGNORE_INDEX
from captioner.model.tokens import encode_captions

from conftest import CAPTIONS


def batch(cap, captions=CAPTIONS[:3], prompt=""):
    feats = torch.randn(len(captions), cap.model.image_encoder.output_dim)
    ids, mask = encode_captions(cap.tokenizer, captions, max_tokens=32, prompt=prompt)
    return feats, ids, mask


@pytest.mark.parametrize("mapper", ["mlp", "transformer"])
def test_shapes_and_feature_dim_read_from_encoder(make_captioner, mapper):
    cap = make_captioner(mapper=mapper, prompt="a photo of")
    from captioner.demo.tiny import TINY_CLIP
    assert cap.model.image_encoder.output_dim == TINY_CLIP["embed_dim"]
    images = torch.randn(2, 3, 64, 64)
    feats = cap.model.encode_images(images)
    assert feats.shape == (2, TINY_CLIP["embed_dim"])
    prompt_len = len(cap.tokenizer("a photo of", add_special_tokens=False)["input_ids"])
    assert cap.model.prefix_tokens == 4 + prompt_len
    prefix = cap.model.prefix_embeds(feats)[0]
    assert prefix.shape == (2, 4 + prompt_len, cap.model.lm.config.n_embd)
    f, ids, mask = batch(cap, CAPTIONS[:2], prompt="a photo of")
    out = cap.model(f, ids, mask)
    assert out.logits.shape == (2, ids.shape[1], len(cap.tokenizer))  # caption positions only


def test_captions_end_with_eos_and_mask_marks_real_tokens(tokenizer):
    ids, mask = encode_captions(tokenizer, ["a red circle", "a blue square in the center"], max_tokens=32)
    eos = tokenizer.eos_token_id
    for row, m in zip(ids, mask):
        n = int(m.sum())
        assert row[n - 1] == eos  # EOS appended and unmasked
        assert m[:n].all() and not m[n:].any()  # mask is a prefix of ones
    assert mask[0].sum() < mask[1].sum()  # the short caption is padded
    # truncation keeps the EOS
    ids, mask = encode_captions(tokenizer, ["a red circle at the top left corner"], max_tokens=3)
    assert ids.shape[1] == 3 and ids[0, -1] == eos


def test_loss_ignores_prefix_prompt_and_padding(make_captioner):
    cap = make_captioner(prompt="a photo of")
    feats, ids, mask = batch(cap, prompt="a photo of")
    out = cap.model(feats, ids, mask)
    q = cap.model.prefix_tokens
    # Manual loss from the LM's logits over the whole sequence: position q-1+t predicts caption token t;
    # only real caption tokens count.
    embeds = torch.cat([cap.model.prefix_embeds(feats)[0], cap.model.lm.get_input_embeddings()(ids)], dim=1)
    full = cap.model.lm(inputs_embeds=embeds, attention_mask=torch.cat([mask.new_ones(len(ids), q), mask], 1)).logits
    logits = full[:, q - 1:-1]
    torch.testing.assert_close(out.logits, logits)
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    manual = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(out.loss, manual)
    # Changing what sits in padded positions does not change the loss.
    garbage = ids.masked_fill(mask == 0, 7)
    torch.testing.assert_close(cap.model(feats, garbage, mask).loss, out.loss)


def _grads(module):
    return [p.grad for p in module.parameters()]


def test_frozen_lm_only_mapper_gets_gradients(make_captioner):
    cap = make_captioner(finetune_lm=False)
    feats, ids, mask = batch(cap)
    cap.model.train()
    cap.model(feats, ids, mask).loss.backward()
    assert all(g is not None and g.abs().sum() > 0 for g in _grads(cap.model.mappers["image"].net))
    assert all(g is None for g in _grads(cap.model.lm))
    assert all(g is None for g in _grads(cap.model.image_encoder))
    assert not cap.model.lm.training  # frozen LM stays in eval mode (no dropout)
    trainable = {n.split(".")[0] for n, p in cap.model.named_parameters() if p.requires_grad}
    assert trainable == {"mappers"}


def test_finetuned_lm_gets_gradients(make_captioner):
    cap = make_captioner(finetune_lm=True)
    feats, ids, mask = batch(cap)
    cap.model(feats, ids, mask).loss.backward()
    assert any(g is not None and g.abs().sum() > 0 for g in _grads(cap.model.lm))
    assert all(g is None for g in _grads(cap.model.image_encoder))


def test_eos_is_learned(make_captioner):
    """After fitting one caption, greedy decoding reproduces it and stops at EOS well before the limit."""
    cap = make_captioner()
    target = "a red circle at the top left"
    feats, ids, mask = batch(cap, [target])
    opt = torch.optim.AdamW([p for p in cap.model.parameters() if p.requires_grad], lr=3e-3)
    cap.model.train()
    for _ in range(60):
        loss = cap.model(feats, ids, mask).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    from captioner.decoding.search import LMStepper, generate
    from captioner.config import DecodeConfig
    cap.model.eval()
    with torch.no_grad():
        out = generate(LMStepper(cap.model.lm), cap.model.prefix_embeds(feats)[0],
                       DecodeConfig(strategy="greedy", max_new_tokens=25), eos_id=cap.tokenizer.eos_token_id,
                       pad_id=cap.tokenizer.eos_token_id)
    tokens = out.tokens[0, 0].tolist()
    assert tokens[: ids.shape[1]] == ids[0].tolist()  # caption then EOS
    assert len(tokens) == ids.shape[1]  # decoding stopped at EOS
    assert cap.caption_features(feats, DecodeConfig(strategy="greedy"))[0][0] == target


def test_feature_norm_fit_standardises(make_captioner):
    cap = make_captioner()
    feats = torch.randn(50, cap.model.image_encoder.output_dim) * 0.001 + 5
    cap.model.mappers["image"].feature_norm.fit(feats)
    z = cap.model.mappers["image"].feature_norm(feats)
    torch.testing.assert_close(z.mean(0), torch.zeros(z.shape[1]), atol=1e-3, rtol=0)
    torch.testing.assert_close(z.std(0, unbiased=False), torch.ones(z.shape[1]), atol=1e-2, rtol=0)
