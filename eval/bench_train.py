"""Training throughput (captions/s) of the real training loop, and feature-extraction images/s.

Training: MLP mapper + fine-tuned GPT-2 (124M config by default, random weights: speed does not depend
on weight values), prefix 10, ~20-token captions, cached features. The features of a generated image
set are put into the feature cache first (random vectors through the cache API), so `train()` runs
exactly as for users with a warm cache; captions/s is measured between two logged steps after warm-up.

Extraction: ViT-B-32 (random weights) encoding a folder of generated JPEGs through the feature cache,
with DataLoader workers.

    python eval/bench_train.py                       # GPU: gpt2 124M, fp32 and bf16
    python eval/bench_train.py --lm-size tiny        # CPU-sized run
Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from captioner.config import ModelConfig  # noqa: E402
from captioner.train.features import FeatureCache, encoder_key  # noqa: E402
from captioner.demo.tiny import train_tokenizer  # noqa: E402
from captioner.config import TrainConfig  # noqa: E402
from captioner.train.loop import train  # noqa: E402

WORDS = ("a man woman dog cat red blue green small large sitting standing on in the of with next to near "
         "table street field water grass car bus train plate food pizza bench tree building").split()
VOCAB = 50257  # GPT-2's: the LM head and the loss over it are ~30% of a step, so train with its full size
LM_SIZES = {  # GPT-2 configs: 124M = transformers' GPT2Config defaults
    "124M": dict(n_embd=768, n_layer=12, n_head=12),
    "tiny": dict(n_embd=256, n_layer=4, n_head=4),
}


def make_images(folder: Path, n: int, size: int, *, captions: bool, seed: int = 0) -> None:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        im = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
        im.save(folder / f"{i:06d}.jpg", quality=90)
        rows.append({"file_name": f"{i:06d}.jpg", "captions": [" ".join(rng.choice(WORDS) for _ in range(16))]})
    if captions:
        (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def bench_training(args, work: Path, precision: str, tokenizer) -> dict:
    data = work / "data"
    cfg = ModelConfig(clip_model="ViT-B-32", clip_pretrained=None, lm="gpt2", finetune_lm=True, mapper="mlp",
                      prefix_length=10, lm_config={"model_type": "gpt2", "vocab_size": max(len(tokenizer), VOCAB),
                                                   "n_positions": 64, **LM_SIZES[args.lm_size]})
    out = work / f"run_{precision}"
    tc = TrainConfig(data=str(data), val_split=None, output_dir=str(out), epochs=1, max_steps=args.steps,
                     batch_size=args.batch_size, lr=1e-4, warmup_steps=1, mixed_precision=precision,
                     feature_cache=str(work / "cache"), val_images=0, log_every=1, model=cfg)
    t0 = time.perf_counter()
    train(tc, tokenizer=tokenizer)
    wall = time.perf_counter() - t0
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    warm = min(args.warmup, len(steps) - 2)
    a, b = steps[warm], steps[-1]
    rate = (b["captions"] - a["captions"]) / (b["time"] - a["time"])
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return {"precision": precision, "captions_per_s": rate, "steps_timed": len(steps) - 1 - warm, "wall_s": wall,
            "peak_gpu_gib": peak}


def prefill_cache(work: Path, tokenizer) -> None:
    """Random features for every training image, written through the cache API (as an extraction would)."""
    from captioner.api import Captioner

    cfg = ModelConfig(clip_model="ViT-B-32", clip_pretrained=None, lm_config={"model_type": "gpt2", "n_layer": 1,
                                                                               "vocab_size": len(tokenizer)})
    cap = Captioner.from_config(cfg, tokenizer=tokenizer, device="cpu")
    enc = cap.model.image_encoder
    cache = FeatureCache(work / "cache", encoder_key(cfg, enc.preprocess), enc.output_dim)
    paths = sorted(str(p) for p in (work / "data").glob("*.jpg"))
    cache.get(paths, lambda x: torch.randn(len(x), enc.output_dim), lambda im: torch.zeros(1), batch_size=1024,
              desc="prefilling cache")


def bench_extraction(args, work: Path) -> dict:
    from captioner.api import Captioner

    folder = work / "jpegs"
    make_images(folder, args.extract_images, 256, captions=False, seed=1)
    tok = train_tokenizer(WORDS)
    cfg = ModelConfig(clip_model="ViT-B-32", clip_pretrained=None, lm_config={"model_type": "gpt2", "n_layer": 1,
                                                                               "vocab_size": len(tok)})
    cap = Captioner.from_config(cfg, tokenizer=tok)
    enc = cap.model.image_encoder
    if args.bf16_extract and torch.cuda.is_available():
        enc.to(torch.bfloat16)
    dtype = next(enc.parameters()).dtype
    cache = FeatureCache(work / "xcache", encoder_key(cfg, enc.preprocess), enc.output_dim)
    paths = sorted(str(p) for p in folder.glob("*.jpg"))
    t0 = time.perf_counter()
    cache.get(paths, lambda x: enc(x.to(dtype)), enc.preprocess, batch_size=args.extract_batch,
              num_workers=args.workers, device=cap.device, desc="extracting")
    dt = time.perf_counter() - t0
    return {"images": len(paths), "images_per_s": len(paths) / dt, "workers": args.workers, "dtype": str(dtype)}


def main(argv=None) -> int:
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lm-size", choices=list(LM_SIZES), default="124M" if gpu else "tiny")
    p.add_argument("--batch-size", type=int, default=256 if gpu else 32)
    p.add_argument("--steps", type=int, default=40 if gpu else 12, help="optimiser steps per precision")
    p.add_argument("--warmup", type=int, default=10 if gpu else 3, help="steps not timed")
    p.add_argument("--precisions", default="no,bf16" if gpu else "no",
                   help="comma list of no/bf16/fp16 (CPUs without bf16 units run bf16 far slower)")
    p.add_argument("--extract-images", type=int, default=4096 if gpu else 64)
    p.add_argument("--extract-batch", type=int, default=256 if gpu else 32)
    p.add_argument("--workers", type=int, default=16 if gpu else 2)
    p.add_argument("--bf16-extract", action="store_true", default=gpu, help="encode in bf16 on GPU")
    p.add_argument("--skip-extraction", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        n_images = args.batch_size * (args.steps + 2)
        make_images(work / "data", n_images, 8, captions=True)
        tok = train_tokenizer(WORDS, vocab_size=400)
        prefill_cache(work, tok)
        rows = [bench_training(args, work, prec, tok) for prec in args.precisions.split(",")]
        extraction = None if args.skip_extraction else bench_extraction(args, work)

    device = torch.cuda.get_device_name(0) if gpu else f"CPU ({platform.processor() or platform.machine()}, " \
                                                        f"{torch.get_num_threads()} threads)"
    print(f"\ntraining throughput: MLP mapper + fine-tuned GPT-2 {args.lm_size}, prefix 10, 16-word captions, "
          f"batch {args.batch_size}, cached features, device {device}")
    print(f"{'precision':<10}{'captions/s':>14}{'steps timed':>14}{'peak GPU GiB':>14}")
    for r in rows:
        peak = f"{r['peak_gpu_gib']:.2f}" if r["peak_gpu_gib"] is not None else "-"
        print(f"{r['precision']:<10}{r['captions_per_s']:>14.1f}{r['steps_timed']:>14}{peak:>14}")
    if extraction:
        print(f"\nfeature extraction: ViT-B-32 (random weights), {extraction['images']} JPEGs 256x256, "
              f"{extraction['workers']} workers, {extraction['dtype']}: {extraction['images_per_s']:.1f} images/s")
    import transformers

    print(json.dumps({"bench": "train", "device": device, "torch": torch.__version__,
                      "transformers": transformers.__version__, "lm_size": args.lm_size,
                      "batch_size": args.batch_size, "training": rows, "extraction": extraction}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
