"""int8 CPU path (`--quantize int8`, model/quantize.py) against float32, in one run:

  - agreement on the demo model (the shapes test split, beam 3, 20 tokens, as `captioner demo` decodes):
    share of test captions identical to float32, and CIDEr of both (difference in percent);
  - decode speed on GPT-2 124M + ViT-B-32 with random weights (eval/bench.py's `build`, its synthetic
    50,257-word tokenizer), exactly 20 new tokens (EOS suppressed: equal work), float32 vs int8 copies of
    the same model, measured in turn `--repeats` times (a drift in the machine's speed hits both alike;
    medians are reported), images/s and the ratio.

Target (issue 19): >= 1.6x float32 decode throughput with CIDEr within 1% of float32. `rows()` returns the
measurements for eval/bench.py; `main(argv)` prints a table and one JSON line.

    python eval/bench_int8.py --demo demo_out            # reuse a `captioner demo` output folder
    python eval/bench_int8.py                             # trains the demo first (a few minutes on CPU)
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from captioner.api import Captioner  # noqa: E402
from captioner.config import DecodeConfig  # noqa: E402
from captioner.model.quantize import quantize_int8  # noqa: E402

DEMO_DECODE = DecodeConfig(strategy="beam", num_beams=3, max_new_tokens=20)  # as run_demo captions the test split
STEPS = 20


def agreement(demo_dir: Path) -> dict:
    """float32 vs int8 captions of the demo's test split: share identical, CIDEr of each."""
    from captioner.data import read_imagefolder
    from captioner.scoring.metrics import score_captions

    model = demo_dir / "run" / "best"
    examples, _ = read_imagefolder(demo_dir / "data", "test")
    preds = {}
    for kind in ("fp32", "int8"):
        cap = Captioner.from_pretrained(model, device="cpu", quantize="int8" if kind == "int8" else None)
        preds[kind] = cap.evaluate(examples, decode=DEMO_DECODE, metrics=(), num_workers=0).predictions
    refs = {ex.image_id: ex.captions for ex in examples}
    cider = {k: score_captions(p, refs, metrics=("CIDEr",)).corpus["CIDEr"] for k, p in preds.items()}
    same = sum(preds["fp32"][k] == preds["int8"][k] for k in refs) / len(refs)
    return {"kind": "agreement", "model": str(model), "images": len(refs), "identical": same,
            "cider_fp32": cider["fp32"], "cider_int8": cider["int8"],
            "cider_diff_pct": 100 * (cider["int8"] - cider["fp32"]) / cider["fp32"]}


def speed(*, strategies=("greedy", "beam"), batch: int = 32, repeats: int = 3) -> list[dict]:
    """Decode images/s of float32 and int8 copies of GPT-2 124M, measured in turn; medians and ratio."""
    import bench

    fp32 = bench.build("cpu", "fp32")
    int8 = copy.deepcopy(fp32)
    int8.model = quantize_int8(int8.model)
    feats = torch.randn(batch, fp32.model.image_encoder.output_dim)
    rows = []
    for strategy in strategies:
        cfg = DecodeConfig(strategy=strategy, num_beams=5 if strategy == "beam" else 1, max_new_tokens=STEPS,
                           min_new_tokens=STEPS)
        times = {"fp32": [], "int8": []}
        for cap in (fp32, int8):
            cap.caption_features(feats, cfg)  # warm-up (allocator, packed weights)
        for _ in range(repeats):
            for kind, cap in (("fp32", fp32), ("int8", int8)):
                t0 = time.perf_counter()
                out = cap.caption_features(feats, cfg)
                times[kind].append(time.perf_counter() - t0)
                assert all(len(c[0].split()) == STEPS for c in out), "forced length not respected"
        fp, q = (batch / statistics.median(times[k]) for k in ("fp32", "int8"))
        rows.append({"kind": "speed", "strategy": strategy, "batch": batch, "steps": STEPS, "repeats": repeats,
                     "fp32_images_per_s": fp, "int8_images_per_s": q, "ratio": q / fp})
        print(f"  {strategy} batch {batch}: fp32 {fp:.2f}, int8 {q:.2f} images/s", file=sys.stderr)
    return rows


def rows(*, demo: str | Path | None = None, strategies=("greedy", "beam"), batch: int = 32, repeats: int = 3,
         demo_epochs: int = 12) -> list[dict]:
    """Every measurement of this benchmark as dicts (kind "agreement", then one "speed" per strategy). Without
    `demo`, the demo captioner is trained first in a temporary folder."""
    if demo is None:
        from captioner.demo.runs import run_demo

        with tempfile.TemporaryDirectory() as tmp:
            run_demo(tmp, epochs=demo_epochs)
            out = [agreement(Path(tmp))]
    else:
        out = [agreement(Path(demo))]
    return out + speed(strategies=strategies, batch=batch, repeats=repeats)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", help="a `captioner demo` output folder (run/best + data); default: train one")
    p.add_argument("--strategies", default="greedy,beam")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    measured = rows(demo=args.demo, strategies=tuple(args.strategies.split(",")), batch=args.batch,
                    repeats=args.repeats)
    device = f"CPU ({platform.machine()}, {torch.get_num_threads()} threads, quantized engine " \
             f"{torch.backends.quantized.engine})"
    a = measured[0]
    print(f"\nint8 vs float32, {device}")
    print(f"demo test split ({a['images']} images, beam 3): identical captions {100 * a['identical']:.1f}%, "
          f"CIDEr fp32 {a['cider_fp32']:.4f}, int8 {a['cider_int8']:.4f} ({a['cider_diff_pct']:+.2f}%)")
    print(f"decode, GPT-2 124M + ViT-B-32 (random weights), exactly {STEPS} new tokens, median of "
          f"{args.repeats} alternating runs:")
    print(f"{'strategy':<10}{'batch':>6}{'fp32 img/s':>12}{'int8 img/s':>12}{'int8/fp32':>11}")
    for r in measured[1:]:
        print(f"{r['strategy']:<10}{r['batch']:>6}{r['fp32_images_per_s']:>12.2f}{r['int8_images_per_s']:>12.2f}"
              f"{r['ratio']:>10.2f}x")
    print(json.dumps({"bench": "int8", "device": device, "torch": torch.__version__, "rows": measured}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
