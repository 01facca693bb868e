"""Feature cache: each unique image (or sound) is encoded once, batched, and stored memory-mapped.

A cache directory holds one folder per encoder key: a hash of everything that changes the features
(open_clip architecture, pretrained weights, preprocessing; for audio the audio model, its feature
extractor and pooling). A different encoder never reuses stale
features. Inside, extraction runs write append-only shards: `shard-NNNNN.json` (the image keys it
covers), `shard-NNNNN.npy` (features, float32 memmap) and `shard-NNNNN.done` (a byte per row, set
after the row's batch is flushed). An interrupted extraction resumes without recomputing finished
rows. An image's key is its absolute path with size and modification time, so an edited file is
encoded again. Keys are never parsed back into paths: a run resumes only the unfinished rows of the files
it is asked for, so any file name works and entries of files that are gone, edited or unreadable are
simply left unused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from captioner.errors import InputError
from captioner.files import atomic_write
from captioner.inputs.image import open_error_reason
from captioner.inputs.loader import InputDataset, InputReader, load_batches, stack_inputs

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1


def encoder_key(config, preprocess) -> str:
    """Hash of what determines the features: encoder identity and preprocessing."""
    from captioner.model.encoders import resolve_clip_config

    desc = {"format": CACHE_FORMAT, "clip_model": config.clip_model, "clip_pretrained": config.clip_pretrained,
            "clip_config": resolve_clip_config(config), "preprocess": repr(preprocess)}
    return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:20]


def image_key(path: str) -> str:
    st = os.stat(path)
    return f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}"


def audio_encoder_key(config, preprocess) -> str:
    """Hash of what determines audio features: audio model identity, pooling and feature extraction."""
    desc = {"format": CACHE_FORMAT, "modality": "audio", "audio_encoder": config.audio_encoder,
            "audio_model": config.audio_model, "audio_config": config.audio_config,
            "whisper_pool": config.whisper_pool, "preprocess": repr(preprocess)}
    return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:20]


class FeatureCache:
    """Features of one encoder under `root/<encoder key>/`."""

    def __init__(self, root: str | Path, key: str, dim: int):
        self.dir = Path(root) / key
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dim = dim
        meta = self.dir / "meta.json"
        if meta.exists():
            stored = json.loads(meta.read_text())
            if stored.get("dim") != dim:
                raise ValueError(f"{meta}: feature dim {stored.get('dim')} != encoder dim {dim}")
        else:
            meta.write_text(json.dumps({"format": CACHE_FORMAT, "dim": dim}) + "\n")

    def _shards(self):
        for spec in sorted(self.dir.glob("shard-*.json")):
            keys = json.loads(spec.read_text())
            stem = spec.with_suffix("")
            feats = np.load(f"{stem}.npy", mmap_mode="r")
            done = np.fromfile(f"{stem}.done", dtype=np.uint8)
            yield stem, keys, feats, done

    def index(self) -> dict[str, tuple[np.ndarray, int]]:
        """image key -> (shard features memmap, row) for every finished row."""
        out = {}
        for _, keys, feats, done in self._shards():
            for row, key in enumerate(keys):
                if done[row]:
                    out[key] = (feats, row)
        return out

    def get(self, paths: Sequence[str], encode: Callable, preprocess: Callable | None, *, load: Callable | None = None,
            batch_size: int = 64, num_workers: int = 0, device: torch.device | str = "cpu",
            desc: str = "encoding images", errors: dict[str, str] | None = None) -> torch.Tensor:
        """Features (N, dim) for `paths` (duplicates allowed), encoding only what the cache lacks.

        Files are read by the one input loader (inputs/loader.py): images through `preprocess` (the image
        encoder's transform), sounds through `load` (the audio encoder's picklable `loader()`) when given.
        An unreadable file raises its InputError, or, with `errors`, is recorded there (path -> message)
        and its rows are zeros. Only the rows this call needs are resumed from an interrupted run: rows
        of files that are gone, changed or unreadable stay behind, unused, and never block a later run."""
        wanted: dict[str, str] = {}  # key -> path, unique, in order
        keys = []
        for p in paths:
            try:
                key = image_key(p)
            except OSError as e:
                key = None
                self._failed(InputError(f"{os.fsdecode(p)}: {open_error_reason(p, e)}"), p, errors)
            keys.append(key)
            if key is not None:
                wanted.setdefault(key, p)
        index = self.index()
        todo = {k: p for k, p in wanted.items() if k not in index}
        args = (encode, _reader(preprocess, load), batch_size, num_workers, device, desc, errors)
        for stem, shard_keys, _, done in self._shards():
            rows = [r for r, k in enumerate(shard_keys) if not done[r] and k in todo]
            if rows:  # an interrupted extraction of inputs wanted now: finish those rows
                logger.info("resuming feature extraction %s: %d of %d inputs left", stem.name, len(rows),
                            len(shard_keys))
                self._fill(stem, [todo.pop(shard_keys[r]) for r in rows], rows, *args)
        if todo:
            self._extract(list(todo.values()), list(todo), *args)
        index = self.index()
        out = np.zeros((len(paths), self.dim), dtype=np.float32)
        for i, key in enumerate(keys):
            if key in index:
                feats, row = index[key]
                out[i] = feats[row]
        return torch.from_numpy(out)

    @staticmethod
    def _failed(error: InputError, path: str, errors: dict[str, str] | None) -> None:
        if errors is None:
            raise error
        errors[path] = str(error)

    def _extract(self, paths, keys, *args):
        n = len(list(self.dir.glob("shard-*.json")))
        stem = self.dir / f"shard-{n:05d}"
        np.lib.format.open_memmap(f"{stem}.npy", mode="w+", dtype=np.float32, shape=(len(paths), self.dim)).flush()
        np.zeros(len(paths), dtype=np.uint8).tofile(f"{stem}.done")
        atomic_write(f"{stem}.json", json.dumps(keys))  # the shard exists only once its key list is complete
        self._fill(stem, paths, list(range(len(paths))), *args)

    def _fill(self, stem, paths, rows, encode, reader, batch_size, num_workers, device, desc, errors):
        feats = np.load(f"{stem}.npy", mmap_mode="r+")
        modality = "audio" if reader.audio_loader is not None else "image"
        dataset = InputDataset([{modality: p} for p in paths], reader)
        t0, seen = time.perf_counter(), 0
        with open(f"{stem}.done", "r+b") as done, tqdm(total=len(paths), desc=desc, unit="file") as bar:
            for batch in load_batches(dataset, batch_size=batch_size, num_workers=num_workers,
                                      pin_memory=torch.cuda.is_available()):
                for i, _, error in batch:
                    if error is not None:
                        self._failed(error, paths[i], errors)  # its row is not marked done
                good = [(i, inputs[modality]) for i, inputs, error in batch if error is None]
                if good:
                    inputs = stack_inputs(modality, [x for _, x in good])
                    if isinstance(inputs, torch.Tensor):
                        inputs = inputs.to(device, non_blocking=True)
                    with torch.no_grad():
                        out = encode(inputs).float().cpu().numpy()  # (B, F)
                    batch_rows = [rows[i] for i, _ in good]
                    feats[batch_rows] = out
                    feats.flush()  # features hit the file before their rows are marked done
                    for r in batch_rows:
                        done.seek(r)
                        done.write(b"\x01")
                    done.flush()
                seen += len(batch)
                bar.update(len(batch))
                bar.set_postfix(files_per_s=f"{seen / (time.perf_counter() - t0):.0f}")
        del feats


def _reader(preprocess: Callable | None, load: Callable | None) -> InputReader:
    """The loader's reader for one modality: sounds through `load`, else images through `preprocess`."""
    return InputReader(audio_loader=load) if load is not None else InputReader(image_preprocess=preprocess)
