"""Sharded, distributed, resumable captioning of large collections.

Inputs are split into shards (sources.py: WebDataset tars, parquet/CSV files, groups of loose files)
and read by the one input loader (inputs/loader.py); for a captioner that takes sound, a WebDataset
sample's audio member (`KEY.wav`, `.flac`, ...) is its audio input, beside its image or alone.
Process `rank` of `world` (torchrun / accelerate launch set RANK and WORLD_SIZE; nodes share the
output directory) takes shards rank, rank + world, ... For each shard it writes

    OUT/shards/<shard>.jsonl         key, source, caption(s): appended a batch at a time (outputs.py)
    OUT/shards/<shard>.errors.jsonl  key, source, error: items that could not be read
    OUT/shards/<shard>.done          written (atomically) only after the shard's rows are flushed

A rerun skips done shards and continues an unfinished shard item by item, so a killed or preempted
process loses at most one batch and no key is captioned twice. Every process tries the merge when it
finishes; it succeeds once all shards are done and writes OUT/captions.jsonl and OUT/index.json
(atomically; running it again gives the same files). `captioner merge OUT` runs it by hand.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tqdm.auto import tqdm

from captioner.config import DecodeConfig
from captioner.data.sets import AUDIO_EXTENSIONS
from captioner.inputs.image import MAX_PIXELS
from captioner.inputs.loader import InputStream
from captioner.shards.outputs import ResultWriter

logger = logging.getLogger(__name__)

AUDIO_SUFFIXES = tuple(e[1:] for e in AUDIO_EXTENSIONS)  # audio members of a tar sample, by preference


def dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as set by torchrun / accelerate launch; (0, 1, 0) otherwise."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
    with open(errors_path, "w", encoding="utf-8") as errors, tqdm(desc=desc or shard.name, unit="item") as bar:
        for batch, groups in captioner.feature_batches(dataset, batch_size=batch_size, num_workers=num_workers,
                                                       pipeline=pipeline):
            captions = {}
            for rows, features in groups:
                captions.update(zip(rows, captioner.caption_features(features, decode)))
            for j, ((k, s), _, e) in enumerate(batch):
                if e is not None:
                    errors.write(json.dumps({"key": k, "source": s, "error": str(e)}, ensure_ascii=False) + "\n")
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
    _atomic_write_text(shard_dir / f"{shard.name}.done", json.dumps({
        "shard": shard.name, "source": shard.source, "rows": captioned + skipped, "failed": failed,
        "seconds": seconds}) + "\n")
    return result


def run(captioner, shards: Sequence, out_dir: str | Path, *, decode: DecodeConfig, batch_size: int = 32,
        num_workers: int = 2, rank: int = 0, world: int = 1, write_tars: str | None = None,
        max_pixels: int | None = MAX_PIXELS, jpeg_on_device: bool | None = None) -> list[ShardResult]:
    """Caption this process's shards (rank::world), skipping done ones; then try the merge."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [s.name for s in shards]
    if len(set(names)) != len(names):
        raise ValueError("shard names are not unique")
    if rank == 0:
        _atomic_write_text(out_dir / "shards.json", json.dumps(names) + "\n")
    mine = shards[rank::world]
    results, t0 = [], time.perf_counter()
    for shard in mine:
        done = out_dir / "shards" / f"{shard.name}.done"
        if done.exists():
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
    merge(out_dir, names)
    return results


def _write_back(shard, out_dir: Path, suffix: str) -> None:
    from captioner.shards.sources import write_tar_with_captions

    target = out_dir / "wds" / f"{shard.name}.tar"
    if target.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(x) for x in (out_dir / "shards" / f"{shard.name}.jsonl").read_text().splitlines() if x]
    caps = {r["key"]: r.get("captions", r["caption"]) for r in rows}
    write_tar_with_captions(shard, caps, target, suffix=suffix)


def merge(out_dir: str | Path, names: Sequence[str] | None = None) -> bool:
    """If every shard is done, write OUT/captions.jsonl (each (shard, key) once) and OUT/index.json.
    Idempotent; returns False (and changes nothing) while shards are pending."""
    out_dir = Path(out_dir)
    if names is None:
        names = json.loads((out_dir / "shards.json").read_text())
    pending = [n for n in names if not (out_dir / "shards" / f"{n}.done").exists()]
    if pending:
        logger.info("merge: %d of %d shards pending (e.g. %s); rerun the job to finish them", len(pending),
                    len(names), ", ".join(pending[:3]))
        return False
    lines, index, seen = [], {}, set()
    for name in names:
        rows = 0
        for line in (out_dir / "shards" / f"{name}.jsonl").read_text(encoding="utf-8").splitlines():
            if not line:
                continue
            row = json.loads(line)
            if (name, row["key"]) in seen:
                continue
            seen.add((name, row["key"]))
            lines.append(json.dumps({"shard": name, **row}, ensure_ascii=False))
            rows += 1
        done = json.loads((out_dir / "shards" / f"{name}.done").read_text())
        index[name] = {"rows": rows, "failed": done["failed"], "source": done["source"]}
    _atomic_write_text(out_dir / "captions.jsonl", "".join(x + "\n" for x in lines))
    _atomic_write_text(out_dir / "index.json", json.dumps(
        {"shards": index, "rows": len(lines), "failed": sum(v["failed"] for v in index.values())}, indent=1) + "\n")
    logger.info("merged %d shards: %d captions -> %s", len(names), len(lines), out_dir / "captions.jsonl")
    return True
