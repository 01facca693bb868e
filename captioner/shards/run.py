"""Sharded, distributed, resumable captioning of large collections.

Inputs are split into shards (sources.py: WebDataset tars, parquet/CSV files, groups of loose files).
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

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm.auto import tqdm

from captioner.config import DecodeConfig
from captioner.errors import FileSystemError
from captioner.files import atomic_write
from captioner.inputs.image import MAX_PIXELS, ImageError
from captioner.inputs.jpeg import prepare_image
from captioner.shards.merge import make_plan, merge, prepare_shard, write_plan
from captioner.shards.outputs import ErrorLog, ResultWriter, iter_json_rows

logger = logging.getLogger(__name__)


def dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as set by torchrun / accelerate launch; (0, 1, 0) otherwise."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


class _Decoded(IterableDataset):
    """Items of one shard, decoded and preprocessed in DataLoader workers (each worker a slice); with
    `jpegs`, plain JPEGs are left encoded (`JpegBytes`) for the device to decode."""

    def __init__(self, shard, preprocess, skip: set[str], max_pixels: int | None, jpegs: bool = False):
        self.shard, self.preprocess, self.skip, self.max_pixels = shard, preprocess, skip, max_pixels
        self.jpegs = jpegs

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        for i, item in enumerate(self.shard):
            if i % nw != wid or item.key in self.skip:
                continue
            if item.error:
                yield item.key, item.source, None, item.error
                continue
            try:
                source = item.path if item.path else item.data
                name = os.fsdecode(item.path) if item.path else item.source
                yield item.key, item.source, prepare_image(source, name=name, preprocess=self.preprocess,
                                                           max_pixels=self.max_pixels, jpegs=self.jpegs), None
            except ImageError as e:
                yield item.key, item.source, None, str(e)


def _decode_on_device(batch: list, pipeline) -> list:
    """(key, source, input, error) rows with their JPEGs decoded on the device together; a file that cannot
    be decoded becomes that row's error, as on the PIL path."""
    rows = [j for j, (_, _, _, error) in enumerate(batch) if error is None]
    batch = list(batch)
    for j, image in zip(rows, pipeline.resolve([batch[j][2] for j in rows])):
        key, source, _, _ = batch[j]
        batch[j] = (key, source, None, str(image)) if isinstance(image, ImageError) else (key, source, image, None)
    return batch


def _collate(batch):
    return batch


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
    dataset = _Decoded(shard, captioner.model.image_encoder.preprocess, writer.done, max_pixels,
                       jpegs=pipeline is not None)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate,
                        prefetch_factor=4 if num_workers else None, pin_memory=captioner.device.type == "cuda")
    t0, captioned, failed = time.perf_counter(), 0, 0
    with contextlib.closing(ErrorLog(errors_path, overwrite=True, id_field="key")) as errors, \
            tqdm(desc=desc or shard.name, unit="img") as bar:
        for batch in loader:
            if pipeline is not None:
                batch = _decode_on_device(batch, pipeline)
            good = [(k, s, x) for k, s, x, e in batch if e is None]
            for k, s, _, e in batch:
                if e is not None:
                    errors.add(k, e, source=s)
                    failed += 1
            if good:
                with torch.no_grad():
                    images = torch.stack([x for _, _, x in good]).to(captioner.device, non_blocking=True)
                    captions = captioner.caption_features({"image": captioner.model.encode_images(images)}, decode)
                for (k, s, _), caps in zip(good, captions):
                    writer.add(k, caps, source=s)
                captioned += len(good)
            writer.flush()
            errors.flush()
            bar.update(len(batch))
            bar.set_postfix(img_per_s=f"{(captioned + failed) / (time.perf_counter() - t0):.1f}")
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
