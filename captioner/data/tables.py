"""The one table reader: CSV, TSV, JSONL (and parquet) files -> rows, with FILE:LINE for every problem; and whole
JSON documents.

`read_table` streams a table's rows as (where, {column: value}): CSV/TSV rows against the header row
(fields as strings; undecodable bytes become lone surrogates, see `examples.is_utf8`), JSONL lines as
JSON objects, parquet rows as dicts ("FILE:row N"). Lines are split by "\\n" only (a quoted CSV field may span lines; the row's first line is
given). A problem row goes to `bad(where, reason)` (report and skip, or raise) and reading goes on.
Caption sets, predictions, input tables and shard tables all read their tables here.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from captioner.data.examples import MAX_FILE_BYTES, Bad
from captioner.errors import DataError

TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson")
_SNIFF_BYTES = 65536


def _open(path: Path, max_bytes: int | None):
    """The file opened for binary reading, or DataError naming the reason."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not a file") from None
    except PermissionError:
        raise DataError(f"{path}: permission denied") from None
    except OSError as e:
        raise DataError(f"{path}: unreadable ({e.strerror or e})") from None
    try:
        size = f.seek(0, io.SEEK_END)
        f.seek(0)
    except OSError as e:
        f.close()
        raise DataError(f"{path}: unreadable ({e.strerror or e})") from None
    if max_bytes is not None and size > max_bytes:
        f.close()
        raise DataError(f"{path}: larger than {max_bytes / 2**30:.0f} GiB (MAX_FILE_BYTES); split it")
    return f


def read_bytes(path: Path, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """A whole file (at most `max_bytes`), or DataError naming the file and the reason."""
    with _open(Path(path), max_bytes) as f:
        try:
            return f.read()
        except OSError as e:
            raise DataError(f"{path}: unreadable ({e.strerror or e})") from None


def head(path: Path) -> bytes:
    """The first bytes of a file (after a UTF-8 BOM), for telling formats apart; b"" when unreadable."""
    try:
        with open(path, "rb") as f:
            return f.read(_SNIFF_BYTES).removeprefix(codecs.BOM_UTF8)
    except OSError:
        return b""


def load_json(path: Path):
    """A whole JSON document, or DataError naming the file (and the line of a syntax error)."""
    raw = read_bytes(path)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 (byte {e.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg}, column {e.colno})") from None
    except (ValueError, RecursionError) as e:  # e.g. an integer too long, nesting too deep
        raise DataError(f"{path}: invalid JSON ({type(e).__name__}: {e})") from None


def table_format(path: Path) -> str:
    """'jsonl', 'tsv', 'parquet' or 'csv': by extension, else by content (a leading '{', more tabs than
    commas)."""
    ext = path.suffix.lower()
    if ext == ".parquet":
        return "parquet"
    if ext in (".jsonl", ".ndjson"):
        return "jsonl"
    if ext == ".tsv":
        return "tsv"
    start = head(path)
    if ext != ".csv" and start.lstrip()[:1] == b"{":
        return "jsonl"
    first = start.lstrip(b"\r\n").split(b"\n", 1)[0]
    return "tsv" if first.count(b"\t") > first.count(b",") else "csv"


@dataclass
class Table:
    """An open table: `rows` yields (where, row) once; `header` is None for JSONL (each row has its keys)."""

    path: Path
    fmt: str  # "csv", "tsv", "jsonl" or "parquet"
    header_line: int | None
    header: list[str] | None
    rows: Iterator[tuple[str, dict]]

    def where(self, line: int | None = None) -> str:
        return f"{self.path}:{self.header_line if line is None else line}"


def read_table(path: str | Path, bad: Bad, what: str, *, fmt: str | None = None,
               max_bytes: int | None = MAX_FILE_BYTES) -> Table:
    """Open a CSV/TSV/JSONL table (`fmt`, default `table_format`). A CSV/TSV needs a header row (an empty
    file is a DataError saying `what` needs one); a repeated column name means its first one. Rows with
    another number of fields than the header, malformed CSV, undecodable or non-object JSONL lines go to
    `bad`; blank lines are skipped. Files over `max_bytes` are refused (None: no limit, rows stream). A
    parquet table (pyarrow) has rows like JSONL's: header None, cells as Python values."""
    path = Path(path)
    fmt = fmt or table_format(path)
    if fmt == "parquet":
        _open(path, max_bytes).close()  # the same missing/unreadable/too-large errors as the text formats
        return Table(path, fmt, None, None, _parquet_rows(path))
    f = _open(path, max_bytes)
    if fmt == "jsonl":
        return Table(path, fmt, None, None, _jsonl_rows(path, f, bad))
    text = io.TextIOWrapper(f, encoding="utf-8-sig", errors="surrogateescape", newline="")
    records = _csv_records(path, text, "\t" if fmt == "tsv" else ",", bad)
    first = next(records, None)
    if first is None:
        text.close()
        raise DataError(f"{path}: empty file ({what} needs a header row)")
    header_line, header = first
    header = [h.strip() for h in header]
    return Table(path, fmt, header_line, header, _csv_dicts(path, records, header, bad))


def _jsonl_rows(path: Path, f, bad: Bad) -> Iterator[tuple[str, dict]]:
    """(FILE:LINE, object) for each non-blank JSONL line; other lines go to bad()."""
    with f:
        for lineno, line in enumerate(f, start=1):  # binary iteration splits on b"\n" only
            if lineno == 1:
                line = line.removeprefix(codecs.BOM_UTF8)
            where = f"{path}:{lineno}"
            try:
                text = line.decode("utf-8").strip()
            except UnicodeDecodeError:
                bad(where, "not valid UTF-8")
                continue
            if not text:
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                bad(where, f"invalid JSON ({e.msg})")
                continue
            except (ValueError, RecursionError) as e:
                bad(where, f"invalid JSON ({type(e).__name__})")
                continue
            if not isinstance(row, dict):
                bad(where, "row must be a JSON object")
                continue
            yield where, row


def _parquet_rows(path: Path) -> Iterator[tuple[str, dict]]:
    """(FILE:row N, row) for each parquet row, read in record batches."""
    import pyarrow.parquet as pq

    n = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                n += 1
                yield f"{path}:row {n}", row
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError, ArrowIOError an OSError
        raise DataError(f"{path}: not a readable parquet file ({e})") from None


def _csv_records(path: Path, text: io.TextIOWrapper, delimiter: str, bad: Bad) -> Iterator[tuple[int, list[str]]]:
    """(first line number, fields) for each non-blank CSV record. Line numbers are the file's own, also
    when a quoted field spans lines."""
    with text:
        reader = csv.reader(text, delimiter=delimiter)
        prev = 0
        while True:
            try:
                record = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                start, prev = prev + 1, reader.line_num
                bad(f"{path}:{start}", f"malformed CSV ({e})")
                continue
            except OSError as e:
                raise DataError(f"{path}:{prev + 1}: unreadable ({e.strerror or e})") from None
            start, prev = prev + 1, reader.line_num
            if any(field.strip() for field in record):
                yield start, record


def _csv_dicts(path: Path, records: Iterator[tuple[int, list[str]]], header: list[str], bad: Bad
               ) -> Iterator[tuple[str, dict[str, str]]]:
    index = {h: i for i, h in reversed(list(enumerate(header)))}  # a repeated column name means its first one
    for lineno, record in records:
        where = f"{path}:{lineno}"
        if len(record) != len(header):
            bad(where, f"row has {len(record)} fields, the header has {len(header)} "
                       "(unquoted delimiter in a caption?)")
            continue
        yield where, {h: record[i] for h, i in index.items()}
