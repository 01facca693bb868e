"""The caption-to-file workflow (what `captioner caption -o FILE` runs), callable from Python.

`caption_to_file(captioner, items, output)` captions many inputs into a JSONL or CSV result file (its
missing folders created) a batch at a time, resumes an interrupted file (inputs already in it are skipped, matched by their
resolved path, so `imgs/a.png` and `/abs/imgs/a.png` are the same input), lists failures in an
errors file, and returns the counts in a `CaptionFileResult`. The output and the errors file are
never one of the inputs, never each other, and an existing one is modified only when it is one of
ours (see outputs.py); both are locked while the run writes them.

    from captioner.shards.caption_file import caption_to_file
    result = caption_to_file(cap, ["imgs/"], "out.jsonl", resume=True)   # folders and globs expand
    result.captioned, result.failed, result.skipped
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from captioner.config import DecodeConfig
from captioner.errors import OutputError
from captioner.inputs.image import MAX_PIXELS
from captioner.shards.outputs import ErrorLog, ResultWriter


@dataclass
class CaptionFileResult:
    """What a caption-to-file run did: `failures` holds one "NAME: REASON" line per failed input."""

    output: Path | None
    errors_path: Path | None  # None when nothing failed (no errors file is left)
    captioned: int = 0
    skipped: int = 0  # already in the output (resume)
    failures: list[str] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return len(self.failures)


def path_key(path: str | os.PathLike) -> str:
    """How inputs are matched on resume: the absolute path with symlinks resolved."""
    return os.path.realpath(os.fspath(path))


def item_key(item: dict) -> str:
    """The id a result row carries: the image path, else (sounds alone) the audio path."""
    return item.get("image") or item["audio"]


def _check_targets(targets: dict[str, Path], inputs: Iterable[str]) -> None:
    """Refuse a target that is another target or one of the inputs. Only an existing target can be
    an input, so inputs are compared by device and inode with those (which also catches the same
    file under another name: a relative path, a symlink, a hard link)."""
    if len({path_key(p) for p in targets.values()}) < len(targets):
        raise OutputError(f"{targets['errors']}: the errors file cannot be the output file")
    existing = {}
    for name, p in targets.items():
        try:
            st = os.stat(p)
        except OSError:
            continue
        existing[(st.st_dev, st.st_ino)] = name
    if not existing:
        return
    for path in inputs:
        try:
            st = os.stat(path)
        except OSError:
            continue
        hit = existing.get((st.st_dev, st.st_ino))
        if hit is not None:
            raise OutputError(f"{targets[hit]}: is one of the inputs; refusing to write the {hit} file over it")


def caption_to_file(captioner, items: Sequence[str | dict], output: str | os.PathLike | None = None, *,
                    decode: DecodeConfig | None = None, fmt: str | None = None, resume: bool = False,
                    overwrite: bool = False, errors: str | os.PathLike | None = None,
                    failures: Sequence[str] = (), other_inputs: Sequence[str] = (), batch_size: int = 32,
                    max_pixels: int | None = MAX_PIXELS, num_workers: int = 0, jpeg_on_device: bool | None = None,
                    on_result: Callable[[dict, list[str]], None] | None = None) -> CaptionFileResult:
    """Caption `items` (paths, or dicts {"image": path, "audio": path}) into `output` (.jsonl or .csv, or
    `fmt`); without `output`, only `on_result(item, captions)` sees the results.

    resume: continue an existing result file, captioning only the inputs not in it. overwrite: replace an
    existing file. errors: the errors file (default OUTPUT.errors.jsonl), rewritten with this run's
    failures (none: no errors file, and one left by an earlier run is removed; `errors_path` is then None); `failures` are problems found while collecting the inputs ("NAME: REASON"), listed there
    too. other_inputs: more files the run reads (e.g. an input table), which no target may be.
    """
    from tqdm.auto import tqdm

    decode = decode or DecodeConfig()
    items = [{"image": it} if isinstance(it, (str, os.PathLike)) else it for it in items]
    items = [{m: os.fspath(p) for m, p in it.items()} for it in items]
    if items:  # before any output file is created
        captioner.model.check_modalities({m for it in items for m in it})
    id_field = "image" if any("image" in it for it in items) else "audio"
    result = CaptionFileResult(output=Path(output) if output else None, errors_path=None, failures=list(failures))
    writer = log = None
    if output is not None:
        errors = Path(errors) if errors else Path(f"{os.fspath(output)}.errors.jsonl")
        result.errors_path = errors
        _check_targets({"output": Path(output), "errors": errors},
                       [*other_inputs, *(p for it in items for p in it.values())])
        writer = ResultWriter(output, fmt=fmt, num_captions=decode.num_captions, resume=resume,
                              overwrite=overwrite, id_field=id_field)
        try:
            log = ErrorLog(errors, resume=resume, overwrite=overwrite)
        except BaseException:
            writer.close()
            raise
        for line in failures:
            log.add(line.split(":", 1)[0], line)
    done = {path_key(k) for k in writer.done} if writer else set()
    todo = [it for it in items if not done or path_key(item_key(it)) not in done]
    result.skipped = len(items) - len(todo)
    try:
        bar = tqdm(total=len(todo), unit="img", desc="captioning", disable=len(todo) < 2 * batch_size)
        results = captioner.iter_captions(todo, decode=decode, batch_size=batch_size, max_pixels=max_pixels,
                                          num_workers=num_workers, jpeg_on_device=jpeg_on_device)
        for i, (item, captions, error) in enumerate(results, start=1):
            bar.update(1)
            if error:
                result.failures.append(error)
                if log:
                    log.add(item_key(item), error)
                continue
            if writer:
                writer.add(item_key(item), captions,
                           **({"audio": item["audio"]} if id_field == "image" and "audio" in item else {}))
                if i % batch_size == 0:
                    writer.flush()  # one committed write per batch (the rest at close)
            if on_result:
                on_result(item, captions)
            result.captioned += 1
        bar.close()
    finally:
        if writer:
            writer.close()
            log.close()
    if log is not None and not log.count:
        result.errors_path = None  # no failures: the log removed its file
    return result
