"""Decoding against a mock LM with scripted logits, and fast paths against straightforward ones."""

import itertools
import math

import pytest
import torch

from captioner.config import DecodeConfig
from captioner.decoding.fast import PackedHead, StaticCacheStepper
from captioner.decoding.search import LMStepper, beam_search, generate, sample_token

EOS, PAD = 0, 0
START = -1


class BigramStepper:
    """Next-token log-probs depend only on the last token: table[last + 1] (row 0 = after the prefix).
    The prefix embeds (B, Q, D) are ignored except that embeds[:, 0, 0] selects a per-row table offset."""

    def __init__(self, table):
        self.table = torch.log_softmax(torch.as_tensor(table, dtype=torch.float), dim=-1)  # (R, V, V)?
        self.calls = 0

    def _logits(self, state):
        rows, last = state
        return self.table[rows, last + 1]

    def prefill(self, embeds):
        rows = embeds[:, 0, 0].long()
        state = (rows, torch.full_like(rows, START))
        return self._logits(state), state

    def step(self, tokens, state):
        self.calls += 1
        state = (state[0], tokens)
        return self._logits(state), state

    def select(self, state, index):
        return (state[0][index], state[1][index])


def prefix(rows):
    e = torch.zeros(len(rows), 1, 1)
    e[:, 0, 0] = torch.tensor(rows, dtype=torch.float)
    return e


def seq_logprob(table, seq):
    lp = torch.log_softmax(torch.as_tensor(table, dtype=torch.float), dim=-1)
    last, total = START, 0.0
    for t in seq:
        total += lp[0, last + 1, t].item()
        last = t
    return total


# Vocabulary: 0 = EOS, 1 = A, 2 = B, 3 = C. Probabilities per previous token (rows: start, EOS, A, B, C).
TRAP = torch.log(torch.tensor([[
    [1e-6, 0.6, 0.4, 1e-6],      # start: A is the greedy choice
    [1.0, 1e-6, 1e-6, 1e-6],     # after EOS (unused)
    [0.34, 0.33, 1e-6, 0.33],    # after A: nothing likely
    [0.9, 0.05, 1e-6, 0.05],     # after B: EOS very likely
    [0.5, 0.25, 1e-6, 0.25],     # after C
]]))


def cut(seq):
    seq = list(seq)
    return seq[: seq.index(EOS) + 1] if EOS in seq else seq


def test_greedy_is_argmax_path():
    torch.manual_seed(0)
    table = torch.randn(1, 6, 5) * 3
    out = generate(BigramStepper(table), prefix([0]), DecodeConfig(strategy="greedy", max_new_tokens=8),
                   eos_id=EOS, pad_id=PAD)
    expected, last = [], START
    for _ in range(8):
        last = int(table[0, last + 1].argmax())
        expected.append(last)
        if last == EOS:
            break
    assert out.tokens[0, 0].tolist()[: len(expected)] == expected


def test_beam_finds_better_sequence_than_greedy():
    greedy = generate(BigramStepper(TRAP), prefix([0]), DecodeConfig(strategy="greedy", max_new_tokens=5),
                      eos_id=EOS, pad_id=PAD)
    beam = beam_search(BigramStepper(TRAP), prefix([0]), num_beams=2, length_penalty=0.0, max_new_tokens=5,
                       eos_id=EOS, pad_id=PAD)
    g, b = cut(greedy.tokens[0, 0].tolist()), cut(beam.tokens[0, 0].tolist())
    assert g == [1, 0] and b == [2, 0]  # greedy: A EOS (0.6 * 0.34); beam: B EOS (0.4 * 0.9)
    assert seq_logprob(TRAP, b) > seq_logprob(TRAP, g)
    assert beam.scores[0, 0].item() == pytest.approx(math.log(0.4 * 0.9), abs=1e-4)


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_wide_beam_equals_exhaustive_search(length_penalty):
    """With more beams than live prefixes, beam search is exact: compare with brute force."""
    torch.manual_seed(3)
    v, max_new = 4, 4
    table = torch.randn(1, v + 1, v) * 2
    beam = beam_search(BigramStepper(table), prefix([0]), num_beams=64, num_return=3,
                       length_penalty=length_penalty, max_new_tokens=max_new, eos_id=EOS, pad_id=PAD)
    scored = []
    for n in range(1, max_new + 1):
        for seq in itertools.product(range(v), repeat=n):
            if EOS in seq[:-1] or (seq[-1] != EOS and n < max_new):
                continue  # hypotheses end with EOS, or are cut at the token limit
            scored.append((seq_logprob(table, seq) / n ** length_penalty, list(seq)))
    scored.sort(key=lambda x: -x[0])
    for rank in range(3):
        assert beam.scores[0, rank].item() == pytest.approx(scored[rank][0], abs=1e-4)
        assert cut(beam.tokens[0, rank].tolist()) == scored[rank][1]


def test_beam_returns_sorted_distinct_hypotheses_per_row():
    torch.manual_seed(1)
    table = torch.randn(3, 7, 6) * 2
    out = beam_search(BigramStepper(table), prefix([0, 1, 2]), num_beams=4, num_return=3, max_new_tokens=6,
                      eos_id=EOS, pad_id=PAD)
    assert out.tokens.shape[:2] == (3, 3)
    for r in range(3):
        assert (out.scores[r, :-1] >= out.scores[r, 1:]).all()
        seqs = {tuple(cut(s.tolist())) for s in out.tokens[r]}
        assert len(seqs) == 3
        # each row alone gives the same result as in the batch
        alone = beam_search(BigramStepper(table), prefix([r]), num_beams=4, num_return=3, max_new_tokens=6,
                            eos_id=EOS, pad_id=PAD)
        assert torch.equal(alone.tokens[0], out.tokens[r])
        torch.testing.assert_close(alone.scores[0], out.scores[r])


def test_top_p_near_zero_equals_greedy():
    torch.manual_seed(2)
    table = torch.randn(2, 7, 6) * 2
    greedy = generate(BigramStepper(table), prefix([0, 1]), DecodeConfig(strategy="greedy", max_new_tokens=6),
                      eos_id=EOS, pad_id=PAD)
    sampled = generate(BigramStepper(table), prefix([0, 1]),
                       DecodeConfig(strategy="sample", top_p=1e-6, max_new_tokens=6, seed=0), eos_id=EOS, pad_id=PAD)
    assert torch.equal(greedy.tokens, sampled.tokens)


def test_sampling_filters_and_seed():
    logits = torch.tensor([[4.0, 3.0, 2.0, -5.0, -6.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    top2 = sample_token(logits, top_k=2, generator=g)
    assert set(top2.tolist()) == {0, 1}
    # p = .665 .245 .090 ...: the smallest set reaching 0.9 is {0, 1} (.91); reaching 0.95 needs token 2.
    assert set(sample_token(logits, top_p=0.9, generator=g).tolist()) == {0, 1}
    assert set(sample_token(logits, top_p=0.95, generator=g).tolist()) == {0, 1, 2}
    cold = sample_token(logits, temperature=0.05, generator=g)
    assert set(cold.tolist()) == {0}
    torch.manual_seed(5)
    table = torch.randn(1, 7, 6)
    cfg = DecodeConfig(strategy="sample", top_p=1.0, num_captions=4, max_new_tokens=6, seed=11)
    a = generate(BigramStepper(table), prefix([0]), cfg, eos_id=EOS, pad_id=PAD)
    b = generate(BigramStepper(table), prefix([0]), cfg, eos_id=EOS, pad_id=PAD)
    assert a.tokens.shape[:2] == (1, 4) and torch.equal(a.tokens, b.tokens)


def test_finished_rows_emit_pad_and_decoding_stops():
    table = torch.log(torch.tensor([[[0.9, 0.1], [0.9, 0.1], [0.9, 0.1]]]))  # EOS right away
    stepper = BigramStepper(table)
    out = generate(stepper, prefix([0, 0]), DecodeConfig(strategy="greedy", max_new_tokens=10), eos_id=EOS,
                   pad_id=PAD)
    assert out.tokens.shape[-1] == 1 and stepper.calls == 0


@pytest.mark.parametrize("strategy", ["greedy", "beam", "sample"])
def test_stop_tokens_end_captions_in_every_strategy(strategy):
    """A stop token (ClipCap's '.') ends a caption like EOS and is kept; min_new_tokens holds it off too."""
    # 0 EOS, 1 A, 2 B, 3 '.': after the start A, after A '.' (then EOS would follow), B never.
    table = torch.log(torch.tensor([[[1e-6, 0.97, 0.01, 0.02], [1.0, 1e-6, 1e-6, 1e-6],
                                     [0.02, 0.01, 0.01, 0.96], [0.3, 0.3, 0.3, 0.1], [0.97, 0.01, 0.01, 0.01]]]))
    decode = DecodeConfig(strategy=strategy, max_new_tokens=6, top_p=0.5, seed=0)
    pad = 9  # distinct from EOS here, to tell "stopped at '.'" from "'.' then EOS"

    def first3(out):
        return [(r + [pad] * 3)[:3] for r in out.tokens[:, 0].tolist()]

    out = generate(BigramStepper(table), prefix([0, 0]), decode, eos_id=EOS, pad_id=pad, stop_ids=[3])
    assert first3(out) == [[1, 3, pad], [1, 3, pad]]
    plain = generate(BigramStepper(table), prefix([0]), decode, eos_id=EOS, pad_id=pad)
    assert first3(plain) == [[1, 3, 0]]  # without the stop set '.' is an ordinary token
    held = generate(BigramStepper(table), prefix([0]), DecodeConfig(strategy=strategy, max_new_tokens=6, top_p=0.5,
                    seed=0, min_new_tokens=3), eos_id=EOS, pad_id=PAD, stop_ids=[3])
    assert 3 not in held.tokens[0, 0].tolist()[:3]


# ----------------------------------------------------------------- the real (tiny) LM


@pytest.fixture
def tiny(make_captioner):
    cap = make_captioner(seed=4)
    feats = torch.randn(5, cap.model.image_encoder.output_dim).to(cap.device)
    return cap, feats


@pytest.mark.parametrize("strategy", ["greedy", "beam", "sample"])
def test_kv_cache_equals_recompute(tiny, strategy):
    cap, feats = tiny
    cfg = dict(strategy=strategy, num_beams=3, num_captions=2 if strategy != "greedy" else 1, max_new_tokens=8,
               seed=0, top_p=0.95)
    embeds = cap.model.prefix_embeds(feats)[0].detach()
    with torch.no_grad():
        cached = generate(LMStepper(cap.model.lm, use_cache=True), embeds, DecodeConfig(**cfg), eos_id=0, pad_id=0)
        full = generate(LMStepper(cap.model.lm, use_cache=False), embeds, DecodeConfig(**cfg), eos_id=0, pad_id=0)
    assert torch.equal(cached.tokens, full.tokens)
    torch.testing.assert_close(cached.scores, full.scores, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_batch_composition_does_not_change_captions(tiny, strategy):
    cap, feats = tiny
    cfg = DecodeConfig(strategy=strategy, num_beams=3, max_new_tokens=8)
    together = cap.caption_features(feats, cfg)
    alone = [cap.caption_features(feats[i:i + 1], cfg)[0] for i in range(len(feats))]
    assert together == alone
    reversed_ = cap.caption_features(feats.flip(0), cfg)
    assert reversed_[::-1] == together


@pytest.mark.parametrize("fixed_buffers", [False, True])  # True: as compiled steps run (one buffer)
@pytest.mark.parametrize("strategy", ["greedy", "beam", "sample"])
def test_static_cache_equals_growing_cache(tiny, strategy, fixed_buffers):
    cap, feats = tiny
    cfg = DecodeConfig(strategy=strategy, num_beams=3, num_captions=2 if strategy != "greedy" else 1,
                       max_new_tokens=8, seed=0, top_p=0.95)
    embeds = cap.model.prefix_embeds(feats)[0].detach()
    stepper = StaticCacheStepper(cap.model.lm, max_new_tokens=cfg.max_new_tokens)
    stepper.fixed_buffers = fixed_buffers
    with torch.no_grad():
        dynamic = generate(LMStepper(cap.model.lm), embeds, cfg, eos_id=0, pad_id=0)
        fewer = generate(LMStepper(cap.model.lm), embeds[:2], cfg, eos_id=0, pad_id=0)
        for rows, expected in ((embeds, dynamic), (embeds[:2], fewer), (embeds, dynamic)):
            static = generate(stepper, rows, cfg, eos_id=0, pad_id=0)  # the same stepper: caches reset, reused
            assert torch.equal(static.tokens, expected.tokens)
            torch.testing.assert_close(static.scores, expected.scores, atol=1e-5, rtol=1e-5)
    (views,) = stepper.caches.values()  # one pair of buffers; smaller row counts use their first rows
    assert len(views) > 1 and {v[0].layers[0].keys.data_ptr() for v in views.values()} == {
        views[max(views)][0].layers[0].keys.data_ptr()}


def test_static_cache_reorder_alternates_between_two_fixed_buffers(tiny):
    """select() gathers the filled positions into the other buffer of a pair and nothing else: the same two
    buffers (compiled graphs hold their addresses) serve every step and every batch."""
    cap, feats = tiny
    embeds = cap.model.prefix_embeds(feats)[0].detach()
    stepper = StaticCacheStepper(cap.model.lm, max_new_tokens=4)
    with torch.no_grad():
        _, state = stepper.prefill(embeds)
        first = stepper.select(state, torch.arange(5, device=embeds.device).repeat_interleave(2))  # (10 rows)
        n = stepper.length
        torch.testing.assert_close(first.layers[0].keys[:, :, :n], state.layers[0].keys.repeat_interleave(2, 0))
        order = torch.randperm(10).to(embeds.device)
        second = stepper.select(first, order)
        torch.testing.assert_close(second.layers[0].keys[:, :, :n], first.layers[0].keys[order, :, :n])
        assert int(second.get_seq_length()) == n  # the next step writes position n
        assert second is not first and stepper.select(second, order) is first
        assert {id(c) for c in next(iter(stepper.caches.values()))[10]} == {id(first), id(second)}
        pointer = first.layers[0].keys.data_ptr()
        _, again = stepper.prefill(embeds)  # a new batch of the same size reuses the pair
        assert stepper.select(again, torch.arange(10, device=embeds.device) // 2).layers[0].keys.data_ptr() == pointer


def test_compiled_steps_keep_one_buffer(tiny):
    """With fixed buffers (compile) every reorder lands back in the same buffer, with the rows reordered."""
    cap, feats = tiny
    embeds = cap.model.prefix_embeds(feats)[0].detach()
    stepper = StaticCacheStepper(cap.model.lm, max_new_tokens=4)
    stepper.fixed_buffers = True
    with torch.no_grad():
        _, state = stepper.prefill(embeds)
        main = stepper.select(state, torch.arange(5, device=embeds.device).repeat_interleave(2))
        before = main.layers[0].keys[:, :, :stepper.length].clone()
        order = torch.randperm(10).to(embeds.device)
        assert stepper.select(main, order) is main
        torch.testing.assert_close(main.layers[0].keys[:, :, :stepper.length], before[order])


def test_caption_features_static_and_compiled_match_default(tiny, monkeypatch):
    import torch._dynamo

    cap, feats = tiny
    limit = torch._dynamo.config.recompile_limit
    plain = DecodeConfig(strategy="beam", num_beams=3, max_new_tokens=6)
    expected = cap.caption_features(feats, plain)
    assert cap.caption_features(feats, DecodeConfig(**{**plain.__dict__, "static_cache": True})) == expected
    # torch.compile(fullgraph=True) of the step: no graph break (CUDA graphs need one graph); CPU here
    compiled = DecodeConfig(**{**plain.__dict__, "compile": True})
    assert cap.caption_features(feats, compiled) == expected
    assert cap.caption_features(feats[:3], compiled) == expected[:3]
    assert torch._dynamo.config.recompile_limit == limit  # raised for our compiled steps only
    # Past dynamo's limit on compiled shapes a fullgraph compile raises: that shape runs uncompiled instead.
    monkeypatch.setattr(StaticCacheStepper, "RECOMPILE_LIMIT", 1)
    assert cap.caption_features(feats[:2], compiled) == expected[:2]


def test_packed_head_gives_the_plain_heads_captions_and_follows_weight_updates(tiny):
    """CPU fp32: the oneDNN-packed LM head decodes as the plain one does, and is packed again after the
    weights change (as between validations in training)."""
    cap, feats = tiny
    if cap.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        pytest.skip("the packed head is a CPU path")
    head = cap.model.lm.get_output_embeddings()
    with torch.no_grad():
        assert PackedHead.usable(cap.model.lm)
        hidden = torch.randn(7, head.in_features)
        packer = PackedHead()
        with packer.applied(cap.model.lm):
            assert "forward" in vars(head)
            torch.testing.assert_close(head(hidden), hidden @ head.weight.T, atol=1e-5, rtol=1e-5)
        assert "forward" not in vars(head)  # restored
    for strategy in ("greedy", "beam"):
        plain = DecodeConfig(strategy=strategy, num_beams=3, max_new_tokens=8, cpu_packed_head=False)
        packed = DecodeConfig(strategy=strategy, num_beams=3, max_new_tokens=8)
        assert cap.caption_features(feats, plain) == cap.caption_features(feats, packed)
    assert cap._packed_head.weight() is head.weight  # caption_features did decode with the packed head
    with torch.no_grad():
        head.weight.mul_(-3.0)  # an in-place update, like an optimiser step
    changed = cap.caption_features(feats, packed)
    assert changed == cap.caption_features(feats, plain)
    assert cap._packed_head.weight() is head.weight and cap._packed_head.version == head.weight._version


def test_packed_head_restores_the_module_as_it_was(tiny):
    """applied() is set-and-restore: a forward someone else set comes back, and interleaved decodes
    (threads) leave no packed forward behind."""
    cap, _ = tiny
    with torch.no_grad():
        if not PackedHead.usable(cap.model.lm):
            pytest.skip("the packed head is a CPU path")
    lm, head = cap.model.lm, cap.model.lm.get_output_embeddings()

    def own(x):
        return x

    head.forward = own
    with torch.no_grad():
        with PackedHead().applied(lm):
            assert vars(head)["forward"] is not own
        assert vars(head)["forward"] is own
        del head.forward
        a, b = PackedHead().applied(lm), PackedHead().applied(lm)
        a.__enter__()
        b.__enter__()
        a.__exit__(None, None, None)
        b.__exit__(None, None, None)
    assert "forward" not in vars(head)
