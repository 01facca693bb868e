"""The one input loader: items -> (key, model inputs | error), batched, JPEGs decoded on the device.

An item is a dict {"image": ..., "audio": ...} with either or both (a bare value is an image). An image
is a path, encoded bytes, a PIL image or a numpy array (H, W[, C]); a sound is a path, encoded bytes or a
mono float array already at the encoder's sample rate. Every caller reads inputs here: `Captioner.caption`
/ `iter_captions` / `encode_inputs`, sharded captioning and the training feature encoding (with or without
the feature cache), so a file decodes the same way whichever of them reads it.

- `InputReader` (picklable, runs in DataLoader workers): one item -> {modality: model input}, or raises
  the file's `InputError` (ImageError / AudioError: "NAME: REASON"). With `jpegs`, plain JPEG files are
  left encoded (`JpegBytes`) for the device to decode.
- `InputDataset` (a list of items) and `InputStream` (an iterable of rows, e.g. a shard: each worker a
  slice) yield rows (key, inputs | None, error | None); a bad input is its row's error, never an exception.
- `load_batches` runs them through a DataLoader and finishes each batch in the main process: its JPEGs
  decoded together on the device (`JpegPipeline`; a file that fails there becomes its row's error, as
  on the PIL path). `group_rows` groups a batch's rows by the inputs they have, `stack_inputs` batches
  one modality's inputs for its encoder.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from captioner.errors import AudioError, ImageError, InputError
from captioner.inputs.image import MAX_PIXELS, _check_max_pixels
from captioner.inputs.jpeg import JpegPipeline, prepare_image

MODALITIES = ("image", "audio")
PATH_TYPES = (str, os.PathLike)
BYTES_TYPES = (bytes, bytearray, memoryview)
SINGLE_TYPES = (*PATH_TYPES, *BYTES_TYPES, Image.Image, np.ndarray)  # one input, not a list of them

Row = tuple  # (key, {modality: model input} | None, InputError | None)


def as_item(value) -> dict:
    """An item dict: dicts as given, a bare value as an image."""
    return dict(value) if isinstance(value, dict) else {"image": value}


def input_name(value, fallback: str) -> str:
    """How errors name an input: its path, else `fallback` (e.g. "item 3", a tar member's source)."""
    return os.fsdecode(value) if isinstance(value, PATH_TYPES) else fallback


class InputReader:
    """One item {modality: value} -> {modality: model input}; raises InputError for an unreadable input.

    image_preprocess: PIL image -> (3, S, S) tensor (the image encoder's transform); audio_loader: the
    audio encoder's `loader()` (path -> inputs, `.preprocess` for arrays). Picklable, for workers."""

    def __init__(self, *, image_preprocess: Callable | None = None, audio_loader=None,
                 max_pixels: int | None = MAX_PIXELS, jpegs: bool = False):
        self.image_preprocess, self.audio_loader = image_preprocess, audio_loader
        self.max_pixels, self.jpegs = _check_max_pixels(max_pixels), jpegs

    def __call__(self, item: dict, name: str | dict[str, str]) -> dict[str, Any]:
        """name: how errors name an input that is not a path (one for all, or one per modality)."""
        names = name if isinstance(name, dict) else {}
        fallback = name if isinstance(name, str) else "item"
        unknown = sorted(set(item) - set(MODALITIES))
        if unknown:
            raise InputError(f"{fallback}: unknown input kind {unknown[0]!r} (expected image and/or audio)")
        return {m: (self.image if m == "image" else self.audio)(v, input_name(v, names.get(m, fallback)))
                for m, v in item.items()}

    def image(self, value, name: str):
        if self.image_preprocess is None:
            raise ImageError(f"{name}: this captioner takes no image input")
        if isinstance(value, (*PATH_TYPES, *BYTES_TYPES)):
            return prepare_image(value, name=name, preprocess=self.image_preprocess, max_pixels=self.max_pixels,
                                 jpegs=self.jpegs)
        if isinstance(value, np.ndarray):
            try:
                value = Image.fromarray(value).convert("RGB")
            except (TypeError, ValueError) as e:
                raise ImageError(f"{name}: not an image array ({e})") from None
        if not isinstance(value, Image.Image):
            raise ImageError(f"{name}: not an image (a path, bytes, a PIL image or an array), but "
                             f"{type(value).__name__}")
        return self.image_preprocess(value)  # (decoded already: max_pixels guards decoding only)

    def audio(self, value, name: str):
        from captioner.inputs.audio import load_audio_bytes

        load = self.audio_loader
        if load is None:
            raise AudioError(f"{name}: this captioner takes no audio input")
        if isinstance(value, PATH_TYPES):
            return load(value)
        if isinstance(value, BYTES_TYPES):
            value = load_audio_bytes(bytes(value), name=name, sample_rate=load.preprocess.sample_rate,
                                     max_seconds=load.max_seconds)
        if not isinstance(value, np.ndarray) or value.ndim != 1 or value.shape[0] == 0:
            raise AudioError(f"{name}: not a sound (a path, bytes or a non-empty mono array (N,)), but "
                             f"{type(value).__name__}{getattr(value, 'shape', '')}")
        return {k: v[0] for k, v in load.preprocess(value).items()}  # no batch dimension, as from a file

    def read(self, key, item: dict, name: str | dict[str, str]) -> Row:
        try:
            return key, self(item, name), None
        except InputError as e:
            return key, None, e


class InputDataset(Dataset):
    """items[i] -> (i, {modality: model input}, None), or (i, None, InputError) when it cannot be read."""

    def __init__(self, items: Sequence, reader: InputReader):
        self.items, self.reader = items, reader

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Row:
        return self.reader.read(i, as_item(self.items[i]), f"item {i}")


class InputStream(IterableDataset):
    """Rows of a picklable iterable of (key, item | None, error message | None, name) (e.g. a shard's
    items), read like `InputDataset`'s; with workers each takes every num_workers-th row."""

    def __init__(self, rows: Iterable, reader: InputReader):
        self.rows, self.reader = rows, reader

    def __iter__(self) -> Iterator[Row]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        for n, (key, item, error, name) in enumerate(self.rows):
            if n % nw != wid:
                continue
            yield (key, None, InputError(error)) if error is not None else self.reader.read(key, item, name)


def default_workers() -> int:
    """DataLoader workers when none are asked for: one per CPU this process may use (its affinity, not the
    machine's count), one CPU left to the process that captions, at most 4; 0 (read in-process) on one CPU."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cpus = os.cpu_count() or 1
    return max(0, min(4, cpus - 1))


def load_batches(dataset: Dataset, *, batch_size: int, num_workers: int | None = 0,
                 pipeline: JpegPipeline | None = None, pin_memory: bool = False) -> Iterator[list[Row]]:
    """Batches of rows in input order, read by `num_workers` DataLoader workers (0: in this process; None:
    `default_workers()`) while the caller works on the previous batch; JPEGs left encoded are decoded on
    the device per batch."""
    if num_workers is None:
        num_workers = default_workers()
    # Its own generator: a DataLoader draws its workers' base seed from the generator it is given, and
    # reading inputs must not move the global RNG that training's initialisation and data order use.
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=list,
                        pin_memory=pin_memory, prefetch_factor=4 if num_workers else None,
                        generator=torch.Generator())
    for batch in loader:
        yield decode_on_device(batch, pipeline) if pipeline is not None else batch


def decode_on_device(batch: list[Row], pipeline: JpegPipeline) -> list[Row]:
    """A batch with its encoded JPEGs decoded on the device in one call; a file that cannot be decoded
    becomes that row's error."""
    rows = [j for j, (_, inputs, _) in enumerate(batch) if inputs is not None and "image" in inputs]
    batch = list(batch)
    for j, image in zip(rows, pipeline.resolve([batch[j][1]["image"] for j in rows])):
        key, inputs, _ = batch[j]
        batch[j] = (key, None, image) if isinstance(image, ImageError) else (key, {**inputs, "image": image}, None)
    return batch


def group_rows(batch: list[Row]) -> dict[tuple[str, ...], list[int]]:
    """Positions of the readable rows of a batch, grouped by the inputs they have (in model order)."""
    groups: dict[tuple, list[int]] = {}
    for j, (_, inputs, error) in enumerate(batch):
        if error is None:
            groups.setdefault(tuple(m for m in MODALITIES if m in inputs), []).append(j)
    return groups


def stack_inputs(modality: str, inputs: list, device: torch.device | str | None = None):
    """One modality's model inputs as a batch: image tensors (B, 3, S, S), audio {name: (B, ...)}."""
    if modality == "image":
        out = torch.stack([x.to(device, non_blocking=True) if device is not None else x for x in inputs])
        return out
    return {k: torch.stack([x[k] for x in inputs]) for k in inputs[0]}


def is_single(value) -> bool:
    """Whether `value` is one input rather than a list of them."""
    return isinstance(value, SINGLE_TYPES) and not (isinstance(value, np.ndarray) and value.dtype == object)

