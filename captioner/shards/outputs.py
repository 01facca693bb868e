"""Caption result files: JSONL or CSV written incrementally and resumable.

Rows are buffered and written one batch at a time with a single write, flush and fsync, so a killed
process loses at most the batch in flight. A later run with `resume=True` drops a half-written last
line, reads which images are already captioned, and appends only the rest: each image ends up in the
output exactly once. Failures go to a separate errors file (JSONL: image, error) of the latest run.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from captioner.data import DataError


def _complete_lines(path: Path) -> bytes:
    """The file's content up to its last newline; a half-written tail is cut off the file itself."""
    data = path.read_bytes()
    cut = data.rfind(b"\n") + 1
    if cut != len(data):
        with open(path, "r+b") as f:
            f.truncate(cut)
    return data[:cut]


def captioned_images(path: str | Path, fmt: str, *, id_field: str = "image") -> set[str]:
    """Ids (`id_field` of each row) already present in a (possibly interrupted) result file."""
    path = Path(path)
    if not path.exists():
        return set()
    text = _complete_lines(path).decode("utf-8", errors="strict")
    if fmt == "csv":
        rows = list(csv.reader(io.StringIO(text)))
        return {r[0] for r in rows[1:] if r}
    done = set()
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            done.add(json.loads(line)[id_field])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError(f"{path}:{lineno}: not a caption result line; cannot resume into this file") from None
    return done


class ResultWriter:
    """Appends caption results; `flush()` commits the buffered rows to disk in one write."""

    def __init__(self, path: str | Path, *, fmt: str | None = None, num_captions: int = 1, resume: bool = False,
                 overwrite: bool = False, id_field: str = "image"):
        self.path, self.id_field = Path(path), id_field
        self.fmt = fmt or ("csv" if self.path.suffix.lower() == ".csv" else "jsonl")
        self.num_captions = num_captions
        if self.path.exists() and not (resume or overwrite):
            raise DataError(f"{self.path}: exists; pass --resume to continue it or --overwrite to replace it")
        self.done = captioned_images(self.path, self.fmt, id_field=id_field) if resume else set()
        self.f = open(self.path, "a" if resume else "w", newline="", encoding="utf-8")
        self.buffer = io.StringIO()
        self.writer = csv.writer(self.buffer)
        if self.fmt == "csv" and self.f.tell() == 0:
            self.writer.writerow([id_field, "caption"] if num_captions == 1 else [id_field, "rank", "caption"])

    def add(self, image: str, captions: list[str], **extra) -> None:
        """One result row; `extra` fields (JSONL only) follow the id, e.g. the source of a shard item."""
        if self.fmt == "csv":
            for rank, c in enumerate(captions):
                self.writer.writerow([image, c] if self.num_captions == 1 else [image, rank, c])
        else:
            row = {self.id_field: image, **extra, "caption": captions[0]}
            if self.num_captions > 1:
                row["captions"] = captions
            self.buffer.write(json.dumps(row, ensure_ascii=False) + "\n")

    def flush(self) -> None:
        data = self.buffer.getvalue()
        if data:
            self.f.write(data)
            self.f.flush()
            os.fsync(self.f.fileno())
            self.buffer.seek(0)
            self.buffer.truncate()

    def close(self) -> None:
        self.flush()
        self.f.close()


class ErrorLog:
    """Failures of this run, one JSON line each, flushed as they happen."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.f = open(self.path, "w", encoding="utf-8")
        self.count = 0

    def add(self, image: str, error: str) -> None:
        self.f.write(json.dumps({"image": image, "error": error}, ensure_ascii=False) + "\n")
        self.f.flush()
        self.count += 1

    def close(self) -> None:
        self.f.close()
