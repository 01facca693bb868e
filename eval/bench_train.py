"""Training throughput (captions/s): our training loop against a ClipCap-style step, same data, same
model, same run; and feature-extraction images/s.

Training: MLP mapper + fine-tuned GPT-2 (124M config by default, random weights: speed does not depend
on weight values, GPT-2's 50,257-token vocabulary), prefix 10, cached features, captions whose lengths
follow COCO's (see COCO_TOKEN_LENGTHS: mean 12.4 tokens, long tail to 39, + EOS). The features of a
generated image set are put into the feature cache first (random vectors through the cache API), so
`train()` runs exactly as for users with a warm cache; captions/s is measured between two logged
steps after warm-up.
  ours:    `captioner.train.loop.train` (length-bucketed batches padded to their longest caption, logits
           only at caption positions, fused AdamW where the device has it);
  clipcap: the step of rmokady/CLIP_prefix_caption's train.py on the same model and batches size:
           every caption padded to the longest in the data set, logits at every position (prefix
           included) then sliced, the loss over the caption positions, fp32, torch AdamW unfused
           (foreach=False, fused=False), no bucketing, the loss read every step.

Extraction: ViT-B-32 (random weights) encoding a folder of generated JPEGs through the feature cache,
with DataLoader workers.

    python eval/bench_train.py                       # GPU: gpt2 124M, fp32 and bf16
    python eval/bench_train.py --lm-size tiny        # CPU-sized run (the CPU default)
Prints a table and one JSON line. `training_rows(...)` returns the rows (eval/bench.py calls it).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from captioner.config import ModelConfig  # noqa: E402
from captioner.train.features import FeatureCache, encoder_key  # noqa: E402
from captioner.demo.tiny import train_tokenizer  # noqa: E402
from captioner.config import TrainConfig  # noqa: E402
from captioner.train.loop import train  # noqa: E402
from captioner.model.model import IGNORE_INDEX  # noqa: E402

WORDS = ("a man woman dog cat red blue green small large sitting standing on in the of with next to near "
         "table street field water grass car bus train plate food pizza bench tree building").split()
VOCAB = 50257  # GPT-2's: the LM head and the loss over it are ~30% of a step, so train with its full size
# Caption lengths in GPT-2 tokens (EOS not counted), percent of captions: shaped like COCO's training
# captions (about 10.5 words, 12 GPT-2 tokens on average, most 9-15, a long thin tail). Mean 12.4, sd 3.6.
# Every bench word is one token of the bench tokenizer, so a caption of n words is n tokens + EOS. The
# longest caption of every generated set is 39 tokens (+ EOS = max_caption_tokens, 40): a COCO-sized set
# always has captions that long, and the ClipCap-style step pads every batch to it.
COCO_TOKEN_LENGTHS = {7: 1, 8: 4, 9: 9, 10: 15, 11: 18, 12: 16, 13: 12, 14: 8, 15: 5, 16: 3.5, 17: 2.5, 18: 1.5,
                      20: 1.5, 22: 1.2, 25: 0.8, 30: 0.5, 35: 0.3, 39: 0.2}
LM_SIZES = {  # GPT-2 configs: 124M = transformers' GPT2Config defaults
    "124M": dict(n_embd=768, n_layer=12, n_head=12),
    "tiny": dict(n_embd=256, n_layer=4, n_head=4),
}


def bench_tokenizer():
    """A byte-level BPE tokenizer in which every bench word, with or without its leading space, is one token."""
    return train_tokenizer(list(WORDS) + [" " + w for w in WORDS], vocab_size=400)


def caption_lengths(n: int, seed: int = 0) -> list[int]:
    """n caption lengths (tokens) drawn from COCO_TOKEN_LENGTHS, the longest one set to the table's maximum."""
    rng = random.Random(seed)
    lengths = rng.choices(list(COCO_TOKEN_LENGTHS), weights=list(COCO_TOKEN_LENGTHS.values()), k=n)
    lengths[rng.randrange(n)] = max(COCO_TOKEN_LENGTHS)
    return lengths


def make_images(folder: Path, n: int, size: int, *, captions: bool, seed: int = 0) -> None:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, length in enumerate(caption_lengths(n, seed)):
        im = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
        im.save(folder / f"{i:06d}.jpg", quality=90)
        rows.append({"file_name": f"{i:06d}.jpg", "captions": [" ".join(rng.choice(WORDS) for _ in range(length))]})
    if captions:
        (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def bench_config(args, work: Path, precision: str, tokenizer) -> TrainConfig:
    cfg = ModelConfig(clip_model="ViT-B-32", clip_pretrained=None, lm="gpt2", finetune_lm=True, mapper="mlp",
                      prefix_length=10, lm_config={"model_type": "gpt2", "vocab_size": max(len(tokenizer), VOCAB),
                                                   "n_positions": 64, **LM_SIZES[args.lm_size]})
    return TrainConfig(data=str(work / "data"), val_split=None, output_dir=str(work / f"run_{precision}"), epochs=1,
                       max_steps=args.steps, batch_size=args.batch_size, lr=1e-4, warmup_steps=1,
                       mixed_precision=precision, feature_cache=str(work / "cache"), val_images=0, log_every=1,
                       model=cfg)


def bench_training(args, work: Path, precision: str, tokenizer) -> dict:
    """Ours: the real training loop, timed between its logged steps after `args.warmup` of them."""
    tc = bench_config(args, work, precision, tokenizer)
    out = Path(tc.output_dir)
    t0 = time.perf_counter()
    train(tc, tokenizer=tokenizer)
    wall = time.perf_counter() - t0
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    warm = min(args.warmup, len(steps) - 2)
    a, b = steps[warm], steps[-1]
    rate = (b["captions"] - a["captions"]) / (b["time"] - a["time"])
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return {"system": "ours", "precision": precision, "captions_per_s": rate, "steps_timed": len(steps) - 1 - warm,
            "wall_s": wall, "peak_gpu_gib": peak}


def clipcap_loss(model, features: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """ClipCap's training loss on our model: logits at every position (B, P + T, V), prefix included, then
    the caption's slice; ids / mask (B, T) padded to the data set's longest caption."""
    prefix, _ = model.prefix_embeds(features)  # (B, P, D)
    embeds = torch.cat([prefix, model.lm.get_input_embeddings()(ids)], dim=1)  # (B, P + T, D)
    attention = torch.cat([mask.new_ones(prefix.shape[:2]), mask], dim=1)  # (B, P + T)
    logits = model.lm(inputs_embeds=embeds, attention_mask=attention).logits[:, prefix.shape[1] - 1:-1]  # (B, T, V)
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.flatten(), ignore_index=IGNORE_INDEX)


def bench_clipcap(args, work: Path, tokenizer) -> dict:
    """The ClipCap-style step on the same model, features and captions as `bench_training` (fp32): shuffled
    batches, all padded to the longest caption, unfused AdamW, the loss read every step (its progress bar)."""
    from captioner.api import Captioner
    from captioner.data import load_caption_set
    from captioner.model.tokens import pad_id
    from captioner.train.batching import tokenize_pairs
    from captioner.train.loop import encode_examples

    tc = bench_config(args, work, "no", tokenizer)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(tc.seed)
    cap = Captioner.from_config(tc.model, tokenizer=tokenizer, device=device)
    examples = load_caption_set(tc.data, tc.train_split)[0]
    examples, feats = encode_examples(cap, examples, tc, desc="reading cached features")
    rows, ids = tokenize_pairs(tokenizer, examples, max_tokens=tc.max_caption_tokens, prompt=tc.model.prompt)
    width = max(len(x) for x in ids)  # the data set's longest caption
    tokens = torch.full((len(ids), width), pad_id(tokenizer), dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        tokens[i, :len(x)], mask[i, :len(x)] = torch.tensor(x), 1
    features = feats.features["image"][torch.tensor(rows)]  # (N, F)
    model = cap.model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=tc.lr,
                                  weight_decay=tc.weight_decay, foreach=False, fused=False)
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(tc.seed))
    b, marks = args.batch_size, []
    for s in range(args.steps):
        index = order[s * b:(s + 1) * b]
        loss = clipcap_loss(model, features[index].to(device), tokens[index].to(device), mask[index].to(device))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        loss.item()  # waits for the device, as ClipCap's per-step progress bar does
        marks.append(time.perf_counter())
    warm = min(args.warmup, len(marks) - 2)
    timed = len(marks) - 1 - warm
    return {"system": "clipcap", "precision": "no", "captions_per_s": timed * b / (marks[-1] - marks[warm]),
            "steps_timed": timed, "padded_tokens": width,
            "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None}


def padded_tokens(work: Path, tokenizer, args) -> float:
    """Mean padded caption width of our batches in the run (the loop's sampler, epoch 0, seed 0)."""
    from captioner.data import load_caption_set
    from captioner.train.batching import CaptionBatchSampler, tokenize_pairs

    tc = bench_config(args, work, "no", tokenizer)
    _, ids = tokenize_pairs(tokenizer, load_caption_set(tc.data, tc.train_split)[0], max_tokens=tc.max_caption_tokens,
                            prompt=tc.model.prompt)
    sampler = CaptionBatchSampler([len(x) for x in ids], batch_size=tc.batch_size, seed=tc.seed,
                                  bucket=tc.bucket_by_length)
    batches = sampler.global_batches()[:args.steps]
    return sum(len(b) * max(len(ids[i]) for i in b) for b in batches) / sum(len(b) for b in batches)


def training_rows(*, lm_size: str, batch_size: int, steps: int, warmup: int, precisions: str = "no",
                  repeats: int = 1) -> list[dict]:
    """Ours at each precision and the ClipCap-style step (fp32), same generated data and model, in one run;
    with repeats, the systems take turns and each row is the median. Our rows carry `vs_clipcap`."""
    args = argparse.Namespace(lm_size=lm_size, batch_size=batch_size, steps=steps, warmup=warmup)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_images(work / "data", batch_size * steps, 8, captions=True)
        tok = bench_tokenizer()
        prefill_cache(work, tok)
        width = padded_tokens(work, tok, args)
        runs: dict[str, list[dict]] = {}
        for repeat in range(repeats):
            for precision in precisions.split(","):
                shutil.rmtree(work / f"run_{precision}", ignore_errors=True)
                runs.setdefault(precision, []).append(bench_training(args, work, precision, tok))
            runs.setdefault("clipcap", []).append(bench_clipcap(args, work, tok))
    rows = []
    for key, rs in runs.items():
        rate = statistics.median(r["captions_per_s"] for r in rs)
        rows.append({**rs[0], "captions_per_s": rate, "repeats": len(rs), "all_captions_per_s": [r["captions_per_s"]
                                                                                               for r in rs]})
    ref = rows[-1]["captions_per_s"]
    for r in rows[:-1]:
        r["padded_tokens"], r["vs_clipcap"] = width, r["captions_per_s"] / ref
    return rows


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
    p.add_argument("--steps", type=int, default=40 if gpu else 16, help="optimiser steps per system")
    p.add_argument("--warmup", type=int, default=10 if gpu else 2, help="steps not timed")
    p.add_argument("--precisions", default="no,bf16" if gpu else "no",
                   help="comma list of no/bf16/fp16 for ours (CPUs without bf16 units run bf16 far slower); "
                        "the ClipCap-style step runs in fp32")
    p.add_argument("--repeats", type=int, default=1, help="systems take turns this many times; medians shown")
    p.add_argument("--extract-images", type=int, default=4096 if gpu else 64)
    p.add_argument("--extract-batch", type=int, default=256 if gpu else 32)
    p.add_argument("--workers", type=int, default=16 if gpu else 2)
    p.add_argument("--bf16-extract", action="store_true", default=gpu, help="encode in bf16 on GPU")
    p.add_argument("--skip-extraction", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)

    rows = training_rows(lm_size=args.lm_size, batch_size=args.batch_size, steps=args.steps, warmup=args.warmup,
                         precisions=args.precisions, repeats=args.repeats)
    extraction = None
    if not args.skip_extraction:
        with tempfile.TemporaryDirectory() as tmp:
            extraction = bench_extraction(args, Path(tmp))

    device = torch.cuda.get_device_name(0) if gpu else f"CPU ({platform.processor() or platform.machine()}, " \
                                                        f"{torch.get_num_threads()} threads)"
    mean = sum(k * v for k, v in COCO_TOKEN_LENGTHS.items()) / sum(COCO_TOKEN_LENGTHS.values())
    print(f"\ntraining throughput: MLP mapper + fine-tuned GPT-2 {args.lm_size}, prefix 10, COCO-like captions "
          f"(mean {mean:.1f} tokens + EOS, longest {max(COCO_TOKEN_LENGTHS)} + EOS), batch {args.batch_size}, "
          f"cached features, same data and model, device {device}")
    print(f"{'system':<9}{'precision':<10}{'captions/s':>12}{'vs clipcap':>12}{'padded tok':>12}{'steps timed':>13}"
          f"{'peak GPU GiB':>14}")
    for r in rows:
        peak = f"{r['peak_gpu_gib']:.2f}" if r["peak_gpu_gib"] is not None else "-"
        ratio = f"{r['vs_clipcap']:.2f}x" if "vs_clipcap" in r else "-"
        print(f"{r['system']:<9}{r['precision']:<10}{r['captions_per_s']:>12.1f}{ratio:>12}"
              f"{r['padded_tokens']:>12.1f}{r['steps_timed']:>13}{peak:>14}")
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
