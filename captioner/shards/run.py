"""Sharded, distributed, resumable captioning of large collections.

Inputs are split into shards (sources.py: WebDataset tars, parquet/CSV files, groups of loose files)
and read by the one input loader (inputs/loader.py); for a captioner that takes sound, a WebDataset
sample's audio member (`KEY.wav`, `.flac`, ...) is its audio input, beside its image or alone.
Process `rank` of `world` (torchrun / accelerate launch set RANK and WORLD_SIZE; nodes share the
output directory) takes shards rank, rank + world, ... For each shard it writes

    OUT/shards/<shard>.jsonl         key, source, caption(s): appended a batch at a time (outputs.py)
    OUT/shards/<shard>.errors.jsonl  key, source, error: items that could not be read
    OUT/shards/<shard>.done          written (atomically) only after the shard's rows are flushed
    OUT/shards/<shard>.plan          the fingerprint of the shard's inputs (merge.py), written first

A rerun skips done shards whose inputs are unchanged, redoes shards whose inputs changed, and
continues an unfinished shard item by item, so a killed or preempted process loses at most one batch
and no key is captioned twice. Every process tries the merge (merge.py) when it finishes; it succeeds
once all shards are done and writes OUT/captions.jsonl and OUT/index.json (running it again gives the
same files). `captioner merge OUT` runs it by hand.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tqdm.auto import tqdm

from captioner.config import DecodeConfig
from captioner.data import AUDIO_EXTENSIONS
from captioner.errors import FileSystemError
from captioner.files import atomic_write
from captioner.inputs.image import MAX_PIXELS
from captioner.inputs.loader import InputStream
from captioner.shards.merge import make_plan, merge, prepare_shard, write_plan
from captioner.shards.outputs import ErrorLog, ResultWriter, iter_json_rows

logger = logging.getLogger(__name__)

AUDIO_SUFFIXES = tuple(e[1:] for e in AUDIO_EXTENSIONS)  # audio members of a tar sample, by preference


def dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as set by torchrun / accelerate launch; (0, 1, 0) otherwise."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


class _ShardRows:
    """A shard's items as loader rows (key, item | None, error | None, names), skipping keys already done.
    An item holds the inputs the model takes: the image (a path or bytes) and, for a WebDataset sample with
    an audio member (e.g. `000123.wav` beside `000123.jpg`), that sound. Picklable, for loader workers."""

    def __init__(self, shard, skip: set[str], modalities: Sequence[str]):
        self.shard, self.skip, self.modalities = shard, skip, list(modalities)

    def __iter__(self):
        for item in self.shard:
            if item.key in self.skip:
                continue
            key = (item.key, item.source)
            if item.error:
                yield key, None, item.error, item.source
                continue
            inputs, names = {}, {"image": item.source}
            if "image" in self.modalities and (item.path or item.data):
                inputs["image"] = item.path if item.path else item.data
            if "audio" in self.modalities:
                suffix = next((s for s in AUDIO_SUFFIXES if s in item.extra), None)
                if suffix is not None:
                    inputs["audio"] = item.extra[suffix]
                    names["audio"] = f"{self.shard.source}:{item.key}.{suffix}"
            if inputs:
                yield key, inputs, None, names
            else:
                yield (key, None, f"no {' or '.join(self.modalities)} member (members: {', '.join(sorted(item.extra))})",
                       item.source)


@dataclass
class ShardResult:
    name: str
    captioned: int
    failed: int
    skipped: int
    seconds: float


def caption_shard(captioner, shard, out_dir: Path, *, decode: DecodeConfig, batch_size: int = 32,
                  num_workers: int = 2, max_pixels: int | None = MAX_PIXELS, desc: str | None = None,
                  jpeg_on_device: bool | None = None) -> ShardResult:
    """Caption one shard into OUT/shards/<name>.jsonl, resuming a partial file; mark it done.
    jpeg_on_device: as in `Captioner.iter_captions` (default: on with CUDA)."""
    shard_dir = out_dir / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    writer = ResultWriter(shard_dir / f"{shard.name}.jsonl", num_captions=decode.num_captions, resume=True,
                          id_field="key")
    errors_path = shard_dir / f"{shard.name}.errors.jsonl"
    skipped = len(writer.done)
    pipeline = captioner.jpeg_pipeline(jpeg_on_device)
    dataset = InputStream(_ShardRows(shard, writer.done, captioner.model.modalities),
                          captioner.input_reader(max_pixels=max_pixels, jpegs=pipeline is not None))
    t0, captioned, failed = time.perf_counter(), 0, 0
    with contextlib.closing(ErrorLog(errors_path, overwrite=True, id_field="key")) as errors, \
            tqdm(desc=desc or shard.name, unit="item") as bar:
        for batch, groups in captioner.feature_batches(dataset, batch_size=batch_size, num_workers=num_workers,
                                                       pipeline=pipeline):
            captions = {}
            for rows, features in groups:
                captions.update(zip(rows, captioner.caption_features(features, decode)))
            for j, ((k, s), _, e) in enumerate(batch):
                if e is not None:
                    errors.add(k, str(e), source=s)
                    failed += 1
                else:
                    writer.add(k, captions[j], source=s)
                    captioned += 1
            writer.flush()
            errors.flush()
            bar.update(len(batch))
            bar.set_postfix(items_per_s=f"{(captioned + failed) / (time.perf_counter() - t0):.1f}")
    writer.close()
    seconds = time.perf_counter() - t0
    result = ShardResult(shard.name, captioned, failed, skipped, seconds)
    atomic_write(shard_dir / f"{shard.name}.done", json.dumps({
        "shard": shard.name, "source": shard.source, "rows": captioned + skipped, "failed": failed,
        "seconds": seconds}) + "\n")
    return result


def _fs(fn, out_dir: Path, *args):
    """fn(out_dir, *args) with an OS error (disk full, permission) as one FileSystemError line."""
    try:
        return fn(out_dir, *args)
    except OSError as e:
        raise FileSystemError(f"{out_dir}: cannot write the shard plan: {e.strerror or e}") from None


def run(captioner, shards: Sequence, out_dir: str | Path, *, decode: DecodeConfig, batch_size: int = 32,
        num_workers: int = 2, rank: int = 0, world: int = 1, write_tars: str | None = None,
        max_pixels: int | None = MAX_PIXELS, jpeg_on_device: bool | None = None) -> list[ShardResult]:
    """Caption this process's shards (rank::world), skipping done ones whose inputs are unchanged and
    redoing those whose inputs changed (merge.py); then try the merge."""
    out_dir = Path(out_dir)
    try:
        (out_dir / "shards").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FileSystemError(f"{out_dir}: cannot create the output folder: {e.strerror or e}") from None
    plan = make_plan(shards)
    if rank == 0:
        _fs(write_plan, out_dir, plan)
    mine = list(zip(shards, plan))[rank::world]
    results, t0 = [], time.perf_counter()
    for shard, entry in mine:
        if _fs(prepare_shard, out_dir, entry):
            logger.info("rank %d: shard %s already done", rank, shard.name)
        else:
            r = caption_shard(captioner, shard, out_dir, decode=decode, batch_size=batch_size,
                              num_workers=num_workers, max_pixels=max_pixels, desc=f"[{rank}/{world}] {shard.name}",
                              jpeg_on_device=jpeg_on_device)
            results.append(r)
            logger.info("rank %d: shard %s done: %d captioned, %d failed, %d resumed, %.1f img/s", rank, shard.name,
                        r.captioned, r.failed, r.skipped, (r.captioned + r.failed) / max(r.seconds, 1e-9))
        if write_tars:
            _write_back(shard, out_dir, write_tars)
    n = sum(r.captioned + r.failed for r in results)
    logger.info("rank %d: %d images in %.1f s (%.1f img/s)", rank, n, time.perf_counter() - t0,
                n / max(time.perf_counter() - t0, 1e-9))
    merge(out_dir, plan)
    return results


def _write_back(shard, out_dir: Path, suffix: str) -> None:
    from captioner.shards.sources import write_tar_with_captions

    target = out_dir / "wds" / f"{shard.name}.tar"
    if target.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    caps = {r["key"]: r.get("captions", r["caption"])
            for _, r in iter_json_rows(out_dir / "shards" / f"{shard.name}.jsonl")}
    write_tar_with_captions(shard, caps, target, suffix=suffix)
