"""CIDEr-D rewards per second: captioner.scoring.ciderd vs pycocoevalcap's Cider (CIDEr-D), same input, one run.

10,000 (candidate, 5 references) pairs of COCO-like generated captions (pre-tokenised words), laid out as
SCST scores them: 2,000 images x 5 sampled candidates, each candidate against its image's 5 references.
Timed (best of --repeats):

* pycocoevalcap: `Cider().compute_score(gts, res)` with one key per pair (df from the pairs);
* ours, pairs' df: `CiderD().score(cands, refs)`, the same numbers as pycocoevalcap (checked here);
* ours, cached df: `CiderD(df).score(cands, groups, ref_index=...)`, the SCST path: df of the training
  references computed once, each image's reference vectors computed once for its 5 samples.

    python eval/bench_cider.py [--images 2000 --samples 5]
Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pycocoevalcap.cider.cider import Cider  # noqa: E402

from captioner.scoring.ciderd import CiderD, DocumentFrequency  # noqa: E402

SUBJECTS = "a man|a woman|two dogs|a cat|a young boy|a group of people|a red bus|a plate of food|a train".split("|")
VERBS = "sitting on|standing next to|riding|walking down|looking at|playing with|parked near|lying on".split("|")
OBJECTS = ("a bench|the street|a table|a field of grass|the water|a surfboard|a wooden fence|a city street|"
           "a snowy hill|a kitchen counter").split("|")
EXTRAS = ["", "", "in the park", "on a sunny day", "with a frisbee", "at night", "next to a building"]
ADJECTIVES = ["", "", "small", "large", "white", "black", "old", "busy"]


def caption(rng: random.Random) -> str:
    # ~100k distinct captions: repeats (which the scorer computes once) are as rare as in real samples
    obj = rng.choice(OBJECTS).split(" ", 1)
    words = (f"{rng.choice(SUBJECTS)} {rng.choice(ADJECTIVES)} {rng.choice(VERBS)} {obj[0]} {rng.choice(ADJECTIVES)} "
             f"{obj[1]} {rng.choice(EXTRAS)}")
    return " ".join(words.split())


def best_time(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--samples", type=int, default=5, help="candidates per image")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    rng = random.Random(0)
    groups = [[caption(rng) for _ in range(5)] for _ in range(args.images)]
    index = [i for i in range(args.images) for _ in range(args.samples)]
    cands = [caption(rng) for _ in index]
    pairs = len(cands)
    distinct = len(set(cands)) / pairs

    gts = {k: groups[i] for k, i in enumerate(index)}
    res = {k: [c] for k, c in enumerate(cands)}
    t_coco, (_, coco) = best_time(lambda: Cider().compute_score(gts, res), args.repeats)
    t_pairs, ours = best_time(lambda: CiderD().score(cands, [groups[i] for i in index]), args.repeats)
    diff = max(abs(a - b) for a, b in zip(ours, coco))
    t_df, df = best_time(lambda: DocumentFrequency.from_references(groups), 1)
    scorer = CiderD(df)
    t_cached, _ = best_time(lambda: scorer.score(cands, groups, ref_index=index), args.repeats)

    rows = [("pycocoevalcap Cider (CIDEr-D)", t_coco), ("ours, pairs' df (same numbers)", t_pairs),
            ("ours, cached df + shared refs (SCST)", t_cached)]
    print(f"{pairs} (candidate, 5 references) pairs, {args.images} images x {args.samples} samples; "
          f"{platform.processor() or platform.machine()}, Python {platform.python_version()}")
    print(f"{'scorer':40s} {'seconds':>9s} {'rewards/s':>11s} {'x pycoco':>9s}")
    for name, t in rows:
        print(f"{name:40s} {t:9.3f} {pairs / t:11.0f} {t_coco / t:9.1f}")
    print(f"{distinct:.1%} of the candidates are distinct")
    print(f"max |ours - pycocoevalcap| = {diff:.2e}; df of {args.images} images computed once in {t_df:.3f} s")
    result = {"bench": "ciderd", "pairs": pairs, "images": args.images, "samples": args.samples,
              "pycoco_rewards_per_s": round(pairs / t_coco), "ours_pairs_df_rewards_per_s": round(pairs / t_pairs),
              "ours_cached_rewards_per_s": round(pairs / t_cached), "ratio_pairs_df": round(t_coco / t_pairs, 2),
              "ratio_cached": round(t_coco / t_cached, 2), "max_abs_diff": diff,
              "distinct_candidates": round(distinct, 3)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
