"""Feature cache: each unique image (or sound) is encoded once, batched, and stored memory-mapped.

A cache directory holds one folder per encoder key: a hash of everything that changes the features
(open_clip architecture, pretrained weights, preprocessing; for audio the audio model, its feature
extractor and pooling). A different encoder never reuses stale
features. Inside, extraction runs write append-only shards: `shard-NNNNN.json` (the image keys it
covers), `shard-NNNNN.npy` (features, float32 memmap) and `shard-NNNNN.done` (a byte per row, set
after the row's batch is flushed). An interrupted extraction resumes without recomputing finished
rows. An image's key is its absolute path with size and modification time, so an edited file is
encoded again.
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
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from captioner.data import load_image

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


class _ImageFile:
    """path -> preprocessed image (3, H, W); picklable, for DataLoader workers."""

    def __init__(self, preprocess: Callable):
        self.preprocess = preprocess

    def __call__(self, path: str) -> torch.Tensor:
        return self.preprocess(load_image(path))


class _Inputs(Dataset):
    def __init__(self, paths: Sequence[str], load: Callable):
        self.paths, self.load = paths, load

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.load(self.paths[i])


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

    def get(self, paths: Sequence[str], encode: Callable[[torch.Tensor], torch.Tensor], preprocess: Callable | None,
            *, load: Callable | None = None, batch_size: int = 64, num_workers: int = 0,
            device: torch.device | str = "cpu", desc: str = "encoding images") -> torch.Tensor:
        """Features (N, dim) for `paths` (duplicates allowed), encoding only what the cache lacks.
        Each file becomes encoder input through `load(path)` (picklable, for workers) when given, else
        `preprocess(load_image(path))`."""
        load = load or _ImageFile(preprocess)
        keys = [image_key(p) for p in paths]
        index = self.index()
        self._resume_unfinished(index, encode, load, batch_size, num_workers, device, desc)
        index = self.index()
        todo = list(dict.fromkeys(p for p, k in zip(paths, keys) if k not in index))  # unique, ordered
        if todo:
            self._extract(todo, [image_key(p) for p in todo], encode, load, batch_size, num_workers,
                          device, desc)
            index = self.index()
        out = np.empty((len(paths), self.dim), dtype=np.float32)
        for i, key in enumerate(keys):
            feats, row = index[key]
            out[i] = feats[row]
        return torch.from_numpy(out)

    def _resume_unfinished(self, index, encode, load, batch_size, num_workers, device, desc):
        for stem, keys, _, done in self._shards():
            missing = [r for r in range(len(keys)) if not done[r]]
            if missing:
                paths = [k.split("|", 1)[0] for k in keys]
                logger.info("resuming feature extraction %s: %d of %d images left", stem.name, len(missing), len(keys))
                self._fill(stem, [paths[r] for r in missing], missing, encode, load, batch_size,
                           num_workers, device, desc)

    def _extract(self, paths, keys, encode, load, batch_size, num_workers, device, desc):
        n = len(list(self.dir.glob("shard-*.json")))
        stem = self.dir / f"shard-{n:05d}"
        np.lib.format.open_memmap(f"{stem}.npy", mode="w+", dtype=np.float32, shape=(len(paths), self.dim)).flush()
        np.zeros(len(paths), dtype=np.uint8).tofile(f"{stem}.done")
        tmp = Path(f"{stem}.json.tmp")
        tmp.write_text(json.dumps(keys))
        os.replace(tmp, f"{stem}.json")  # the shard exists only once its key list is complete
        self._fill(stem, paths, list(range(len(paths))), encode, load, batch_size, num_workers, device, desc)

    def _fill(self, stem, paths, rows, encode, load, batch_size, num_workers, device, desc):
        feats = np.load(f"{stem}.npy", mmap_mode="r+")
        loader = DataLoader(_Inputs(paths, load), batch_size=batch_size, num_workers=num_workers,
                            pin_memory=torch.cuda.is_available(), shuffle=False)
        t0, seen = time.perf_counter(), 0
        with open(f"{stem}.done", "r+b") as done, tqdm(total=len(paths), desc=desc, unit="file") as bar:
            for b, inputs in enumerate(loader):
                batch_rows = rows[b * batch_size:(b + 1) * batch_size]
                if isinstance(inputs, torch.Tensor):
                    inputs = inputs.to(device, non_blocking=True)
                with torch.no_grad():
                    out = encode(inputs).float().cpu().numpy()  # (B, F)
                feats[batch_rows] = out
                feats.flush()  # features hit the file before their rows are marked done
                for r in batch_rows:
                    done.seek(r)
                    done.write(b"\x01")
                done.flush()
                seen += len(batch_rows)
                bar.update(len(batch_rows))
                bar.set_postfix(files_per_s=f"{seen / (time.perf_counter() - t0):.0f}")
        del feats
