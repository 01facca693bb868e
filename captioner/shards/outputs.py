"""Caption result files: JSONL or CSV written incrementally, resumable, locked; and the errors file.

Rows are buffered and written one batch at a time with a single write, flush and fsync, so a killed
process loses at most the batch in flight. A later run with `resume=True` reads which ids are already
captioned and appends only the rest: each id ends up in the output exactly once.

Nothing in an existing file is modified before it is known to be a file of ours: every complete line
of a JSONL result file must parse as one of our rows, a CSV must start with our header, and an
unterminated last line is cut only when it looks like the start of one of our rows (a killed write).
Anything else (an image, a JSON document) is refused with one line. A file is opened without
truncation, locked (`lockf`, non-blocking: a second process writing the same file gets an error
instead of doubling the rows), and only then checked and cut; a new file is created with O_EXCL.

Encoding: JSONL lines are UTF-8 JSON with U+2028, U+2029 and U+0085 escaped (readers that split on
them keep working; ours split on "\\n" only). A name that is not valid UTF-8 is held as Python does
(`os.fsdecode`: each undecodable byte 0xXY becomes the lone surrogate U+DCXY) and written as the JSON
escape "\\udcXY", so `os.fsencode(json.loads(line)["image"])` gives back the exact bytes. CSV files
hold such names as their raw bytes (read them with errors="surrogateescape").

Failures go to a separate errors file (JSONL: id, error) of the latest run, which follows the same
rules as the output (exists -> only replaced on resume or overwrite, and only if it is one of ours). A run
without failures leaves no errors file: the (empty) file is removed when the log closes, so a stale
one of an earlier run of the same output goes too.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import json
import os
from pathlib import Path
from typing import BinaryIO, Iterator

from captioner.errors import FileSystemError, OutputError

# Line separators that JSON may hold raw but `str.splitlines` (and JavaScript) would split on.
_RAW_SEPARATORS = {"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"}


def json_line(row: dict) -> bytes:
    """`row` as one JSONL line (see the module docstring for the encoding of unusual names)."""
    text = json.dumps(row, ensure_ascii=False)
    for raw, escaped in _RAW_SEPARATORS.items():
        if raw in text:
            text = text.replace(raw, escaped)
    # A lone surrogate (an undecodable byte of a file name) can only sit inside a JSON string, where
    # backslashreplace writes it as the JSON escape \udcXY: valid JSON that decodes to the same string.
    return (text + "\n").encode("utf-8", "backslashreplace")


def iter_json_rows(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """(line number, row) of each non-empty line of a JSONL file of ours, split on "\\n" only; a line
    that is not a JSON object raises OutputError naming FILE:LINE."""
    from captioner.files import read_lines

    for lineno, line in enumerate(read_lines(path), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise OutputError(f"{path}:{lineno}: not a JSON line ({e.msg})") from None
        if not isinstance(row, dict):
            raise OutputError(f"{path}:{lineno}: not a JSON object")
        yield lineno, row


def _fs_error(path: Path, action: str, e: OSError) -> FileSystemError:
    return FileSystemError(f"{path}: cannot {action}: {e.strerror or e}")


@contextlib.contextmanager
def _closed_on_failure(f: BinaryIO, path: Path):
    """Preparing a file just opened: on any failure it is closed (its lock released); OS errors are one line."""
    try:
        yield
    except OSError as e:
        f.close()
        raise _fs_error(path, "write", e) from None
    except BaseException:
        f.close()
        raise


def open_locked(path: Path, *, resume: bool, overwrite: bool) -> tuple[BinaryIO, bool]:
    """Open `path` for reading and writing without truncating it, under an exclusive lock; returns
    (file, existed). A new file is created with O_EXCL (and its missing parent folders); an existing one
    only with resume or overwrite."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _fs_error(path.parent, "create the folder", e) from None
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        existed = False
    except FileExistsError:
        if not (resume or overwrite):
            raise OutputError(f"{path}: exists; resume to continue it or overwrite to replace it") from None
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError as e:
            raise _fs_error(path, "open", e) from None
        existed = True
    except OSError as e:
        raise _fs_error(path, "create", e) from None
    f = os.fdopen(fd, "r+b")
    try:
        # A POSIX record lock, not flock: DataLoader workers forked while the file is open do not
        # inherit it, so it ends with this process (a killed run's workers do not hold it).
        fcntl.lockf(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise OutputError(f"{path}: in use by another process (locked); wait for it or write elsewhere") from None
    if existed and not os.path.isfile(path):
        f.close()
        raise OutputError(f"{path}: not a regular file")
    return f, existed


def _complete_lines(f: BinaryIO) -> Iterator[tuple[int, bytes]]:
    """(end offset, line) for each line ending in b"\\n"; the unterminated tail is left out."""
    f.seek(0)
    end = 0
    for raw in f:
        if not raw.endswith(b"\n"):
            return
        end += len(raw)
        yield end, raw


def _tail(f: BinaryIO, cut: int) -> bytes:
    f.seek(cut)
    return f.read(1 << 16)


def _row_start(tail: bytes, prefix: bytes) -> bool:
    """Whether an unterminated last line could be a killed write of one of our rows (starting `prefix`)."""
    return tail.startswith(prefix) or prefix.startswith(tail)


class ResultWriter:
    """Appends caption results; `flush()` commits the buffered rows to disk in one write.

    `done` holds the ids already in the file (resume). Rows are keyed by `id_field` ("image",
    "audio", or "key" in shard files); a JSONL row is {id_field, **extra, caption[, captions]}."""

    def __init__(self, path: str | Path, *, fmt: str | None = None, num_captions: int = 1, resume: bool = False,
                 overwrite: bool = False, id_field: str = "image"):
        self.path, self.id_field = Path(path), id_field
        self.fmt = fmt or ("csv" if self.path.suffix.lower() == ".csv" else "jsonl")
        self.num_captions = num_captions
        self.header = [id_field, "caption"] if num_captions == 1 else [id_field, "rank", "caption"]
        self.f, existed = open_locked(self.path, resume=resume, overwrite=overwrite)
        self.done: set[str] = set()
        with _closed_on_failure(self.f, self.path):
            cut = 0
            if existed and resume:
                cut = self._scan_csv() if self.fmt == "csv" else self._scan_jsonl()
            self.f.truncate(cut)  # overwrite: 0; resume: the killed write's half line
            self.f.seek(cut)
        self.buffer = io.BytesIO()
        self.text = io.StringIO()  # CSV rows, encoded at flush
        self.writer = csv.writer(self.text)
        if self.fmt == "csv" and cut == 0:
            self.writer.writerow(self.header)

    def _not_ours(self, where: str, why: str) -> OutputError:
        return OutputError(f"{where}: {why}; not a caption result file of ours, so it is left untouched")

    def _scan_jsonl(self) -> int:
        cut = 0
        for lineno, (end, raw) in enumerate(_complete_lines(self.f), start=1):
            cut = end
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise self._not_ours(f"{self.path}:{lineno}", "not a JSON line") from None
            if not (isinstance(row, dict) and isinstance(row.get(self.id_field), str) and "caption" in row):
                raise self._not_ours(f"{self.path}:{lineno}", f"no {self.id_field!r} and 'caption' fields")
            self.done.add(row[self.id_field])
        tail = _tail(self.f, cut)
        if tail and not _row_start(tail, b'{"' + self.id_field.encode() + b'": '):
            raise self._not_ours(str(self.path), "its last line is not a cut-off result row")
        return cut

    def _scan_csv(self) -> int:
        ends: list[int] = []

        def lines():
            for end, raw in _complete_lines(self.f):
                ends.append(end)
                yield raw.decode("utf-8", "surrogateescape")

        cut, reader = 0, csv.reader(lines(), strict=True)
        try:
            for n, row in enumerate(reader):
                if n == 0 and row != self.header:
                    if row[:1] == [self.id_field] and row[-1:] == ["caption"]:
                        raise OutputError(f"{self.path}: has columns {','.join(row)}, but this run writes "
                                          f"{','.join(self.header)} ({self.num_captions} caption(s) per input)")
                    raise self._not_ours(str(self.path), "its first line is not our CSV header")
                if n and len(row) != len(self.header):
                    raise self._not_ours(f"{self.path}:{reader.line_num}", "not a result row")
                if n:
                    self.done.add(row[0])
                cut = ends[-1]  # the reader pulls exactly the lines of each record
        except csv.Error:
            pass  # an unterminated quoted field at the end: a killed write, cut below
        tail = _tail(self.f, cut)
        if cut == 0 and tail and not _row_start(tail, ",".join(self.header).encode()):
            raise self._not_ours(str(self.path), "its first line is not our CSV header")
        return cut

    def add(self, image: str, captions: list[str], **extra) -> None:
        """One result row; `extra` fields (JSONL only) follow the id, e.g. the source of a shard item."""
        if self.fmt == "csv":
            for rank, c in enumerate(captions):
                self.writer.writerow([image, c] if self.num_captions == 1 else [image, rank, c])
        else:
            row = {self.id_field: image, **extra, "caption": captions[0]}
            if self.num_captions > 1:
                row["captions"] = captions
            self.buffer.write(json_line(row))

    def flush(self) -> None:
        if self.text.tell():
            self.buffer.write(self.text.getvalue().encode("utf-8", "surrogateescape"))
            self.text.seek(0)
            self.text.truncate()
        data = self.buffer.getvalue()
        if data:
            try:
                self.f.write(data)
                self.f.flush()
                os.fsync(self.f.fileno())
            except OSError as e:
                raise _fs_error(self.path, "write", e) from None
            self.buffer.seek(0)
            self.buffer.truncate()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self.f.close()  # also releases the lock


class ErrorLog:
    """Failures of this run, one JSON line each ({id_field, **extra, error}), flushed as they happen.

    An existing file is replaced only with resume or overwrite, and with resume only when every
    complete line of it is one of our error rows. Closed without a row, the file is removed."""

    def __init__(self, path: str | Path, *, resume: bool = False, overwrite: bool = False, id_field: str = "image"):
        self.path, self.id_field = Path(path), id_field
        self.f, existed = open_locked(self.path, resume=resume, overwrite=overwrite)
        with _closed_on_failure(self.f, self.path):
            if existed and resume and not overwrite:
                self._check()
            self.f.truncate(0)
            self.f.seek(0)
        self.count = 0

    def _check(self) -> None:
        cut = 0
        for lineno, (end, raw) in enumerate(_complete_lines(self.f), start=1):
            cut = end
            try:
                row = json.loads(raw.decode("utf-8")) if raw.strip() else {"error": ""}
            except (UnicodeDecodeError, json.JSONDecodeError):
                row = None
            if not (isinstance(row, dict) and "error" in row):
                raise OutputError(f"{self.path}:{lineno}: not an error row of ours; the file is left untouched")
        tail = _tail(self.f, cut)
        if tail and not _row_start(tail, b'{"'):
            raise OutputError(f"{self.path}: its last line is not a cut-off error row; the file is left untouched")

    def add(self, image: str, error: str, **extra) -> None:
        try:
            self.f.write(json_line({self.id_field: image, **extra, "error": error}))
            self.f.flush()
        except OSError as e:
            raise _fs_error(self.path, "write", e) from None
        self.count += 1

    def flush(self) -> None:
        pass  # every row is flushed as it is added

    def close(self) -> None:
        try:
            if self.count == 0:
                self._remove_empty()
        finally:
            self.f.close()

    def _remove_empty(self) -> None:
        """Unlink our file (still locked) when it is empty and still the file at `path`."""
        try:
            ours, there = os.fstat(self.f.fileno()), os.stat(self.path)
            if (ours.st_dev, ours.st_ino) == (there.st_dev, there.st_ino) and ours.st_size == 0:
                os.unlink(self.path)
        except OSError:
            pass  # an empty errors file left behind is harmless
