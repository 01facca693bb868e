"""Finished rows leave the batch (compaction): the captions and scores are those of the uncompacted search,
in every strategy, with rows that end at very different lengths, and the LM is really run on fewer rows."""

import pytest
import torch

from captioner.config import DecodeConfig
from captioner.decoding.fast import StaticCacheStepper
from captioner.decoding.search import ForcedLengths, LMStepper, force_lengths, generate

EOS = 0


@pytest.fixture(scope="module")
def tiny(tokenizer):
    from captioner.api import Captioner
    from captioner.demo.tiny import tiny_config

    torch.manual_seed(4)
    cap = Captioner.from_config(tiny_config(tokenizer), tokenizer=tokenizer, device="cpu")
    feats = torch.randn(6, cap.model.image_encoder.output_dim)
    with torch.no_grad():
        return cap, cap.model.prefix_embeds(feats)[0]


ENDS = [2, 14, 5, 1, 9, 3]  # per row: tokens until EOS (1 to 14 of max 14)


def lengths(out):
    return [[(row == EOS).nonzero()[0, 0].item() + 1 if (row == EOS).any() else len(row) for row in img]
            for img in out.tokens]


def run(tiny, stepper_fn, cfg, *, compact, push=None):
    cap, embeds = tiny
    per_image = cfg.num_captions if cfg.strategy == "sample" else 1  # sampling repeats each prefix
    stepper = ForcedLengths(stepper_fn(cap), torch.tensor(ENDS).repeat_interleave(per_image), eos_id=EOS, push=push)
    with torch.no_grad():
        out = generate(stepper, embeds, cfg, eos_id=EOS, pad_id=EOS, compact=compact)
    return out, stepper.rows_seen


def plain(cap):
    return LMStepper(cap.model.lm)


CONFIGS = {
    "greedy": DecodeConfig(strategy="greedy", max_new_tokens=14),
    "beam": DecodeConfig(strategy="beam", num_beams=3, num_captions=3, max_new_tokens=14, length_penalty=1.0),
    "beam_lp0": DecodeConfig(strategy="beam", num_beams=3, num_captions=2, max_new_tokens=14, length_penalty=0.0),
    "sample": DecodeConfig(strategy="sample", num_captions=2, max_new_tokens=14, top_p=0.9, seed=3),
}


# push None: forced lengths; 6.0: EOS only made likely from there (beams end unevenly)
@pytest.mark.parametrize("name, push", [("greedy", None), ("beam", None), ("beam", 6.0), ("beam_lp0", 6.0),
                                        ("sample", None), ("sample", 6.0)])
def test_compacted_search_equals_uncompacted(tiny, name, push):
    cfg = CONFIGS[name]
    full, full_rows = run(tiny, plain, cfg, compact=False, push=push)
    compact, rows = run(tiny, plain, cfg, compact=True, push=push)
    assert torch.equal(compact.tokens, full.tokens)
    torch.testing.assert_close(compact.scores, full.scores, atol=1e-5, rtol=1e-5)
    if push is None and name != "beam_lp0":  # forced: every caption has its scripted length
        assert all(set(n) == {e} for n, e in zip(lengths(full), ENDS))
    # the search ran on fewer rows once some finished: rows never grow after the start, and shrink
    per_row = cfg.num_beams if cfg.strategy == "beam" else cfg.num_captions
    assert rows[-1] < len(ENDS) * per_row and sum(rows) < sum(full_rows)
    assert all(a >= b for a, b in zip(rows[1:], rows[2:]))


@pytest.mark.parametrize("fixed_buffers", [False, True])
@pytest.mark.parametrize("name", ["greedy", "beam", "sample"])
def test_static_cache_compacts_at_halvings_with_the_same_captions(tiny, name, fixed_buffers):
    cfg = CONFIGS[name]
    expected, _ = run(tiny, plain, cfg, compact=False)
    static = StaticCacheStepper(tiny[0].model.lm, max_new_tokens=cfg.max_new_tokens)
    static.fixed_buffers = fixed_buffers
    for _ in range(2):  # the same stepper again: buffers and their views reused
        out, rows = run(tiny, lambda cap: static, cfg, compact=True)
        assert torch.equal(out.tokens, expected.tokens)
        torch.testing.assert_close(out.scores, expected.scores, atol=1e-5, rtol=1e-5)
    unit = cfg.num_beams if cfg.strategy == "beam" else 1  # beam: whole images leave
    units = sorted({r // unit for r in rows[1:]}, reverse=True)
    chain = [units[0]]
    while chain[-1] > 1:
        chain.append((chain[-1] + 1) // 2)
    assert len(units) > 1 and set(units) <= set(chain)  # it compacted, only at halvings of the batch (ceil)
    (views,) = static.caches.values()  # every row count in one pair of buffers
    assert {v[0].layers[0].keys.data_ptr() for v in views.values()} == {views[max(views)][0].layers[0].keys.data_ptr()}


def test_compact_to_halves():
    s = StaticCacheStepper.compact_to
    assert [s(None, live, 32) for live in (32, 17, 16, 9, 8, 1, 0)] == [32, 32, 16, 16, 8, 1, 1]
    assert s(None, 3, 5) == 3 and s(None, 2, 5) == 2 and s(None, 4, 5) == 5


@pytest.mark.parametrize("push", [None, 4.0])
@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_compacted_search_gives_transformers_generate_captions(tiny, strategy, push):
    """The same scripted model through transformers generate (which keeps computing finished rows): the
    same best captions, so a beam image leaves exactly when transformers' rule (early_stopping=False) says
    it is done. As eval/bench.py checks on GPT-2 124M."""
    from transformers import LogitsProcessor, LogitsProcessorList

    cap, embeds = tiny
    cfg = DecodeConfig(strategy=strategy, num_beams=3, max_new_tokens=14, length_penalty=1.0)
    ours, _ = run(tiny, plain, cfg, compact=True, push=push)
    ends = torch.tensor(ENDS)

    class Scripted(LogitsProcessor):  # beam search hands processors log-softmaxed scores: renormalise
        def __call__(self, input_ids, scores):
            rows = ends.repeat_interleave(scores.shape[0] // len(ENDS))
            return force_lengths(scores, rows, input_ids.shape[1], eos_id=EOS, push=push).log_softmax(-1)

    with torch.no_grad():
        hf = cap.model.lm.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                                   max_new_tokens=14, num_beams=cfg.num_beams if strategy == "beam" else 1,
                                   do_sample=False, eos_token_id=EOS, pad_token_id=EOS, length_penalty=1.0,
                                   logits_processor=LogitsProcessorList([Scripted()]))

    def cut(seq):
        seq = list(seq)
        return seq[: seq.index(EOS) + 1] if EOS in seq else seq

    assert [cut(r) for r in ours.tokens[:, 0].tolist()] == [cut(r) for r in hf.tolist()]
