"""Speed benchmark: our decoding vs ClipCap's way vs plain transformers generate, end to end, training.

Builds ViT-B-32 + GPT-2 124M from configs with random weights (speed does not depend on weight
values) and measures in one run:
  - decode throughput (images/s) for greedy and beam 5 with exactly 20 new tokens (EOS suppressed, so
    every system does equal work) at several batch sizes and precisions, through
      ours: Captioner.caption_features (the code `captioner caption` runs: prefix, batched KV-cached
            search, detokenisation),
      compiled: the same with `--compile` (static KV cache + torch.compile; CUDA graphs on GPU), GPU default,
      hf:   transformers generate(inputs_embeds=...) on the same prefixes,
      ref:  eval/reference_decoder.py, the way ClipCap decodes (one image at a time, no KV cache);
  - decode throughput on realistic caption lengths: every system decodes the same prefixes with the same
    scripted lengths (EOS forbidden before a row's length and forced there: `force_lengths`, applied to
    ours as a stepper wrapper, to transformers as a LogitsProcessor, to the reference inside its loop), up to
    --max-new-tokens 30. The lengths are drawn (seed 0) from LENGTHS, a table shaped like COCO captions in
    GPT-2 tokens (about 10.5 words, 11-12 tokens with the period, plus EOS; long tail; written for this
    benchmark, not counted from COCO: no data offline). Ours drops finished rows from the batch; transformers
    generate stops a row at EOS but keeps computing it until the batch ends; the reference decodes one image
    at a time and stops at its stop token. Captions of ours and hf are compared (identical share printed);
  - end-to-end `captioner caption` over a folder of generated JPEGs (decode, resize, encode, caption,
    write JSONL), images/s, with where the time went in that same run (timers wrapped around the phases'
    functions for this run only: model loading, waiting on the loader's file decode + resize, CLIP encode,
    decode, writing, the rest);
  - further rows from SECTIONS (training captions/s via eval/bench_train.py; other scripts add theirs).
Prints a table and one JSON line. `captioner bench` runs this file from a source checkout.

    python eval/bench.py                  # CPU: batch 1 and 32, fp32 (a few minutes on 2 cores)
    python eval/bench.py --batch-sizes 1,32,256 --precisions fp32,bf16     # GPU defaults
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import reference_decoder  # noqa: E402

from captioner.api import Captioner  # noqa: E402
from captioner.config import DecodeConfig, ModelConfig  # noqa: E402
from captioner.decoding.search import ForcedLengths, force_lengths  # noqa: E402
from captioner.model.tokens import decode_ids  # noqa: E402

VOCAB = 50257  # GPT-2's: the LM head's cost depends on it
STEPS = 20
# Caption length in GPT-2 tokens, EOS included -> relative frequency: shaped like COCO's captions (mode 12,
# mean 13.1, 4% at 21 or more; 30 = cut at the token limit). Drawn per image with a seeded generator.
LENGTHS = {7: 1, 8: 3, 9: 7, 10: 11, 11: 15, 12: 16, 13: 13, 14: 10, 15: 7, 16: 5, 17: 3.5, 18: 2.5, 19: 1.8,
           20: 1.3, 21: 1.0, 22: 0.8, 23: 0.6, 24: 0.5, 25: 0.4, 26: 0.3, 27: 0.25, 28: 0.2, 29: 0.15, 30: 0.3}
MAX_NEW = 30


def draw_lengths(n: int, seed: int = 0) -> torch.Tensor:
    """(n,) caption lengths drawn from LENGTHS."""
    g = torch.Generator().manual_seed(seed)
    index = torch.multinomial(torch.tensor(list(LENGTHS.values())), n, replacement=True, generator=g)
    return torch.tensor(list(LENGTHS))[index]


def synthetic_tokenizer(vocab_size: int = VOCAB):
    """A word-level tokenizer with GPT-2's vocabulary size (ids -> 'w123'); offline, no training."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w1"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="w0", unk_token="w1")


def build(device: str, precision: str) -> Captioner:
    cfg = ModelConfig(clip_model="ViT-B-32", clip_pretrained=None, finetune_lm=True, mapper="mlp", prefix_length=10,
                      lm_config={"model_type": "gpt2", "vocab_size": VOCAB})  # GPT2Config defaults = 124M
    torch.manual_seed(0)
    return Captioner.from_config(cfg, tokenizer=synthetic_tokenizer(), device=device,
                                 dtype="bfloat16" if precision == "bf16" else None)  # the users' --dtype path


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


@torch.no_grad()
def hf_generate(cap: Captioner, embeds: torch.Tensor, eos: int, **kwargs) -> torch.Tensor:
    """transformers generate(inputs_embeds=...) on our prefixes: the "hf" system of every table."""
    mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    return cap.model.lm.generate(inputs_embeds=embeds, attention_mask=mask, do_sample=False, eos_token_id=eos,
                                 pad_token_id=eos, **kwargs)


def bench_decode(cap: Captioner, *, strategy: str, batch: int, system: str, device: str, ref_images: int) -> dict:
    eos = cap.tokenizer.eos_token_id
    dim = cap.model.image_encoder.output_dim
    dtype = next(cap.model.mappers["image"].parameters()).dtype
    feats = torch.randn(max(batch, ref_images), dim, device=device, dtype=dtype)[:batch if system != "ref" else None]
    beams = 5 if strategy == "beam" else 1
    if system in ("ours", "compiled"):
        cfg = DecodeConfig(strategy=strategy, num_beams=beams, max_new_tokens=STEPS, min_new_tokens=STEPS,
                           compile=system == "compiled")  # the users' --compile: static KV cache, CUDA graphs

        def run():
            out = cap.caption_features(feats, cfg)
            assert all(len(c[0].split()) == STEPS for c in out), "forced length not respected"
        n = batch
    elif system == "hf":
        with torch.no_grad():
            embeds, _ = cap.model.prefix_embeds(feats)

        def run():
            out = hf_generate(cap, embeds, eos, max_new_tokens=STEPS, min_new_tokens=STEPS, num_beams=beams)
            assert out.shape[1] == STEPS
        n = batch
    else:  # the reference: one image at a time
        n = ref_images
        with torch.no_grad():
            embeds, _ = cap.model.prefix_embeds(feats[:n])
        decode = reference_decoder.beam if strategy == "beam" else reference_decoder.greedy

        def run():
            for i in range(n):
                assert len(decode(cap.model.lm, embeds[i:i + 1], steps=STEPS, stop_id=eos, force=True)) == STEPS
    if device.startswith("cuda"):  # what this configuration needs: the weights + its most on top of them
        torch.cuda.synchronize()  # (caches other configurations left behind are not counted; its own are)
        resident = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    run() if system != "ref" else None  # warm-up (kernels, allocator, compilation); the reference is too slow
    seconds = timed(run, device)
    peak = None
    if device.startswith("cuda"):
        weights = sum(p.numel() * p.element_size() for p in cap.model.parameters())
        peak = (torch.cuda.max_memory_allocated() - resident + weights) / 2**30
    return {"system": system, "strategy": strategy, "batch": batch, "images": n, "seconds": seconds,
            "images_per_s": n / seconds, "peak_gpu_gib": peak}


class _Counter(list):
    """A rows_seen list that only adds up the rows (ForcedLengths appends one count per LM call)."""

    def __init__(self, totals: dict, key: str):
        super().__init__()
        self.totals, self.key = totals, key

    def append(self, rows: int) -> None:
        self.totals[self.key] += rows


def bench_realistic(cap: Captioner, *, strategy: str, batch: int, device: str, ref_images: int, repeats: int = 1
                    ) -> list[dict]:
    """ours / hf / ref on one batch whose captions end at lengths drawn from LENGTHS; same prefixes, same
    lengths. Returns a row per system (medians over `repeats` rounds, the systems in turn within a round);
    ours' and hf's captions are compared."""
    from transformers import LogitsProcessor, LogitsProcessorList

    eos = cap.tokenizer.eos_token_id
    dim = cap.model.image_encoder.output_dim
    dtype = next(cap.model.mappers["image"].parameters()).dtype
    feats = torch.randn(batch, dim, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    ends = draw_lengths(batch)
    beams = 5 if strategy == "beam" else 1
    cfg = DecodeConfig(strategy=strategy, num_beams=beams, max_new_tokens=MAX_NEW)
    captions, lm_rows = {}, {"ours": 0, "hf": 0}  # rows the LM computed over all steps (the work done)

    def ours():
        plain = cap._stepper  # the users' path (caption_features), its stepper scripted: the bench's instance only

        def scripted(decode):
            stepper = ForcedLengths(plain(decode), ends, eos_id=eos)
            stepper.rows_seen = _Counter(lm_rows, "ours")
            return stepper
        cap._stepper = scripted
        try:
            captions["ours"] = [c[0] for c in cap.caption_features(feats, cfg)]
        finally:
            del cap._stepper

    class Scripted(LogitsProcessor):  # transformers' beam search hands processors log-softmaxed scores
        def __call__(self, input_ids, scores):  # (B * beams, V); input_ids: the tokens generated so far
            lm_rows["hf"] += scores.shape[0]
            rows = ends.to(scores.device).repeat_interleave(scores.shape[0] // batch)
            return force_lengths(scores, rows, input_ids.shape[1], eos_id=eos).log_softmax(-1)

    with torch.no_grad():
        embeds, _ = cap.model.prefix_embeds(feats)

    def hf():
        out = hf_generate(cap, embeds, eos, max_new_tokens=MAX_NEW, num_beams=beams,
                          logits_processor=LogitsProcessorList([Scripted()]))
        captions["hf"] = [decode_ids(cap.tokenizer, row.tolist(), cap.config.stop_tokens) for row in out]

    decode = reference_decoder.beam if strategy == "beam" else reference_decoder.greedy

    def ref():
        captions["ref"] = [decode(cap.model.lm, embeds[i:i + 1], steps=MAX_NEW, stop_id=eos, length=int(ends[i]))
                           for i in range(ref_images)]

    def warm():  # one-time costs (packing the LM head, first allocations) kept out of every timing
        cap.caption_features(feats[:2], DecodeConfig(strategy=strategy, num_beams=beams, max_new_tokens=2))
        with torch.no_grad():
            cap.model.lm.generate(inputs_embeds=embeds[:2], attention_mask=torch.ones(
                embeds[:2].shape[:2], dtype=torch.long, device=device), max_new_tokens=2, num_beams=beams,
                do_sample=False, eos_token_id=eos, pad_token_id=eos)

    warm()
    runs: dict[str, list] = {}
    for _ in range(repeats):
        for system, fn, n in (("ours", ours, batch), ("hf", hf, batch), ("ref", ref, ref_images)):
            if n == 0 or (system == "ref" and system in runs):
                continue  # the slow reference is timed once
            lm_rows.update(ours=0, hf=0)
            if system != "ref" and device.startswith("cuda"):
                fn()  # full warm-up (kernels, allocator); on CPU warm() above, then one long run as it comes
            cpu = time.process_time()
            seconds = timed(fn, device)
            runs.setdefault(system, []).append((seconds, time.process_time() - cpu, lm_rows.get(system), n))
    rows = []
    for system, timings in runs.items():
        seconds, cpu, work, n = (statistics.median(x) for x in zip(*timings))
        rows.append({"system": system, "strategy": strategy, "batch": batch, "images": n, "seconds": seconds,
                     "images_per_s": n / seconds, "cpu_seconds": cpu, "lm_rows": work, "rounds": len(timings)})
    words = [len(c.split()) for c in captions["ours"]]
    assert words == [int(e) - 1 for e in ends], "scripted lengths not respected"  # one word per token here
    assert [len(c) for c in captions.get("ref", [])] == [int(e) for e in ends[:ref_images]]
    same = sum(a == b for a, b in zip(captions["ours"], captions["hf"])) / batch
    for r in rows:
        r.update(mean_length=float(ends.float().mean()), max_length=int(ends.max()), same_as_hf=same)
    return rows


PHASES = ("model loading", "file decode + resize", "CLIP encode", "decode", "writing")


@contextlib.contextmanager
def phase_timers(device: str):
    """Seconds of a `captioner caption` run spent in each of PHASES, by wrapping the functions doing them for
    this run only (the library's normal path has no timing code). With loader workers, file decode + resize
    is the time the main process waited for a batch (the workers' decoding overlaps the other phases)."""
    import captioner.api as api
    from captioner.shards import outputs

    spent = dict.fromkeys(PHASES, 0.0)

    def timing(phase, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sync(device)
                spent[phase] += time.perf_counter() - t0
        return wrapper

    load = api.load_batches

    def batches(*args, **kwargs):
        it = load(*args, **kwargs)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            finally:
                spent["file decode + resize"] += time.perf_counter() - t0
            yield batch

    C, W = api.Captioner, outputs.ResultWriter
    patches = [(C, "from_pretrained", classmethod(timing("model loading", C.from_pretrained.__func__))),
               (api, "load_batches", batches), (C, "_encode_tensors", timing("CLIP encode", C._encode_tensors)),
               (C, "caption_features", timing("decode", C.caption_features)),
               *((W, m, timing("writing", getattr(W, m))) for m in ("add", "flush", "close"))]
    saved = [(obj, name, vars(obj)[name]) for obj, name, _ in patches]
    for obj, name, new in patches:
        setattr(obj, name, new)
    try:
        yield spent
    finally:
        for obj, name, old in saved:
            setattr(obj, name, old)


def bench_folder(cap: Captioner, work: Path, *, images: int, batch: int, device: str, precision: str,
                 workers: int, compile: bool) -> dict:
    from PIL import Image

    from captioner.cli import main as cli

    folder = work / "jpegs"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(images):
        Image.fromarray((torch.rand(256, 256, 3, generator=g) * 255).byte().numpy()).save(folder / f"{i:06d}.jpg")
    cap.save_pretrained(work / "model")
    argv = ["caption", str(folder), "--model", str(work / "model"), "-o", str(work / "out.jsonl"), "--overwrite",
            "--batch-size", str(batch), "--strategy", "beam", "--num-beams", "5", "--max-new-tokens", str(STEPS),
            "--min-new-tokens", str(STEPS), "--device", device, "--num-workers", str(workers),
            "--dtype", "bfloat16" if precision == "bf16" else "float32", *(["--compile"] if compile else [])]
    with phase_timers(device) as split:
        seconds = timed(lambda: cli(argv), device)  # model loading included
    split["other"] = seconds - sum(split.values())  # listing files, detokenising is in decode, ...
    rows = sum(1 for _ in open(work / "out.jsonl"))
    return {"images": rows, "seconds": seconds, "images_per_s": rows / seconds, "batch": batch,
            "precision": precision, "workers": workers, "compile": compile, "split_s": split}


def training_section(args, device) -> tuple[list[str], list | None]:
    """Training captions/s via eval/bench_train.py: ours against the ClipCap-style step (full-sequence logits,
    padding to the longest caption, unfused fp32 AdamW) on the same data and model, in the same run."""
    if args.skip_train:
        return [], None
    import bench_train

    gpu = device.startswith("cuda")
    rows = bench_train.training_rows(lm_size="124M", batch_size=args.train_batch, steps=30 if gpu else 8,
                                     warmup=10 if gpu else 2, precisions="no,bf16" if gpu else "no")
    lines = [f"training: MLP mapper + fine-tuned GPT-2 124M, cached features, COCO-like lengths, batch "
             f"{args.train_batch}:"]
    for r in rows:
        ratio = f", {r['vs_clipcap']:.2f}x the ClipCap-style step" if "vs_clipcap" in r else ""
        lines.append(f"  {r.get('system', 'ours')} {r.get('precision', '')}: {r['captions_per_s']:.1f} captions/s{ratio}")
    return lines, rows


def int8_section(args, device) -> tuple[list[str], list | None]:
    """int8 against float32 on CPU via eval/bench_int8.py: agreement on the demo model's test split (a demo
    is trained first unless --int8-demo names one) and decode speed on GPT-2 124M, in the same run."""
    if args.skip_int8 or device != "cpu":
        return [], None
    import bench_int8

    measured = bench_int8.rows(demo=args.int8_demo, batch=args.realistic_batch, repeats=args.repeats)
    a = measured[0]
    lines = [f"int8 (--quantize int8) vs fp32: demo test split ({a['images']} images, beam 3): identical captions "
             f"{100 * a['identical']:.1f}%, CIDEr fp32 {a['cider_fp32']:.4f}, int8 {a['cider_int8']:.4f} "
             f"({a['cider_diff_pct']:+.2f}%)"]
    lines += [f"  {r['strategy']} batch {r['batch']}, {r['steps']} tokens: fp32 {r['fp32_images_per_s']:.2f}, int8 "
              f"{r['int8_images_per_s']:.2f} images/s, {r['ratio']:.2f}x" for r in measured[1:]]
    return lines, measured


# Rows measured after the decoding tables, in order: (JSON key, function (args, device) -> (lines to print,
# JSON value)). Other benchmark scripts add theirs here (e.g. eval/bench_int8.py); a function returns
# ([], None) when its row is skipped.
SECTIONS: list[tuple[str, Callable[[argparse.Namespace, str], tuple[list[str], Any]]]] = [
    ("training", training_section),
    ("int8", int8_section),
]


def main(argv=None, *, prog: str | None = None) -> int:
    """The benchmark with command-line arguments `argv` (default: sys.argv[1:]); `captioner bench` calls it."""
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", default="1,32,256" if gpu else "1,32")
    p.add_argument("--precisions", default="fp32,bf16" if gpu else "fp32")
    p.add_argument("--ref-images", type=int, default=32 if gpu else 2,
                   help="images decoded by the (slow) reference per configuration")
    p.add_argument("--hf-max-batch", type=int, default=256 if gpu else 32, help="largest batch run through HF")
    p.add_argument("--folder-images", type=int, default=4096 if gpu else 32)
    p.add_argument("--skip-folder", action="store_true")
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1),
                   help="JPEG decoding workers of the end-to-end folder run")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-int8", action="store_true", help="skip the int8 rows (CPU only)")
    p.add_argument("--int8-demo", help="a `captioner demo` output folder for the int8 agreement row "
                   "(default: train one, about a minute)")
    p.add_argument("--realistic-batch", type=int, default=32,
                   help="batch of the realistic-length rows (0 skips them)")
    p.add_argument("--realistic-strategies", default="greedy,beam", help="of the realistic-length rows (beam: 5)")
    p.add_argument("--skip-decode", action="store_true", help="skip the fixed-length decoding table (the other rows still run)")
    p.add_argument("--repeats", type=int, default=1,
                   help="measure every decoding configuration this many times, in turn; the table shows medians")
    p.add_argument("--train-batch", type=int, default=256 if gpu else 8, help="captions per training step")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=gpu,
                   help="also measure --compile decoding (static KV cache + torch.compile, CUDA graphs on GPU; "
                        "default on GPU only: on CPU it compiles for minutes and gains nothing)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    device = "cuda" if gpu else "cpu"
    rows, folder, realistic = [], None, []
    for precision in args.precisions.split(","):
        cap = build(device, precision)
        # Repeats go round every configuration in turn, so a drift in the machine's speed hits every
        # system alike; the table shows medians.
        repeats = 0 if args.skip_decode else args.repeats
        for repeat, strategy in itertools.product(range(repeats), ("greedy", "beam")):
            for batch in map(int, args.batch_sizes.split(",")):
                for system in ("ours", "compiled", "hf", "ref") if args.compile else ("ours", "hf", "ref"):
                    if system == "hf" and batch > args.hf_max_batch:
                        continue
                    if system == "ref" and batch != int(args.batch_sizes.split(",")[0]):
                        continue  # one image at a time: its speed does not depend on the batch size
                    r = bench_decode(cap, strategy=strategy, batch=batch, system=system, device=device,
                                     ref_images=args.ref_images)
                    rows.append({**r, "precision": precision, "repeat": repeat})
                    print(f"  {precision} {strategy} batch {batch} {system}: {r['images_per_s']:.2f} images/s",
                          file=sys.stderr)
        if precision == args.precisions.split(",")[-1] and args.realistic_batch:  # the fastest precision
            for strategy in args.realistic_strategies.split(","):
                for r in bench_realistic(cap, strategy=strategy, batch=args.realistic_batch, device=device,
                                         ref_images=args.ref_images, repeats=args.repeats):
                    realistic.append({**r, "precision": precision})
                    print(f"  realistic {precision} {strategy} batch {r['batch']} {r['system']}: "
                          f"{r['images_per_s']:.2f} images/s", file=sys.stderr)
        if precision == args.precisions.split(",")[-1] and not args.skip_folder:
            with tempfile.TemporaryDirectory() as tmp:
                folder = bench_folder(cap, Path(tmp), images=args.folder_images,
                                      batch=max(map(int, args.batch_sizes.split(","))), device=device,
                                      precision=precision, workers=args.workers, compile=args.compile)
        del cap
    sections = {name: section(args, device) for name, section in SECTIONS}  # name -> (lines, JSON value)
    import transformers

    dev_name = torch.cuda.get_device_name(0) if gpu else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    print(f"\ndevice {dev_name}; ViT-B-32 + GPT-2 124M (random weights), prefix 10")
    if rows:
        print(f"\ndecode throughput, exactly {STEPS} new tokens")
        print(f"{'precision':<10}{'strategy':<9}{'batch':>6}{'ours img/s':>12}{'compiled':>10}{'hf img/s':>11}"
              f"{'ref img/s':>11}{'best/ref':>10}{'best/hf':>9}{'peak GiB':>10}")
    speed, peaks = {}, {}  # (precision, strategy, batch, system) -> median images/s, largest peak GiB
    for r in rows:
        key = (r["precision"], r["strategy"], r["batch"] if r["system"] != "ref" else None, r["system"])
        speed.setdefault(key, []).append(r["images_per_s"])
        peaks[key] = max(peaks.get(key) or 0.0, r["peak_gpu_gib"]) if r["peak_gpu_gib"] is not None else None
    speed = {k: statistics.median(v) for k, v in speed.items()}
    for (precision, strategy, batch, system), ips in speed.items():
        if system != "ours":
            continue
        hf, comp = speed.get((precision, strategy, batch, "hf")), speed.get((precision, strategy, batch, "compiled"))
        rf = speed.get((precision, strategy, None, "ref"))  # one image at a time: one number for every batch
        best = "compiled" if comp and comp > ips else "ours"  # ratios of our faster path
        top = speed[(precision, strategy, batch, best)]
        peak = peaks[(precision, strategy, batch, best)]
        cells = [f"{ips:.2f}", f"{comp:.2f}" if comp else "-", f"{hf:.2f}" if hf else "-", f"{rf:.3f}" if rf else "-",
                 f"{top / rf:.1f}x" if rf else "-", f"{top / hf:.2f}x" if hf else "-",
                 f"{peak:.2f}" if peak is not None else "-"]
        print(f"{precision:<10}{strategy:<9}{batch:>6}" + "".join(f"{c:>{w}}" for c, w in
                                                             zip(cells, (12, 10, 11, 11, 10, 9, 10))))
    if realistic:
        r0 = realistic[0]
        print(f"\nrealistic lengths: {r0['images']} captions of {r0['mean_length']:.1f} tokens on average (max "
              f"{r0['max_length']}; table LENGTHS, EOS scripted), max_new_tokens {MAX_NEW}, {r0['precision']}")
        print(f"{'strategy':<9}{'batch':>6}{'ours img/s':>12}{'hf img/s':>10}{'ref img/s':>11}{'ours/hf':>9}"
              f"{'CPU s ours/hf':>15}{'LM rows ours/hf':>17}{'ours/ref':>10}{'same as hf':>12}")
        for strategy in dict.fromkeys(r["strategy"] for r in realistic):
            by = {r["system"]: r for r in realistic if r["strategy"] == strategy}
            o, h = by["ours"], by["hf"]
            f = by["ref"]["images_per_s"] if "ref" in by else None
            cells = [f"{o['images_per_s']:.2f}", f"{h['images_per_s']:.2f}", f"{f:.3f}" if f else "-",
                     f"{o['images_per_s'] / h['images_per_s']:.2f}x", f"{o['cpu_seconds']:.0f}/{h['cpu_seconds']:.0f}",
                     f"{o['lm_rows']}/{h['lm_rows']}", f"{o['images_per_s'] / f:.1f}x" if f else "-",
                     f"{o['same_as_hf']:.0%}"]
            print(f"{strategy + (' 5' if strategy == 'beam' else ''):<9}{o['batch']:>6}"
                  + "".join(f"{c:>{w}}" for c, w in zip(cells, (12, 10, 11, 9, 15, 17, 10, 12))))
    if folder:
        print(f"\nend to end: captioner caption over {folder['images']} JPEGs (256x256, beam 5, {STEPS} tokens, "
              f"batch {folder['batch']}, {folder['precision']}, {folder['workers']} decoding workers"
              f"{', --compile' if folder['compile'] else ''}, model loading included): "
              f"{folder['images_per_s']:.2f} images/s")
        print("  where the time went: " + ", ".join(f"{k} {v:.1f} s ({v / folder['seconds']:.0%})"
                                                   for k, v in folder["split_s"].items()))
    for lines, _ in sections.values():
        for line in lines:
            print(line)
    print(json.dumps({"bench": "decode", "device": dev_name, "torch": torch.__version__,
                      "transformers": transformers.__version__, "steps": STEPS, "decode": rows,
                      "realistic": realistic, "folder": folder, **{k: v for k, (_, v) in sections.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
