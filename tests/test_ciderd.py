"""Tests for captioner.scoring.ciderd: equality with pycocoevalcap's CIDEr-D (cider_scorer.py) on the same
tokenised input, with the pairs' own document frequencies and with cached ones saved beside a run."""

from __future__ import annotations

import json
import random

import pytest
from pycocoevalcap.cider.cider import Cider

from captioner.errors import MetricsError
from captioner.scoring.ciderd import CiderD, DocumentFrequency
from captioner.scoring.metrics import simple_tokenize

TOL = 1e-9  # stricter than the 1e-6 asked for: both sides compute in float64

REAL = [
    "A man riding a wave on top of a surfboard.", "A surfer rides a large wave in the ocean.",
    "Two dogs play with a frisbee in the park.", "A dog catches a frisbee on the grass.",
    "A plate of food with broccoli and rice.", "A red double decker bus on a city street.",
    "A bus is driving down the street.", "A cat sleeping on a laptop keyboard.",
    "A kitchen with a stove, a sink and a refrigerator.", "People standing around a table with pizza.",
    "a man on a surfboard riding a wave", "a dog with a frisbee in its mouth", "",
]


def pycoco(cands, refs):
    """pycocoevalcap's Cider over pairs (one key per pair, in order): per-pair scores."""
    gts = {i: list(r) for i, r in enumerate(refs)}
    res = {i: [c] for i, c in enumerate(cands)}
    return [float(s) for s in Cider().compute_score(gts, res)[1]]


def random_set(rng, n_pairs, n_refs, vocab=8, empty_every=0):
    words = [f"w{i}" for i in range(vocab)]

    def caption(lo=0):  # a small vocabulary: many repeated n-grams within and across captions
        return " ".join(rng.choice(words) for _ in range(rng.randint(lo, 14)))

    cands = ["" if empty_every and i % empty_every == 0 else caption() for i in range(n_pairs)]
    refs = [[caption(1) for _ in range(n_refs if n_refs else rng.randint(1, 5))] for _ in range(n_pairs)]
    return cands, refs


def close(ours, theirs):
    assert len(ours) == len(theirs)
    worst = max(abs(a - b) for a, b in zip(ours, theirs))
    assert worst < TOL, worst


@pytest.mark.parametrize("n_refs", [1, 5, 0])  # 0: 1..5 references per pair
def test_random_captions_equal_pycocoevalcap(n_refs):
    cands, refs = random_set(random.Random(n_refs), 120, n_refs, empty_every=17)
    theirs = pycoco(cands, refs)
    assert any(s > 0 for s in theirs) and any(s == 0 for s in theirs)  # empty candidates score 0
    close(CiderD().score(cands, refs), theirs)


def test_repeated_ngrams_are_clipped_as_pycocoevalcap_clips_them():
    cands = ["a a a a a a", "a dog a dog a dog", "dog", "a dog runs", ""]
    refs = [["a dog", "a cat a cat"], ["a dog runs on grass", "a dog"], ["dog dog"], ["a dog runs"], ["a dog"]]
    refs += [["the grass is green", "a bird"]] * 3
    cands += ["the grass", "a bird bird bird", "green green green green", "a dog runs"]
    refs += [["", "a dog runs"]]  # an empty reference adds 0 to the mean
    ours, theirs = CiderD().score(cands, refs), pycoco(cands, refs)
    close(ours, theirs)
    assert ours[0] < ours[3]  # the repetition earns less than the exact match


def test_real_looking_captions_equal_pycocoevalcap():
    rng = random.Random(0)
    tok = [simple_tokenize(c) for c in REAL]
    cands = [rng.choice(tok) for _ in range(60)]
    refs = [rng.sample(tok, 5) for _ in range(60)]
    close(CiderD().score(cands, refs), pycoco(cands, refs))


def test_token_ids_score_as_the_words_they_stand_for():
    cands, refs = random_set(random.Random(3), 40, 5)
    ids = {f"w{i}": 100 + i for i in range(8)}

    def as_ids(c):
        return tuple(ids[w] for w in c.split())

    words = CiderD().score(cands, refs)
    close(CiderD().score([as_ids(c) for c in cands], [[as_ids(r) for r in rs] for rs in refs]), words)


def test_cached_document_frequencies_equal_pycocoevalcap_over_the_training_set(tmp_path):
    """Rewards for a batch of training images with df of all training references (saved and loaded as
    JSON) equal pycocoevalcap's per-image scores over the whole training set, whose df is the same."""
    rng = random.Random(1)
    tok = [simple_tokenize(c) for c in REAL]
    train_refs = [rng.sample(tok, 5) for _ in range(50)] + random_set(rng, 50, 5)[1]
    cands = [rng.choice(tok) if i % 2 else random_set(rng, 1, 1)[0][0] for i in range(100)]
    theirs = pycoco(cands, train_refs)

    path = DocumentFrequency.from_references(train_refs).save(tmp_path / "ciderd_df.json")
    df = DocumentFrequency.load(path)
    assert df.num_docs == 100 and json.loads(path.read_text())["num_docs"] == 100
    batch = [rng.randrange(100) for _ in range(30)]  # any order, repeats (n samples of one image)
    scorer = CiderD(df)
    ours = scorer.score([cands[i] for i in batch], train_refs, ref_index=batch)
    close(ours, [theirs[i] for i in batch])
    # the same batch with the pairs' own df is a different (smaller) corpus: other numbers
    own = CiderD().score([cands[i] for i in batch], [train_refs[i] for i in batch])
    assert max(abs(a - b) for a, b in zip(own, ours)) > 1e-3


def test_token_id_document_frequencies_round_trip(tmp_path):
    refs = [[(1, 2, 3), (2, 3)], [(4,), (1, 2)]]
    df = DocumentFrequency.load(DocumentFrequency.from_references(refs).save(tmp_path / "df.json"))
    assert df.df == DocumentFrequency.from_references(refs).df and df.df[(2, 3)] == 1 and df.df[(1, 2)] == 2
    assert CiderD(df).score([(1, 2, 3)], refs, ref_index=[0]) == CiderD(
        DocumentFrequency.from_references(refs)).score([(1, 2, 3)], refs, ref_index=[0])


def test_one_pair_with_its_own_df_scores_zero_as_in_pycocoevalcap():
    assert CiderD().score(["a dog"], [["a dog"]]) == [0.0] == pycoco(["a dog"], [["a dog"]])


@pytest.mark.parametrize("content", [
    "not json", json.dumps({"format": "other"}),
    json.dumps({"format": "captioner-ciderd-df", "version": 1, "n": 4, "tokens": "str", "num_docs": 2,
                "df": {"a": 3}}),
    json.dumps({"format": "captioner-ciderd-df", "version": 1, "n": 4, "tokens": "int", "num_docs": 2,
                "df": {"a b": 1}}),
])
def test_malformed_document_frequency_files_are_one_line_errors(tmp_path, content):
    path = tmp_path / "df.json"
    path.write_text(content)
    with pytest.raises(MetricsError, match="df.json"):
        DocumentFrequency.load(path)


def test_mismatched_inputs_are_refused():
    with pytest.raises(MetricsError, match="2 candidates but 1"):
        CiderD().score(["a", "b"], [["a"]])
    with pytest.raises(MetricsError, match="at least one reference"):
        CiderD().score(["a"], [[]])
