"""Caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D, optional SPICE), computed as the COCO
caption evaluation (pycocoevalcap's `COCOEvalCap`) computes them; SPIDEr ((CIDEr + SPICE) / 2, the
audio-captioning headline) whenever both are computed.

`score_captions` is the entry point; `evaluate` returns only the corpus numbers. Inputs are plain
dicts keyed by image id (any hashable): one predicted caption per id and one or more reference
captions per id.

With Java (`java_available()`), captions are tokenized with pycocoevalcap's Stanford
`PTBTokenizer` and every metric comes from pycocoevalcap's own scorers, so the numbers equal the
official COCO numbers (`CaptionScores.coco_exact` is True). Without Java, captions are tokenized
with `simple_tokenize` (a pure-Python approximation of the PTB tokenizer), BLEU, ROUGE-L and CIDEr
come from the same pure-Python scorers, METEOR and SPICE are skipped, and `coco_exact` is False.
Scores keep pycocoevalcap's scale: BLEU/METEOR/ROUGE-L/SPICE in 0..1, CIDEr roughly 0..10.

pycocoevalcap behaviours worth knowing (all reproduced, not "fixed", so numbers stay official):

* CIDEr-D's idf is computed over the evaluated set itself: with a single image every weight is
  zero and CIDEr is 0, and an n-gram present in every image's references contributes nothing.
* An empty prediction scores 0 on every metric (against non-empty references); the official
  scorers handle it without crashing.
* PTBTokenizer lower-cases after bracket escaping, so brackets survive as ``-lrb-``/``-rrb-``
  tokens; the punctuation it drops is `PUNCTUATIONS` from pycocoevalcap's tokenizer module.

Two guards go beyond the official code, only where it would otherwise fail or silently misalign:
line-break characters other than ``\\n`` (``\\r``, ``\\u2028``, ...) are replaced by spaces before
tokenizing (the Java tokenizer would split them into extra lines and shift every later caption to
the wrong image), and CIDEr is 0 instead of a crash when no reference has any word.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import subprocess
import types
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer import ptbtokenizer as _ptb
from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS, PTBTokenizer

from captioner.errors import MetricsError  # noqa: F401  (defined in errors.py)

logger = logging.getLogger(__name__)

__all__ = [
    "CaptionScores",
    "MetricsError",
    "METRICS",
    "DEFAULT_METRICS",
    "score_captions",
    "evaluate",
    "headline",
    "java_available",
    "simple_tokenize",
]

#: Metric names accepted by `score_captions(metrics=...)`, each with the result keys it produces,
#: in the order results are reported.
METRICS: dict[str, tuple[str, ...]] = {
    "BLEU": ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"),
    "METEOR": ("METEOR",),
    "ROUGE_L": ("ROUGE_L",),
    "CIDEr": ("CIDEr",),
    "SPICE": ("SPICE",),
}
DEFAULT_METRICS: tuple[str, ...] = ("BLEU", "METEOR", "ROUGE_L", "CIDEr")
_ALIASES = {
    "bleu": "BLEU",
    "meteor": "METEOR",
    "rouge_l": "ROUGE_L",
    "rouge-l": "ROUGE_L",
    "rouge": "ROUGE_L",
    "cider": "CIDEr",
    "cider-d": "CIDEr",
    "spice": "SPICE",
}
_JAVA_HINT = "install a JRE, e.g. apt-get install default-jre"
# Characters Python (and, for most of them, Java's tokenizer) treats as line breaks. pycocoevalcap
# writes one caption per line, so any of these inside a caption would shift the captions after it.
_LINE_BREAKS = re.compile(r"[\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")
_MAX_NAMED_IDS = 5

_fallback_warned = False



@dataclass
class CaptionScores:
    """Result of `score_captions`."""

    #: Corpus-level score per metric key (Bleu_1..Bleu_4, METEOR, ROUGE_L, CIDEr, SPICE).
    corpus: dict[str, float]
    #: Per image id, the same metric keys. BLEU per image is pycocoevalcap's per-image BLEU list.
    per_image: dict[Hashable, dict[str, float]]
    #: True when computed with the Java PTB tokenizer, exactly as the COCO caption evaluation does.
    coco_exact: bool
    #: One human-readable line per requested metric that was not computed, saying why.
    skipped: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Java detection
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _java_runs(java: str) -> bool:
    try:
        proc = subprocess.run([java, "-version"], capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        logger.debug("`%s -version` failed: %s", java, exc)
        return False
    if proc.returncode != 0:
        logger.debug("`%s -version` exited with %d: %s", java, proc.returncode,
                     proc.stderr.decode(errors="replace").strip())
    return proc.returncode == 0


def _java_problem() -> str | None:
    """None when the `java` on PATH (the one pycocoevalcap runs) works, else why not."""
    java = shutil.which("java")
    if java is None:
        return f"Java not found ({_JAVA_HINT})"
    if not _java_runs(java):
        return f"Java at {java} does not run (`java -version` failed; {_JAVA_HINT})"
    return None


def java_available() -> bool:
    """Whether a working `java` is on PATH (checked once per Java path with `java -version`)."""
    return _java_problem() is None


# --------------------------------------------------------------------------------------------
# Tokenization
# --------------------------------------------------------------------------------------------

_PTB_DROPPED = frozenset(PUNCTUATIONS)
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_BRACKET_TOKENS = frozenset(_BRACKETS.values())
_ABBREVIATIONS = frozenset({"mr.", "mrs.", "ms.", "dr.", "st.", "jr.", "sr.", "vs.", "etc.", "inc.", "co."})
_INITIALISM = re.compile(r"(?:[a-z]\.)+")  # u.s., e.g., a.
_NEGATION = re.compile(r"(.+)(n't)")
_CLITIC = re.compile(r"(.+?)('s|'m|'re|'ve|'ll|'d)")


def _is_abbreviation(token: str) -> bool:
    return token in _ABBREVIATIONS or _INITIALISM.fullmatch(token) is not None


def _split_word(token: str) -> list[str]:
    if token in _BRACKET_TOKENS:
        return [token]
    token = token.lstrip(".-'")
    while token and token[-1] in ".-'" and not _is_abbreviation(token):
        token = token[:-1]
    if not token:
        return []
    if token == "cannot":
        return ["can", "not"]
    match = _NEGATION.fullmatch(token) or _CLITIC.fullmatch(token)
    return [match.group(1), match.group(2)] if match else [token]


def simple_tokenize(text: str) -> str:
    """Pure-Python approximation of pycocoevalcap's PTBTokenizer output (used without Java).

    Lower-cases; turns brackets into -lrb-/-rrb-/-lsb-/-rsb-/-lcb-/-rcb- tokens as PTB does;
    splits clitics ("don't" -> "do n't", "dog's" -> "dog 's"); splits off % & $ + =; drops the
    punctuation and quotes the COCO eval drops (. ? ! , : ; - -- ... and quote marks) while keeping
    word-internal periods, hyphens and digit separators ("u.s.", "black-and-white", "1,000",
    "10:30"); then splits on whitespace and rejoins with single spaces. Agrees with PTBTokenizer on
    ordinary captions; it is not exact on unusual input, which is why results computed with it
    are flagged `coco_exact=False`.
    """
    text = _LINE_BREAKS.sub(" ", text).lower()
    text = re.sub(r"[()\[\]{}]", lambda m: f" {_BRACKETS[m.group()]} ", text)
    text = re.sub(r"[\"`]", " ", text)
    text = re.sub(r"([%&$+=])", r" \1 ", text)
    text = re.sub(r"([;!?]+)", r" \1 ", text)  # "!" alone is dropped, PTB keeps runs like "?!"
    text = re.sub(r"(?<!\d)[,:]|[,:](?!\d)", " ", text)  # keep 1,000 and 10:30
    tokens = [piece for word in text.split() for piece in _split_word(word)]
    return " ".join(t for t in tokens if t not in _PTB_DROPPED)


class _QuietPopen(subprocess.Popen):
    """Popen for pycocoevalcap's PTBTokenizer: Java's stderr ("PTBTokenizer tokenized N tokens at ... tokens
    per second", on every call) is captured instead of reaching the terminal, and kept for error messages."""

    last_stderr = b""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("stderr", subprocess.PIPE)
        super().__init__(*args, **kwargs)

    def communicate(self, *args, **kwargs):
        out, err = super().communicate(*args, **kwargs)
        _QuietPopen.last_stderr = err or b""
        return out, err


def _ptb_tokenize(captions: dict[Hashable, list[str]]) -> dict[Hashable, list[str]]:
    """pycocoevalcap's PTBTokenizer on {id: [caption, ...]}, checked for line alignment."""
    payload = {i: [{"caption": _LINE_BREAKS.sub(" ", c)} for c in caps] for i, caps in captions.items()}
    _QuietPopen.last_stderr = b""
    real = _ptb.subprocess  # the module it calls Popen through (it uses only Popen and PIPE)
    _ptb.subprocess = types.SimpleNamespace(Popen=_QuietPopen, PIPE=subprocess.PIPE)
    try:
        out = PTBTokenizer().tokenize(payload)
    except OSError as exc:
        raise MetricsError(
            f"pycocoevalcap's PTBTokenizer failed ({exc}); it runs `java` and writes a temporary file "
            f"next to its jar, so {os.path.dirname(os.path.abspath(_ptb.__file__))} must be writable"
        ) from exc
    finally:
        _ptb.subprocess = real
    bad = [i for i, caps in captions.items() if len(out.get(i, ())) != len(caps)]
    if bad:
        said = " ".join(_QuietPopen.last_stderr.decode("utf-8", "replace").split())[-300:]
        raise MetricsError(
            f"PTBTokenizer returned the wrong number of captions for ids {_name_ids(bad)}; the Java "
            f"tokenizer probably failed (it said: {said or 'nothing'})"
        )
    return {i: out[i] for i in captions}


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _name_ids(ids: list) -> str:
    shown = ", ".join(repr(i) for i in ids[:_MAX_NAMED_IDS])
    more = f" and {len(ids) - _MAX_NAMED_IDS} more" if len(ids) > _MAX_NAMED_IDS else ""
    return f"[{shown}]{more}"


def _validate(predictions: Mapping, references: Mapping) -> list[Hashable]:
    if not isinstance(predictions, Mapping) or not isinstance(references, Mapping):
        raise MetricsError("predictions and references must be mappings keyed by image id")
    problems = []
    no_refs = [i for i in predictions if i not in references]
    no_pred = [i for i in references if i not in predictions]
    if no_refs:
        problems.append(f"{len(no_refs)} prediction id(s) have no references: {_name_ids(no_refs)}")
    if no_pred:
        problems.append(f"{len(no_pred)} reference id(s) have no prediction: {_name_ids(no_pred)}")
    not_str = [i for i, p in predictions.items() if not isinstance(p, str)]
    if not_str:
        problems.append(f"predictions must be str; not for ids {_name_ids(not_str)}")
    not_list = [i for i, r in references.items() if isinstance(r, str) or not isinstance(r, Sequence)]
    if not_list:
        problems.append(
            f"references must be a sequence of str per id (a list, not a single str); not for ids {_name_ids(not_list)}"
        )
    listed = [(i, r) for i, r in references.items() if i not in not_list]
    empty = [i for i, r in listed if len(r) == 0]
    if empty:
        problems.append(f"reference lists must be non-empty; empty for ids {_name_ids(empty)}")
    bad_ref = [i for i, r in listed if any(not isinstance(c, str) for c in r)]
    if bad_ref:
        problems.append(f"reference captions must be str; not for ids {_name_ids(bad_ref)}")
    if problems:
        raise MetricsError("invalid caption metric inputs: " + "; ".join(problems))
    if not predictions:
        raise MetricsError("no predictions to score")
    return list(predictions)


def _canonical_metrics(metrics: Sequence[str]) -> set[str]:
    if isinstance(metrics, str):
        metrics = [metrics]
    wanted = set()
    for name in metrics:
        canonical = _ALIASES.get(str(name).lower())
        if canonical is None:
            raise MetricsError(f"unknown metric {name!r}; choose from {list(METRICS)}")
        wanted.add(canonical)
    if not wanted:
        raise MetricsError(f"no metrics requested; choose from {list(METRICS)}")
    return wanted


# --------------------------------------------------------------------------------------------
# Scorers
# --------------------------------------------------------------------------------------------


def _close_meteor(meteor: Meteor) -> None:
    """Stop Meteor's Java process now (pycocoevalcap only does it in __del__)."""
    proc = getattr(meteor, "meteor_p", None)
    if proc is None:
        return
    try:
        proc.stdin.close()
    except OSError:
        pass
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()
    # A compute_score that raised leaves the lock held, and Meteor.__del__ would then block forever.
    lock = getattr(meteor, "lock", None)
    if lock is not None and lock.locked():
        lock.release()


def _cider(gts: dict, res: dict) -> tuple[float, list[float]]:
    if not any(c.split() for caps in gts.values() for c in caps):
        # pycocoevalcap raises ValueError (max() of no document frequencies) here.
        logger.warning("CIDEr: no reference caption has any word after tokenization; CIDEr is 0")
        return 0.0, [0.0] * len(gts)
    score, scores = Cider().compute_score(gts, res)
    return float(score), [float(s) for s in scores]


def _spice_missing_jars() -> tuple[str, list[str]]:
    """(lib dir, missing Stanford CoreNLP jars) for pycocoevalcap's SPICE."""
    from pycocoevalcap.spice import get_stanford_models as models

    lib = os.path.join(os.path.dirname(os.path.abspath(models.__file__)), models.SPICELIB)
    names = [f"{models.JAR}.jar", f"{models.JAR}-models.jar"]
    return lib, [n for n in names if not os.path.exists(os.path.join(lib, n))]


def _spice(gts: dict, res: dict) -> tuple[float, dict[Hashable, float]]:
    from pycocoevalcap.spice.spice import Spice

    score, scores = Spice().compute_score(gts, res)
    # Spice orders its per-image results by sorted id, unlike the other scorers.
    per_image = {i: float(s["All"]["f"]) for i, s in zip(sorted(gts), scores)}
    return float(score), per_image


def _warn_fallback(reason: str) -> None:
    global _fallback_warned
    if _fallback_warned:
        return
    _fallback_warned = True
    logger.warning(
        "Caption metrics are NOT COCO-exact: %s. Captions are tokenized with a pure-Python "
        "approximation of the PTB tokenizer and METEOR/SPICE are skipped. For official COCO numbers "
        "install Java (e.g. apt-get install default-jre) and use use_java=None or True.",
        reason,
    )


def score_captions(
    predictions: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    *,
    metrics: Sequence[str] = DEFAULT_METRICS,
    use_java: bool | None = None,
) -> CaptionScores:
    """Score one predicted caption per image id against that id's reference captions.

    `metrics`: any of "BLEU" (Bleu_1..Bleu_4), "METEOR", "ROUGE_L", "CIDEr", "SPICE"
    (case-insensitive). `use_java`: None uses Java when it works, True requires it (MetricsError
    otherwise), False never uses it. Without Java the results are not COCO-exact (see the module
    docstring); metrics that could not be computed are listed in `skipped`, never raised.
    """
    wanted = _canonical_metrics(metrics)
    ids = _validate(predictions, references)

    if use_java is False:  # the caller's choice (e.g. fast monitoring during training): nothing to warn about
        java_problem: str | None = "Java disabled (use_java=False)"
    else:
        java_problem = _java_problem()
        if java_problem is not None and use_java:
            raise MetricsError(f"use_java=True but {java_problem}")
        if java_problem is not None:
            _warn_fallback(java_problem)
    use_java = java_problem is None

    gts_raw = {i: list(references[i]) for i in ids}
    res_raw = {i: [predictions[i]] for i in ids}
    corpus: dict[str, float] = {}
    per_image: dict[Hashable, dict[str, float]] = {i: {} for i in ids}
    skipped: list[str] = []

    def record(key: str, score: float, scores) -> None:
        corpus[key] = float(score)
        for i, s in zip(ids, scores):
            per_image[i][key] = float(s)

    meteor = None
    try:
        if use_java and "METEOR" in wanted:
            try:
                # Started first: its JVM loads the paraphrase table (~10 s) while we tokenize.
                meteor = Meteor()
            except OSError as exc:
                skipped.append(f"METEOR skipped: could not start the METEOR Java process ({exc})")
        if use_java:
            logger.debug("tokenizing %d images with pycocoevalcap's PTBTokenizer", len(ids))
            gts = _ptb_tokenize(gts_raw)
            res = _ptb_tokenize(res_raw)
        else:
            gts = {i: [simple_tokenize(c) for c in caps] for i, caps in gts_raw.items()}
            res = {i: [simple_tokenize(c) for c in caps] for i, caps in res_raw.items()}

        if "BLEU" in wanted:
            score, scores = Bleu(4).compute_score(gts, res, verbose=0)
            for key, sc, scs in zip(METRICS["BLEU"], score, scores):
                record(key, sc, scs)
        if "METEOR" in wanted:
            if not use_java:
                skipped.append(f"METEOR skipped: {java_problem}")
            elif meteor is not None:
                try:
                    score, scores = meteor.compute_score(gts, res)
                    record("METEOR", score, scores)
                except (OSError, ValueError) as exc:
                    skipped.append(f"METEOR skipped: the METEOR Java process failed ({exc!r})")
        if "ROUGE_L" in wanted:
            score, scores = Rouge().compute_score(gts, res)
            record("ROUGE_L", score, scores)
        if "CIDEr" in wanted:
            if len(ids) == 1:
                logger.warning("CIDEr over a single image is always 0 (its idf is computed over the "
                               "evaluated images); score the whole set at once")
            record("CIDEr", *_cider(gts, res))
        if "SPICE" in wanted:
            lib, missing = _spice_missing_jars() if use_java else ("", [])
            if not use_java:
                skipped.append(f"SPICE skipped: {java_problem}")
            elif missing:
                skipped.append(
                    f"SPICE skipped: Stanford CoreNLP jars missing from {lib} ({', '.join(missing)}); to "
                    "enable, run `python -c 'from pycocoevalcap.spice.get_stanford_models import "
                    "get_stanford_models; get_stanford_models()'` (downloads Stanford CoreNLP 3.6.0) or "
                    "place those jars there"
                )
            else:
                try:
                    score, spice_per_image = _spice(gts, res)
                except Exception as exc:  # noqa: BLE001 - SPICE is optional; report why, keep the rest
                    skipped.append(f"SPICE skipped: pycocoevalcap's Spice failed ({type(exc).__name__}: {exc})")
                else:
                    corpus["SPICE"] = score
                    for i in ids:
                        per_image[i]["SPICE"] = spice_per_image[i]
        if "CIDEr" in corpus and "SPICE" in corpus:  # SPIDEr (audio captioning's headline): their mean
            corpus["SPIDEr"] = (corpus["CIDEr"] + corpus["SPICE"]) / 2
            for i in ids:
                per_image[i]["SPIDEr"] = (per_image[i]["CIDEr"] + per_image[i]["SPICE"]) / 2
    finally:
        if meteor is not None:
            _close_meteor(meteor)

    for line in skipped:
        logger.warning("%s", line)
    order = [key for name in METRICS for key in METRICS[name]] + ["SPIDEr"]
    corpus = {k: corpus[k] for k in order if k in corpus}
    per_image = {i: {k: scores[k] for k in order if k in scores} for i, scores in per_image.items()}
    return CaptionScores(corpus=corpus, per_image=per_image, coco_exact=use_java, skipped=skipped)


def headline(corpus: Mapping[str, float]) -> tuple[str, float]:
    """The metric audio captioning reports: SPIDEr when SPICE was computed, else CIDEr."""
    key = "SPIDEr" if "SPIDEr" in corpus else "CIDEr"
    return key, corpus[key]


def evaluate(predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]],
             **kw) -> dict[str, float]:
    """Corpus scores only: `score_captions(predictions, references, **kw).corpus`."""
    return score_captions(predictions, references, **kw).corpus
