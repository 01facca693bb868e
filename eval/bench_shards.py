"""Sharded captioning throughput: images/s with 1 and N processes over generated WebDataset tar shards.

Runs the real command (`captioner caption SHARDS --output-dir ...`, under torchrun for N > 1) on a
saved captioner with random weights (speed does not depend on weight values): on CPU a tiny
open_clip tower + tiny GPT-2 by default, on GPU `--model-size base` (ViT-B-32 + GPT-2 124M).
Reports per-process images/s (captioning loop) and overall images/s (all images / wall time, process
start included). Prints a table and one JSON line.

    python eval/bench_shards.py                      # CPU: 1 and 2 processes
    python eval/bench_shards.py --procs 1,8 --model-size base --images-per-shard 2000   # one 8-GPU node
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_shards(folder: Path, shards: int, per_shard: int, size: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for s in range(shards):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for i in range(per_shard):
                pixels = (torch.rand(size, size, 3, generator=g) * 255).byte().numpy()
                buf = io.BytesIO()
                Image.fromarray(pixels).save(buf, format="JPEG", quality=85)
                info = tarfile.TarInfo(f"{s:05d}{i:06d}.jpg")
                info.size = buf.tell()
                buf.seek(0)
                tar.addfile(info, buf)


def save_model(path: Path, size: str) -> None:
    from captioner.api import Captioner
    from captioner.config import ModelConfig
    from captioner.demo.tiny import tiny_config, train_tokenizer

    tok = train_tokenizer(["a photo of a cat on a red mat", "two dogs run in a green field"], vocab_size=300)
    if size == "tiny":
        cfg = tiny_config(tok)
    else:
        cfg = ModelConfig(clip_model="ViT-B-32", clip_pretrained=None, finetune_lm=True,
                          lm_config={"model_type": "gpt2", "vocab_size": 50257})
    torch.manual_seed(0)
    Captioner.from_config(cfg, tokenizer=tok, device="cpu").save_pretrained(path)


def run(procs: int, work: Path, args) -> dict:
    out = work / f"out{procs}"
    launch = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port",
               "29561"] if procs > 1 else [sys.executable])
    cmd = [*launch, "-m", "captioner", "caption", str(work / "shards" / f"{{00000..{args.shards - 1:05d}}}.tar"),
           "--model", str(work / "model"), "--output-dir", str(out), "--strategy", args.strategy,
           "--num-beams", "5", "--max-new-tokens", str(args.max_new_tokens), "--batch-size", str(args.batch_size),
           "--num-workers", str(args.workers)]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, args.threads // procs))}
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(p.stderr[-3000:])
    rates = [float(x) for x in re.findall(r"([\d.]+) images/s", p.stderr)]
    rows = json.loads((out / "index.json").read_text())["rows"]
    return {"procs": procs, "images": rows, "wall_s": wall, "overall_images_per_s": rows / wall,
            "per_process_images_per_s": rates, "loop_images_per_s": sum(rates)}


def main(argv=None) -> int:
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--procs", default="1,2", help="comma list of process counts")
    p.add_argument("--model-size", choices=["tiny", "base"], default="base" if gpu else "tiny")
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--images-per-shard", type=int, default=500 if gpu else 48)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=256 if gpu else 16)
    p.add_argument("--workers", type=int, default=4 if gpu else 1)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="CPU threads shared by the processes")
    p.add_argument("--strategy", default="greedy", choices=["greedy", "beam"])
    p.add_argument("--max-new-tokens", type=int, default=20)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_shards(work / "shards", args.shards, args.images_per_shard, args.image_size)
        save_model(work / "model", args.model_size)
        results = [run(int(n), work, args) for n in args.procs.split(",")]
    device = torch.cuda.get_device_name(0) if gpu else f"CPU ({os.cpu_count()} cores)"
    print(f"\nsharded captioning: {args.shards} tar shards x {args.images_per_shard} JPEGs {args.image_size}px, "
          f"model {args.model_size} (random weights), {args.strategy}, {args.max_new_tokens} tokens max, "
          f"batch {args.batch_size}, device {device}")
    print(f"{'processes':<10}{'images':>8}{'wall s':>9}{'overall img/s':>15}{'loop img/s (sum)':>18}  per process")
    for r in results:
        per = ", ".join(f"{x:.1f}" for x in r["per_process_images_per_s"])
        print(f"{r['procs']:<10}{r['images']:>8}{r['wall_s']:>9.1f}{r['overall_images_per_s']:>15.1f}"
              f"{r['loop_images_per_s']:>18.1f}  {per}")
    print(json.dumps({"bench": "shards", "device": device, "torch": torch.__version__, "settings": vars(args),
                      "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
