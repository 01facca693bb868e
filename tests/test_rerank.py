"""Reranking at decode time (decoding/rerank.py): scorers whose preference is known pick the candidate they
prefer, the LM weight restores the LM's order, CLIPScore of the wrapper equals CLIPScorer's, and the
mechanics through `caption` / `eval` with a tiny random CLIP (its scores mean nothing)."""

import json
import math
from pathlib import Path

import pytest
import torch

from captioner.cli import main
from captioner.config import DecodeConfig
from captioner.decoding.rerank import CLIPCandidateScorer, lm_scores, rerank
from captioner.errors import ConfigError
from captioner.inputs.image import load_image

TINY_CLIP_TEXT = {  # the demo's tiny tower plus a text tower, so it can score captions
    "embed_dim": 128, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 32, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


class PrefersCaption:
    """A scorer whose preference is known: 1 for the target caption of each image, 0 otherwise."""

    def __init__(self, targets):
        self.targets, self.calls = targets, []

    def candidate_scores(self, images, candidates):
        self.calls.append(len(images))
        return [[float(c == t) for c in row] for row, t in zip(candidates, self.targets)]


class PrefersLong:
    def candidate_scores(self, images, candidates):
        return [[float(len(c)) for c in row] for row in candidates]


def test_rerank_orders_by_score_plus_weighted_lm():
    cands = [["a", "b", "c"]]
    lm = torch.tensor([[-0.1, -0.5, -2.0]])
    assert rerank(cands, lm, [[0.0, 1.0, 0.5]], weight=0.0, keep=2) == [["b", "c"]]
    assert rerank(cands, lm, [[0.0, 1.0, 0.5]], weight=10.0, keep=3) == [["a", "b", "c"]]  # the LM dominates
    assert rerank(cands, lm, [[0.0, 0.0, 0.0]], weight=0.0, keep=3) == [["a", "b", "c"]]  # ties: LM order kept
    unfilled = torch.tensor([[-0.1, -math.inf, -2.0]])  # a beam slot never filled is never chosen
    assert rerank(cands, unfilled, [[0.0, 9.0, 0.5]], weight=0.0, keep=1) == [["c"]]


def test_lm_scores_are_mean_log_prob_per_token():
    eos = 0
    tokens = torch.tensor([[[5, 6, eos, eos], [5, 6, 7, 8]]])  # lengths 3 (EOS counted) and 4 (no EOS)
    beam = torch.tensor([[-3.0 / 3 ** 0.5, -8.0 / 4 ** 0.5]])  # sum log p / length ** 0.5
    torch.testing.assert_close(lm_scores(tokens, beam, strategy="beam", length_penalty=0.5, end_ids=[eos]),
                               torch.tensor([[-1.0, -2.0]]))
    sampled = torch.tensor([[-3.0, -8.0]])  # sum log p
    torch.testing.assert_close(lm_scores(tokens, sampled, strategy="sample", length_penalty=1.0, end_ids=[eos]),
                               torch.tensor([[-1.0, -2.0]]))


@pytest.fixture
def images(shapes_data):
    return [str(p) for p in sorted((Path(shapes_data) / "test").glob("*.png"))[:3]]


def test_api_reranks_beams_and_samples(make_captioner, images):
    cap = make_captioner()
    beams = cap.caption(images, strategy="beam", num_beams=4, num_captions=4, max_new_tokens=8)
    targets = [row[-1] for row in beams]  # the LM's last choice
    cap.rerank_scorer = scorer = PrefersCaption(targets)
    assert cap.caption(images, strategy="beam", num_beams=4, max_new_tokens=8, rerank="clip") == targets
    assert scorer.calls == [3]  # one batch: every image scored at once
    # A large LM weight gives the LM's own first choice back.
    assert cap.caption(images, strategy="beam", num_beams=4, max_new_tokens=8, rerank="clip",
                       rerank_weight=1e6) == [row[0] for row in beams]
    two = cap.caption(images, strategy="beam", num_beams=4, num_captions=2, max_new_tokens=8, rerank="clip")
    assert [row[0] for row in two] == targets and all(len(row) == 2 and row[1] in b for row, b in zip(two, beams))
    # Sampling: rerank_samples seeded draws, the longest preferred.
    draws = cap.caption(images, strategy="sample", num_captions=5, seed=3, max_new_tokens=8)
    cap.rerank_scorer = PrefersLong()
    best = cap.caption(images, strategy="sample", rerank_samples=5, seed=3, max_new_tokens=8, rerank="clip")
    assert best == [max(row, key=len) for row in draws]


def test_clip_candidate_scores_equal_clipscore(images):
    from captioner.scoring.clipscore import CLIPScorer

    torch.manual_seed(0)
    clip = CLIPScorer.from_open_clip("tiny-test", None, clip_config=TINY_CLIP_TEXT)
    pil = [load_image(p) for p in images[:2]]
    cands = [["a red circle", "a blue square"], ["a green triangle", "a red circle"]]
    got = CLIPCandidateScorer(clip).candidate_scores(pil, cands)
    for j in range(2):
        want = clip.score(pil, [row[j] for row in cands])["per_image"]
        assert [row[j] for row in got] == pytest.approx([w["CLIPScore"] for w in want], abs=1e-5)


def test_rerank_refusals(make_captioner, images):
    with pytest.raises(ConfigError, match="several candidates"):
        DecodeConfig(strategy="greedy", rerank="clip")
    with pytest.raises(ConfigError, match="rerank must be"):
        DecodeConfig(rerank="bleu")
    cap = make_captioner()  # a random tower without text: nothing to score with
    with pytest.raises(ConfigError, match="CLIP text tower"):
        cap.caption(images[0], rerank="clip", max_new_tokens=4)
    cap.rerank_scorer = PrefersLong()
    with pytest.raises(ConfigError, match="against their images"):
        cap.caption_features(torch.randn(1, cap.model.image_encoder.output_dim), DecodeConfig(rerank="clip"))


def test_cli_rerank_mechanics(make_captioner, images, shapes_data, tmp_path, capsys):
    """With the tiny random CLIP only the mechanics are tested: the flags reach the reranker, the output is
    one of the beam hypotheses, errors are one line."""
    cap = make_captioner()
    model = cap.save_pretrained(tmp_path / "model")
    clip_json = tmp_path / "tiny_clip.json"
    clip_json.write_text(json.dumps(TINY_CLIP_TEXT))
    beams = cap.caption(images[:2], strategy="beam", num_beams=3, num_captions=3, max_new_tokens=6)
    flags = ["--model", str(model), "--num-beams", "3", "--max-new-tokens", "6", "--num-workers", "0"]
    clip = ["--rerank", "clip", "--clip-score-model", str(clip_json), "--clip-score-pretrained", "none"]
    assert main(["caption", *images[:2], *flags, *clip]) == 0
    out = [line.split("\t") for line in capsys.readouterr().out.strip().split("\n")]
    assert [p for p, _ in out] == images[:2] and all(c in b for (_, c), b in zip(out, beams))
    assert main(["eval", "--data", str(shapes_data), "--limit", "2", "--output-dir", str(tmp_path / "ev"),
                 *flags, *clip]) == 0
    scores = json.loads((tmp_path / "ev" / "scores.json").read_text())
    assert scores["decode"]["rerank"] == "clip" and "CLIPScore" in scores["corpus"]
    capsys.readouterr()
    for argv in (["caption", images[0], *flags, "--rerank", "clip"],  # no text tower, no scoring model
                 ["caption", images[0], *flags, *clip, "--output-dir", str(tmp_path / "shards")]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "error:" in err
