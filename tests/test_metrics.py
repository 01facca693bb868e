"""Tests for captioner.scoring.metrics: equality with pycocoevalcap's own scorers, hand-derived BLEU and
CIDEr values, input validation, the no-Java fallback and per-image bookkeeping.

Java tests are batched into a few calls: METEOR's JVM needs ~10 s to load its paraphrase table.
"""

from __future__ import annotations

import logging
import math
import statistics

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from captioner.scoring import metrics
from captioner.scoring.metrics import (
    CaptionScores,
    MetricsError,
    evaluate,
    java_available,
    score_captions,
    simple_tokenize,
)

needs_java = pytest.mark.skipif(not java_available(), reason="needs Java (PTBTokenizer / METEOR)")

ALL_KEYS = ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"]

# Mixed id types on purpose; punctuation and case differences; image 1's prediction equals its
# first reference up to case; image 2's prediction is empty; "gonna" is where simple_tokenize and
# PTB differ (PTB: "gon na"), so the Java path must really use PTBTokenizer to match.
PREDICTIONS = {
    1: "A man riding a wave on top of a surfboard.",
    2: "",
    "img-3": "It's a cat; don't you see? It's gonna sleep.",
    (4, "b"): "A plate of food with rice and beans.",
    5: "two giraffes standing in a field",
    6: "A RED double-decker bus on the street",
}
REFERENCES = {
    1: ["a man riding a wave on top of a surfboard", "a MAN surfing, on a big wave!",
        "Surfer rides the wave (at sunset)."],
    2: ["Two dogs play in the snow.", "dogs playing outside"],
    "img-3": ["A cat sitting on a laptop's keyboard.", "The cat isn't moving -- it's gonna sleep."],
    (4, "b"): ["A plate of food (rice and beans) on a table.", "rice, beans and a fork on a plate",
               "A white plate holding some food."],
    5: ["Two giraffes standing next to each other in a field.", "Giraffes: tall, spotted, and hungry."],
    6: ["A red double-decker bus drives down a city street.", "A bus on the street."],
}


@pytest.fixture(scope="module")
def java_run():
    """Our result and pycocoevalcap's (COCOEvalCap's recipe, called directly) on the same input."""
    if not java_available():
        pytest.skip("needs Java")
    # Start the official METEOR first so both JVMs load their paraphrase tables concurrently.
    official_meteor = Meteor()
    created: list[Meteor] = []

    class SpyMeteor(Meteor):
        def __init__(self):
            super().__init__()
            created.append(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(metrics, "Meteor", SpyMeteor)
        ours = score_captions(PREDICTIONS, REFERENCES)

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in refs] for i, refs in REFERENCES.items()})
    res = tokenizer.tokenize({i: [{"caption": PREDICTIONS[i]}] for i in REFERENCES})
    official_corpus, official_per_image = {}, {}
    bleu, bleu_per_image = Bleu(4).compute_score(gts, res, verbose=0)
    for n in range(4):
        official_corpus[f"Bleu_{n + 1}"] = bleu[n]
        official_per_image[f"Bleu_{n + 1}"] = list(bleu_per_image[n])
    for key, scorer in (("METEOR", official_meteor), ("ROUGE_L", Rouge()), ("CIDEr", Cider())):
        score, per_image = scorer.compute_score(gts, res)
        official_corpus[key] = float(score)
        official_per_image[key] = [float(s) for s in per_image]
    official_meteor.__del__()  # pycocoevalcap stops its process only there, and leaves two pipes open
    official_meteor.meteor_p.stdout.close()
    official_meteor.meteor_p.stderr.close()
    return {"ours": ours, "corpus": official_corpus, "per_image": official_per_image,
            "order": list(gts.keys()), "meteors": created}


# --------------------------------------------------------------------------------------------
# Equality with the official scorers (Java)
# --------------------------------------------------------------------------------------------


@needs_java
def test_corpus_equals_official_scorers(java_run):
    ours: CaptionScores = java_run["ours"]
    assert list(ours.corpus) == ALL_KEYS
    assert ours.corpus == pytest.approx(java_run["corpus"], rel=1e-12, abs=1e-15)
    assert ours.coco_exact is True
    assert ours.skipped == []
    assert all(type(v) is float for v in ours.corpus.values())


@needs_java
def test_per_image_equals_official_scorers_and_keys_are_input_ids(java_run):
    ours: CaptionScores = java_run["ours"]
    ids = list(PREDICTIONS)
    assert list(ours.per_image) == ids
    assert java_run["order"] == ids  # the official per-image lists are in this order
    for key in ALL_KEYS:
        got = [ours.per_image[i][key] for i in ids]
        assert got == pytest.approx(java_run["per_image"][key], rel=1e-12, abs=1e-15), key


@needs_java
def test_per_image_cider_averages_to_corpus(java_run):
    ours: CaptionScores = java_run["ours"]
    mean_cider = statistics.fmean(s["CIDEr"] for s in ours.per_image.values())
    assert mean_cider == pytest.approx(ours.corpus["CIDEr"], rel=1e-12)
    mean_rouge = statistics.fmean(s["ROUGE_L"] for s in ours.per_image.values())
    assert mean_rouge == pytest.approx(ours.corpus["ROUGE_L"], rel=1e-12)
    assert ours.corpus["CIDEr"] > 1.0  # pycocoevalcap's scale (not /10, not x100)


@needs_java
def test_empty_and_identical_predictions(java_run):
    per_image = java_run["ours"].per_image
    assert all(per_image[2][k] == 0.0 for k in ALL_KEYS), per_image[2]
    identical = per_image[1]  # equals a reference after PTB lower-casing and punctuation removal
    for n in range(1, 5):
        assert identical[f"Bleu_{n}"] == pytest.approx(1.0, abs=1e-6)
    assert identical["ROUGE_L"] == 1.0
    assert identical["METEOR"] > 0.9
    assert identical["CIDEr"] > 1.0  # averaged over its 3 references, so not necessarily the max


@needs_java
def test_meteor_java_process_is_closed(java_run):
    (meteor,) = java_run["meteors"]
    assert meteor.meteor_p.poll() is not None
    assert meteor.meteor_p.stdout.closed


@needs_java
def test_fallback_equals_java_path_without_punctuation():
    preds = {"a": "a man riding a wave on a surfboard", "b": "two dogs play in the snow",
             "c": "a plate of food on a wooden table", "d": "a bus"}
    refs = {"a": ["a man riding a wave on top of a surfboard", "a surfer rides a big wave"],
            "b": ["two dogs playing in the snow", "dogs play outside in snow"],
            "c": ["a plate of food on a table", "food on a white plate"],
            "d": ["a red bus drives down a city street", "a bus on the street"]}
    java = score_captions(preds, refs, metrics=("BLEU", "ROUGE_L", "CIDEr"), use_java=True)
    fallback = score_captions(preds, refs, use_java=False)
    assert java.coco_exact is True and fallback.coco_exact is False
    assert "METEOR" not in fallback.corpus
    assert any(line.startswith("METEOR skipped:") for line in fallback.skipped)
    assert fallback.corpus == java.corpus  # identical tokenization -> identical numbers
    assert fallback.per_image == java.per_image


@needs_java
def test_simple_tokenize_agrees_with_ptb_on_ordinary_captions():
    captions = [
        "A man riding a wave on top of a surfboard.",
        "Two dogs, one brown and one white, play in the snow!",
        "A woman's hand holding a cell phone.",
        "The kids don't want to leave the park.",
        "A plate of food (rice and beans) on a table.",
        'It\'s a "vintage" car parked on the street...',
        "A U.S. flag waves over the black-and-white building.",
        "Are these people at a 10:30 meeting?",
        "Over 1,000 people attend the concert; it's loud -- really.",
        "Giraffes: tall, spotted, and hungry.",
        "A sign reads 'STOP' at the corner.",
        "50% off & $5 at the store",
    ]
    ptb = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(captions)})
    for i, caption in enumerate(captions):
        assert simple_tokenize(caption) == ptb[i][0], caption


@needs_java
def test_line_breaks_inside_captions_do_not_shift_images():
    # The Java tokenizer splits lines at \r and \u2028 too; unguarded, image 1's caption would be
    # cut in two and every later image would get its predecessor's caption.
    refs = {i: ["a dog runs on the grass", "a brown dog running"] for i in (1, 2, 3)}
    refs[4] = ["a cat sleeps on a sofa"]
    preds = {1: "a dog\rruns on the\u2028grass", 2: "a dog runs on the grass",
             3: "A dog runs on the grass.", 4: "a cat sleeps on a sofa"}
    scores = score_captions(preds, refs, metrics=("BLEU", "CIDEr"), use_java=True)
    assert scores.per_image[1] == scores.per_image[2] == scores.per_image[3]
    assert scores.per_image[4]["Bleu_4"] == pytest.approx(1.0, abs=1e-6)


@needs_java
def test_spice_missing_models_or_failure_is_skipped_not_raised(monkeypatch):
    preds = {1: "a dog runs", 2: "a cat sleeps"}
    refs = {1: ["a dog is running"], 2: ["a cat is sleeping"]}

    def no_spice(*args):
        raise AssertionError("Spice must not run (it would download Stanford CoreNLP)")

    monkeypatch.setattr(metrics, "_spice", no_spice)
    monkeypatch.setattr(metrics, "_spice_missing_jars", lambda: ("/x/spice/lib", ["stanford-corenlp-3.6.0.jar"]))
    scores = score_captions(preds, refs, metrics=("BLEU", "SPICE"))
    assert "SPICE" not in scores.corpus and "Bleu_4" in scores.corpus
    (line,) = scores.skipped
    assert line.startswith("SPICE skipped:") and "get_stanford_models" in line and "/x/spice/lib" in line

    def broken_spice(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(metrics, "_spice", broken_spice)
    monkeypatch.setattr(metrics, "_spice_missing_jars", lambda: ("/x/spice/lib", []))
    scores = score_captions(preds, refs, metrics=("SPICE", "ROUGE_L"))
    assert list(scores.corpus) == ["ROUGE_L"]
    assert len(scores.skipped) == 1 and "SPICE skipped" in scores.skipped[0] and "boom" in scores.skipped[0]


# --------------------------------------------------------------------------------------------
# Hand-derived values (pure Python path; no punctuation, so tokenization is just lower-casing)
# --------------------------------------------------------------------------------------------


def test_bleu_matches_hand_computation():
    hyp = "the black cat sat on the red mat today"  # 9 words
    ref1 = "a black cat is on the mat"  # 7 words
    ref2 = "the black cat sat quietly on a mat in sun"  # 10 words
    # Clipped matches against the max count over both references:
    #   1-grams: the(2 in hyp, max 1 in refs) black cat sat on mat -> 6 of 9 (red, today unmatched)
    #   2-grams: "the black" "black cat" "cat sat" "on the" -> 4 of 8
    #   3-grams: "the black cat" "black cat sat" -> 2 of 7
    #   4-grams: "the black cat sat" -> 1 of 6
    # Brevity penalty uses the *closest* reference length: |9-10| < |9-7| -> r = 10, c = 9.
    p = [6 / 9, 4 / 8, 2 / 7, 1 / 6]
    bp = math.exp(1 - 10 / 9)
    expected = {f"Bleu_{n}": bp * math.prod(p[:n]) ** (1 / n) for n in range(1, 5)}

    scores = score_captions({"im": hyp.upper()}, {"im": [ref1, ref2]}, metrics=("BLEU",), use_java=False)
    assert scores.corpus == pytest.approx(expected, rel=1e-6)
    assert scores.per_image["im"] == pytest.approx(expected, rel=1e-6)  # one image: same value

    # A hypothesis longer than the closest reference gets no brevity penalty.
    longer = score_captions({"im": hyp + " again"}, {"im": [ref1, ref2]}, metrics=("BLEU",), use_java=False)
    assert longer.corpus["Bleu_1"] == pytest.approx(6 / 10, rel=1e-6)


def test_cider_hand_checked_values():
    def cider(preds, refs):
        return score_captions(preds, refs, metrics=("CIDEr",), use_java=False)

    refs = {"a": ["red apple on table", "red apple on table"], "b": ["blue car in garage"]}
    # Disjoint vocabularies: every n-gram has idf log(2); a hypothesis equal to its references has
    # cosine 1 for n = 1..4 and no length penalty -> 10 * mean(1, 1, 1, 1) = 10.
    same = cider({"a": "red apple on table", "b": "blue car in garage"}, refs)
    assert same.per_image == {"a": {"CIDEr": pytest.approx(10.0)}, "b": {"CIDEr": pytest.approx(10.0)}}
    # No shared n-gram with the references -> exactly 0; the corpus is the mean of the images.
    half = cider({"a": "red apple on table", "b": "green bird over lake"}, refs)
    assert half.per_image["b"]["CIDEr"] == 0.0
    assert half.corpus["CIDEr"] == pytest.approx(5.0)
    # Partial overlap lies strictly between.
    partial = cider({"a": "red apple on chair", "b": "green bird over lake"}, refs)
    assert 0.0 < partial.per_image["a"]["CIDEr"] < 10.0
    # Two-word captions have no 3-/4-grams: 10 * mean(1, 1, 0, 0) = 5.
    short = cider({"a": "red apple", "b": "blue car"}, {"a": ["red apple"], "b": ["blue car"]})
    assert short.corpus["CIDEr"] == pytest.approx(5.0)
    # An n-gram found in every image's references has idf 0, so sharing only "a" scores 0.
    shared = cider({1: "a bird flies high", 2: "a cat sleeps now"},
                   {1: ["a dog runs fast"], 2: ["a cat sleeps now"]})
    assert shared.per_image[1]["CIDEr"] == 0.0
    assert shared.per_image[2]["CIDEr"] == pytest.approx(10.0)
    # idf over a single image is log(1) = 0 everywhere: pycocoevalcap gives 0 even for a perfect match.
    assert cider({1: "a dog"}, {1: ["a dog"]}).corpus["CIDEr"] == 0.0


def test_cider_without_any_reference_words_is_zero_not_a_crash():
    refs = {1: ["..."], 2: ["!"]}
    with pytest.raises(ValueError):  # why the guard exists
        Cider().compute_score({1: [""], 2: [""]}, {1: ["a dog"], 2: [""]})
    scores = score_captions({1: "a dog", 2: ""}, refs, metrics=("CIDEr", "BLEU"), use_java=False)
    assert scores.per_image[1]["CIDEr"] == 0.0 and scores.corpus["CIDEr"] == 0.0


def test_empty_prediction_scores_zero_without_java():
    scores = score_captions({1: "", 2: "a dog on grass"}, {1: ["a cat"], 2: ["a dog on grass"]}, use_java=False)
    assert all(v == 0.0 for v in scores.per_image[1].values())
    assert set(scores.per_image[1]) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"}


# --------------------------------------------------------------------------------------------
# Validation, fallback, API shape
# --------------------------------------------------------------------------------------------


def test_id_mismatch_names_ids_in_both_directions():
    preds = {i: "a dog" for i in range(1, 9)}
    refs = {1: ["a dog"], 2: ["a dog"], "x": ["a cat"], "y": ["a cat"]}
    with pytest.raises(MetricsError) as err:
        score_captions(preds, refs, use_java=False)
    msg = str(err.value)
    assert "6 prediction id(s) have no references: [3, 4, 5, 6, 7] and 1 more" in msg
    assert "2 reference id(s) have no prediction: ['x', 'y']" in msg
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize(
    ("preds", "refs", "fragment"),
    [
        ({1: "a"}, {1: []}, "non-empty; empty for ids [1]"),
        ({1: None}, {1: ["a"]}, "predictions must be str; not for ids [1]"),
        ({1: ["a"]}, {1: ["a"]}, "predictions must be str"),
        ({1: "a"}, {1: "a dog"}, "not a single str"),
        ({1: "a"}, {1: ["a", 3]}, "reference captions must be str; not for ids [1]"),
        ({}, {}, "no predictions"),
    ],
)
def test_invalid_inputs_raise(preds, refs, fragment):
    with pytest.raises(MetricsError) as err:
        score_captions(preds, refs, use_java=False)
    assert fragment in str(err.value)


def test_unknown_metric_raises():
    with pytest.raises(MetricsError, match="unknown metric 'BLEURT'"):
        score_captions({1: "a"}, {1: ["a"]}, metrics=("BLEURT",), use_java=False)


def test_fallback_flags_skip_lines_and_no_java_warning_when_off(monkeypatch, caplog):
    monkeypatch.setattr(metrics, "_fallback_warned", False)
    preds, refs = {1: "a dog", 2: "a cat"}, {1: ["a dog runs"], 2: ["a cat"]}
    with caplog.at_level(logging.WARNING, logger="captioner.scoring.metrics"):
        first = score_captions(preds, refs, metrics=("BLEU", "METEOR", "SPICE"), use_java=False)
        score_captions(preds, refs, use_java=False)
    assert first.coco_exact is False
    assert list(first.corpus) == ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"]
    assert first.skipped == ["METEOR skipped: Java disabled (use_java=False)",
                             "SPICE skipped: Java disabled (use_java=False)"]
    # Java off by the caller's choice (validation during training): no advice to install Java.
    assert not [r for r in caplog.records if "NOT COCO-exact" in r.getMessage() or "install" in r.getMessage()]


def test_missing_java_warns_once(monkeypatch, caplog):
    monkeypatch.setattr(metrics, "_fallback_warned", False)
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    with caplog.at_level(logging.WARNING, logger="captioner.scoring.metrics"):
        score_captions({1: "a dog"}, {1: ["a dog"]}, metrics=("BLEU",))
        score_captions({1: "a dog"}, {1: ["a dog"]}, metrics=("BLEU",))
    warnings = [r for r in caplog.records if "NOT COCO-exact" in r.getMessage()]
    assert len(warnings) == 1 and "Java not found" in warnings[0].getMessage()


@pytest.mark.skipif(not java_available(), reason="needs Java")
def test_ptb_tokenizer_keeps_java_chatter_off_the_terminal(capfd):
    assert metrics._ptb_tokenize({1: ["A dog, running."]}) == {1: ["a dog running"]}
    assert "tokens per second" not in capfd.readouterr().err


def test_missing_java_auto_falls_back_and_use_java_true_raises(monkeypatch):
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    assert java_available() is False
    scores = score_captions({1: "a dog"}, {1: ["a dog"]})
    assert scores.coco_exact is False
    assert "METEOR skipped: Java not found (install a JRE, e.g. apt-get install default-jre)" in scores.skipped
    with pytest.raises(MetricsError, match="use_java=True but Java not found"):
        score_captions({1: "a dog"}, {1: ["a dog"]}, use_java=True)


def test_evaluate_returns_corpus_dict():
    preds, refs = {"a": "a dog runs", "b": "a cat"}, {"a": ["a dog runs fast"], "b": ["the cat"]}
    expected = score_captions(preds, refs, metrics=("BLEU", "CIDEr"), use_java=False).corpus
    assert evaluate(preds, refs, metrics=("BLEU", "CIDEr"), use_java=False) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("A Dog, running!", "a dog running"),
        ("It's the dog's toy; don't touch...", "it 's the dog 's toy do n't touch"),
        ("A plate (rice and beans) on a table.", "a plate -lrb- rice and beans -rrb- on a table"),
        ('He said "hi" -- twice', "he said hi twice"),
        ("A U.S. flag, 1,000 people at 10:30.", "a u.s. flag 1,000 people at 10:30"),
        ("black-and-white  photo\r\nof   a cat", "black-and-white photo of a cat"),
        ("", ""),
        (" ... ", ""),
    ],
)
def test_simple_tokenize(text, expected):
    assert simple_tokenize(text) == expected


def test_spider_is_the_mean_of_cider_and_spice(monkeypatch):
    """SPICE needs a CoreNLP download, so its scorer is replaced; SPIDEr must combine whatever it returns."""
    from captioner.scoring import metrics

    if not metrics.java_available():
        pytest.skip("SPICE runs only with Java")
    preds = {"a": "a dog runs", "b": "a cat sleeps", "c": "two birds fly"}
    refs = {"a": ["a dog is running"], "b": ["a cat is sleeping"], "c": ["birds are flying"]}
    spice = {"a": 0.5, "b": 0.25, "c": 0.0}
    monkeypatch.setattr(metrics, "_spice_missing_jars", lambda: ("lib", []))
    monkeypatch.setattr(metrics, "_spice", lambda gts, res: (sum(spice.values()) / 3, dict(spice)))
    out = metrics.score_captions(preds, refs, metrics=("CIDEr", "SPICE"))
    assert out.corpus["SPIDEr"] == pytest.approx((out.corpus["CIDEr"] + 0.25) / 2)
    for k in preds:
        assert out.per_image[k]["SPIDEr"] == pytest.approx((out.per_image[k]["CIDEr"] + spice[k]) / 2)
    assert metrics.headline(out.corpus) == ("SPIDEr", out.corpus["SPIDEr"])
    no_spice = metrics.score_captions(preds, refs, metrics=("CIDEr",))
    assert "SPIDEr" not in no_spice.corpus and metrics.headline(no_spice.corpus)[0] == "CIDEr"
