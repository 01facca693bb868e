"""What makes training fast changes no loss: length-bucketed batches padded to their longest caption and
logits only at caption positions give the loss of ClipCap's way (every caption padded to the longest,
logits everywhere); and the benchmark's data has the caption lengths it documents."""

import sys
from pathlib import Path

import torch

from captioner.model.tokens import pad_id
from captioner.train.batching import CaptionBatchSampler, ItemFeatures, make_loader

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))
import bench_train  # noqa: E402

WORDS = "a red blue green circle square triangle at the top bottom left right in center small large".split()


def _pairs(tokenizer, n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 14, (n,), generator=g).tolist()
    texts = [" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (k,), generator=g)) for k in lengths]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]


def _padded(ids, width, pad):
    tokens = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        tokens[i, :len(x)], mask[i, :len(x)] = torch.tensor(x), 1
    return tokens, mask


def test_bucketed_caption_position_loss_equals_clipcap_padded_full_logits_loss(make_captioner, tokenizer):
    """Over the same captions, the token-weighted loss of our batches (bucketed sampler, collation to the
    batch's longest caption, LM head at caption positions only) equals ClipCap's loss with every caption
    padded beyond the longest and logits at every position; so do the gradients."""
    model = make_captioner(mapper="mlp").model.eval()  # eval: no dropout, both sides compute the same function
    ids = _pairs(tokenizer)
    features = torch.randn(len(ids), model.encoders["image"].output_dim, generator=torch.Generator().manual_seed(1))
    items = ItemFeatures({"image": features}, {"image": torch.ones(len(ids), dtype=torch.bool)})
    sampler = CaptionBatchSampler([len(x) for x in ids], batch_size=5, seed=0, bucket=True)
    loader = make_loader(items, list(range(len(ids))), ids, tokenizer, sampler)

    params = [p for p in model.parameters() if p.requires_grad]
    total, widths = 0.0, []
    for feats, present, tokens, mask in loader:
        widths.append(tokens.shape[1])
        loss = model(feats, tokens, mask, present).loss * mask.sum()
        loss.backward()
        total += loss.item()
    ours_grads = [p.grad.clone() for p in params]
    model.zero_grad()

    n_tokens = sum(len(x) for x in ids)
    tokens, mask = _padded(ids, max(len(x) for x in ids) + 7, pad_id(tokenizer))
    ref = bench_train.clipcap_loss(model, features, tokens, mask)
    (ref * n_tokens).backward()
    assert min(widths) < max(widths) == max(len(x) for x in ids)  # bucketing really gave shorter batches
    torch.testing.assert_close(torch.tensor(total / n_tokens), ref.detach(), rtol=1e-5, atol=1e-6)
    for ours, p in zip(ours_grads, params):
        torch.testing.assert_close(ours, p.grad, rtol=1e-4, atol=1e-5)  # summation order


def test_bench_captions_follow_the_documented_length_table():
    """One bench word is one token; the drawn lengths have the table's mean and the longest caption is
    the table's maximum, so the ClipCap-style step pads to it."""
    tok = bench_train.bench_tokenizer()
    lengths = bench_train.caption_lengths(4000, seed=3)
    table = bench_train.COCO_TOKEN_LENGTHS
    mean = sum(k * v for k, v in table.items()) / sum(table.values())
    assert max(lengths) == max(table) and set(lengths) <= set(table)
    assert abs(sum(lengths) / len(lengths) - mean) < 0.2 and 11.5 < mean < 13
    words = bench_train.WORDS
    caption = " ".join(words[i % len(words)] for i in range(39))
    assert len(tok(caption, add_special_tokens=False)["input_ids"]) == 39
