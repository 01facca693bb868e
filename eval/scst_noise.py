"""SCST learning test, measured over seeds: run-to-run noise of test CIDEr after K more cross-entropy steps vs
K SCST steps from the same cross-entropy captioner, and seconds per step of each (the cost ratio).

The recipe of tests/test_scst.py's slow comparison test (its CMP_* constants): a shapes set (CMP_TRAIN train,
30 val, 60 test images, seed 1), the demo's tiny captioner trained XE_EPOCHS epochs once (seed 0), then for
each seed both full-batch continuations (the seed sets the batch order and the samples).

    python eval/scst_noise.py [--seeds 0,1,2] [--out /tmp/scst_noise]
Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from captioner.demo.runs import run_scst_demo  # noqa: E402
from captioner.demo.shapes import make_shapes_dataset  # noqa: E402
from test_scst import CMP_BATCH as BATCH, CMP_EPOCHS as XE_EPOCHS, CMP_LR, CMP_STEPS as STEPS, CMP_TRAIN  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", default="/tmp/scst_noise")
    args = ap.parse_args(argv)
    out = Path(args.out)
    data = make_shapes_dataset(out / "data", n_train=CMP_TRAIN, n_val=30, n_test=60, seed=1)
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        # one base (trained on the first call, seed 0 as in the test), continuations seeded per seed
        r = run_scst_demo(out / "runs", data=data, xe_epochs=XE_EPOCHS, steps=STEPS, xe_lr=CMP_LR, scst_lr=CMP_LR,
                          batch_size=BATCH, seed=seed) if seed == 0 else _continue(out, data, seed)
        rows.append({"seed": seed, "start": r.start, "xe": r.xe, "scst": r.scst, "diff": r.scst - r.xe,
                     "reward_first": statistics.mean(r.rewards[:STEPS // 3]),
                     "reward_last": statistics.mean(r.rewards[-(STEPS // 3):]),
                     "s_xe": r.seconds_per_step["xe"], "s_scst": r.seconds_per_step["scst"]})
        print(json.dumps(rows[-1]), flush=True)
    print(f"{'seed':>4} {'start':>7} {'+XE':>7} {'+SCST':>7} {'diff':>7} {'reward 1st/3':>12} {'last/3':>7} "
          f"{'s/step XE':>9} {'SCST':>6}")
    for r in rows:
        print(f"{r['seed']:>4} {r['start']:7.3f} {r['xe']:7.3f} {r['scst']:7.3f} {r['diff']:7.3f} "
              f"{r['reward_first']:12.3f} {r['reward_last']:7.3f} {r['s_xe']:9.3f} {r['s_scst']:6.3f}")
    diffs = [r["diff"] for r in rows]
    summary = {"bench": "scst_noise", "steps": STEPS, "seeds": len(rows),
               "xe_mean": statistics.mean(r["xe"] for r in rows), "scst_mean": statistics.mean(r["scst"] for r in rows),
               "diff_mean": statistics.mean(diffs), "diff_min": min(diffs),
               "xe_sd": statistics.pstdev([r["xe"] for r in rows]), "scst_sd": statistics.pstdev([r["scst"] for r in rows]),
               "step_cost_ratio": statistics.median(r["s_scst"] / r["s_xe"] for r in rows)}
    print(json.dumps(summary))
    return summary


def _continue(out, data, seed):
    """The same base (already trained), continuations with another seed, in their own folder."""
    import shutil

    root = out / f"runs_seed{seed}"
    if not (root / "base").exists():
        shutil.copytree(out / "runs" / "base", root / "base")
        shutil.copytree(out / "runs" / "features", root / "features", dirs_exist_ok=True)
    return run_scst_demo(root, data=data, xe_epochs=XE_EPOCHS, steps=STEPS, xe_lr=CMP_LR, scst_lr=CMP_LR,
                         batch_size=BATCH, seed=seed)


if __name__ == "__main__":
    main()
