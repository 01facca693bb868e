"""A fast, batched CIDEr-D, equal to pycocoevalcap's to ~1e-12 on the same tokenised input.

`DocumentFrequency` holds, for every n-gram (n = 1..4), the number of images whose references contain
it, and log(number of images); it is computed once from the training references
(`DocumentFrequency.from_references`) and saved beside a run as JSON (`save` / `load`). `CiderD` scores
(candidate, references) pairs with it, or, without one, with the document frequencies of the pairs
being scored, exactly as pycocoevalcap's `Cider` does (every pair is one document there).

Captions are pre-tokenised: a string (split on whitespace, as pycocoevalcap does) or any sequence of
hashable tokens (words, or token ids as a tuple). The score is pycocoevalcap's `cider/cider_scorer.py`,
which is CIDEr-D (Vedantam et al. 2015, section 4.3), not the original CIDEr: no stemming, tf-idf
vectors per n-gram order compared by cosine with the candidate's weights clipped to the reference's
(min of the two, so repeating an n-gram earns nothing beyond the reference count), a Gaussian length
penalty exp(-delta^2 / (2 sigma^2)) with sigma 6, the mean over n = 1..4 and over the references, x10.
Its quirks are kept so numbers match:

* the "length" in the penalty is the number of bigrams, not of words (the same difference between two
  non-empty captions; an empty one scores 0 anyway);
* an n-gram no reference document has gets df 1 (idf log N), and an order whose candidate or reference
  vector is zero contributes 0;
* with the pairs' own document frequencies, a single pair scores 0 (every idf is log 1 - log 1).

Speed comes from computing each distinct caption's vector once per call (n samples of an image share
the image's references: pass `ref_index`; repeated samples are common), comparing only the n-grams two
vectors share (a C-level set intersection), idf by dict lookup and plain floats instead of numpy scalars.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Hashable, Iterable, Sequence
from pathlib import Path

from captioner.errors import MetricsError
from captioner.files import atomic_write

Tokens = str | Sequence[Hashable]  # "a red circle" or ("a", "red", "circle") or (12, 7, 93)
FORMAT = "captioner-ciderd-df"
MAX_N = 4


def _words(caption: Tokens) -> Sequence[Hashable]:
    return caption.split() if isinstance(caption, str) else caption


def ngram_counts(caption: Tokens, n: int = MAX_N) -> Counter:
    """Counts of the caption's 1..n-grams, each a tuple of tokens."""
    words = tuple(_words(caption))
    counts: Counter = Counter()
    for k in range(1, n + 1):
        counts.update(zip(*(words[i:] for i in range(k))))
    return counts


class DocumentFrequency:
    """Per n-gram, the number of documents (images: the set of their references) containing it, and
    log(number of documents). Tokens are str (words) or int (token ids), one kind per table."""

    def __init__(self, df: dict[tuple, float], num_docs: int, *, n: int = MAX_N):
        if num_docs < 1:
            raise MetricsError("document frequencies need at least one document (image)")
        self.df, self.num_docs, self.n = df, int(num_docs), n
        self.log_n = math.log(float(num_docs))

    @classmethod
    def from_references(cls, references: Iterable[Sequence[Tokens]], *, n: int = MAX_N) -> "DocumentFrequency":
        """From one list of references per document (image), as pycocoevalcap counts them."""
        df: Counter = Counter()
        docs = 0
        for refs in references:
            docs += 1
            seen: set = set()
            for ref in refs:
                seen.update(ngram_counts(ref, n))
            df.update(seen)
        return cls(dict(df), docs, n=n)

    def idf(self, ngram: tuple) -> float:
        return self.log_n - math.log(max(1.0, self.df.get(ngram, 0.0)))

    # -------------------------------------------------------------- JSON beside a run

    def save(self, path: str | Path) -> Path:
        """Written whole (files.atomic_write). N-grams are stored as space-joined tokens (tokens never
        hold whitespace: they come from str.split or are ids)."""
        kinds = {type(t) for g in self.df for t in g}
        if not kinds <= {str} and not kinds <= {int}:
            raise MetricsError("document frequencies can be saved for word or token-id n-grams, not a mix")
        kind = "int" if kinds == {int} else "str"
        data = {"format": FORMAT, "version": 1, "n": self.n, "tokens": kind, "num_docs": self.num_docs,
                "log_n": self.log_n, "df": {" ".join(map(str, g)): c for g, c in self.df.items()}}
        return atomic_write(path, json.dumps(data, separators=(",", ":")) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "DocumentFrequency":
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise MetricsError(f"{path}: cannot read CIDEr-D document frequencies ({e})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != 1:
            raise MetricsError(f"{path}: not a CIDEr-D document frequency file ({FORMAT}, version 1)")
        n, kind, docs, df = data.get("n"), data.get("tokens"), data.get("num_docs"), data.get("df")
        if not (isinstance(n, int) and 1 <= n <= 9 and kind in ("str", "int") and isinstance(docs, int)
                and docs >= 1 and isinstance(df, dict)):
            raise MetricsError(f"{path}: malformed CIDEr-D document frequencies (n, tokens, num_docs or df)")
        table = {}
        for key, count in df.items():
            tokens = key.split(" ")
            if not (isinstance(count, int) and 1 <= count <= docs and 1 <= len(tokens) <= n):
                raise MetricsError(f"{path}: malformed document frequency for {key[:50]!r}: {count!r}")
            try:
                table[tuple(map(int, tokens)) if kind == "int" else tuple(tokens)] = count
            except ValueError:
                raise MetricsError(f"{path}: {key[:50]!r} is not a token-id n-gram") from None
        return cls(table, docs, n=n)


class CiderD:
    """CIDEr-D of candidates against their references (see the module docstring), batched.

    df: cached document frequencies (SCST rewards: those of the training references); None computes
    them from the pairs of each `score` call, as pycocoevalcap's Cider does for an evaluated set."""

    def __init__(self, df: DocumentFrequency | None = None, *, n: int = MAX_N, sigma: float = 6.0):
        if df is not None and df.n < n:
            raise MetricsError(f"document frequencies cover {df.n}-grams, CIDEr-D needs {n}")
        self.df, self.n, self.sigma = df, n, sigma

    def _vector(self, caption: Tokens, idf: dict, df: DocumentFrequency):
        """tf-idf weights {ngram: w} (all orders in one dict), the norm per order and the (bigram) length."""
        vec: dict = {}
        sq = [0.0] * self.n
        length = 0
        for g, tf in ngram_counts(caption, self.n).items():
            w = idf.get(g)
            if w is None:
                w = idf[g] = df.idf(g)
            k = len(g) - 1
            w *= tf
            vec[g] = w
            sq[k] += w * w
            if k == 1:  # pycocoevalcap's length: the number of bigrams
                length += tf
        return vec, [math.sqrt(s) for s in sq], length

    def score(self, candidates: Sequence[Tokens], references: Sequence[Sequence[Tokens]], *,
              ref_index: Sequence[int] | None = None) -> list[float]:
        """CIDEr-D of each candidate. references[i] are candidate i's references, or, with `ref_index`,
        references is a list of reference groups and candidate i has references[ref_index[i]] (each
        group's vectors are then computed once, e.g. for n samples of one image)."""
        if ref_index is None:
            if len(references) != len(candidates):
                raise MetricsError(f"{len(candidates)} candidates but {len(references)} reference lists")
            ref_index = range(len(candidates))
        elif len(ref_index) != len(candidates):
            raise MetricsError(f"{len(candidates)} candidates but {len(ref_index)} reference indices")
        if any(len(references[j]) == 0 for j in set(ref_index)):
            raise MetricsError("every candidate needs at least one reference")
        df = self.df
        if df is None:  # every pair is one document, as in pycocoevalcap
            if not candidates:
                return []
            df = DocumentFrequency.from_references((references[j] for j in ref_index), n=self.n)
        idf: dict = {}
        vectors: dict = {}  # caption -> vector: repeated captions (samples, shared references) once

        def vector(caption):
            key = caption if isinstance(caption, str) else tuple(caption)
            v = vectors.get(key)
            if v is None:
                v = vectors[key] = self._vector(key, idf, df)
            return v

        groups: dict[int, list] = {}
        two_var, orders = 2 * self.sigma ** 2, range(self.n)
        scores = []
        for cand, j in zip(candidates, ref_index):
            refs = groups.get(j)
            if refs is None:
                refs = groups[j] = [vector(r) for r in references[j]]
            vec, norm, length = vector(cand)
            total = 0.0
            for vec_r, norm_r, length_r in refs:
                dots = [0.0] * self.n
                for g in vec.keys() & vec_r.keys():  # only shared n-grams add to the clipped dot product
                    w, r = vec[g], vec_r[g]
                    dots[len(g) - 1] += (w if w < r else r) * r
                val = 0.0
                for k in orders:
                    val += dots[k] / (norm[k] * norm_r[k]) if norm[k] != 0 and norm_r[k] != 0 else dots[k]
                delta = float(length - length_r)
                total += val * math.exp(-(delta * delta) / two_var)
            scores.append(total / self.n / len(refs) * 10.0)
        return scores
