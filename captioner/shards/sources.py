"""Input side of sharded captioning: input specs -> an ordered list of shards, each iterable as items.

`expand_shards(inputs)` turns a mix of input specs into an ordered `list[Shard]`:

- brace patterns (``shards/{00000..00999}.tar``, expanded with `braceexpand`, order kept) and globs
  (``data/*.parquet``, matches sorted);
- WebDataset tar shards (img2dataset/LAION layout; ``.tar``, ``.tgz``, ``.tar.gz``): one shard per file
  (`shards.tar`);
- parquet files: one shard per file, read in record batches (`pyarrow`) so memory stays bounded;
  the image column holds encoded bytes (also the Hugging Face ``{"bytes", "path"}`` struct) or paths
  relative to the parquet file; URLs are never fetched;
- CSV/TSV files with an image path column (read by the one table reader, `captioner.data.tables`): one
  shard per file;
- folders (searched recursively for image files by the one folder walker, `captioner.data.folders`) and
  single image files: all these loose files are pooled, sorted and cut into shards of ``files_per_shard``
  named ``files-00000``, ``files-00001``...

Column names are auto-detected from `captioner.data.columns`: the same image-path names as every other
table of inputs. Shard names are filesystem-safe and stable across runs (they are used as output file
names): the file stem for tar/parquet/CSV shards, with a short hash of the absolute path appended when two
inputs share a stem. A shard yields `Item`s; an item that cannot be read carries `error` instead of
raising, and a shard whose file turns out corrupt (truncated tar, unreadable parquet batch) yields the
items it could read, then one error item, and stops. Shards hold only paths and settings, so they pickle
and can be sent to worker processes.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import re
from dataclasses import dataclass
from typing import ClassVar, Iterator, Sequence

from captioner.data.columns import IMAGE_COLUMNS, KEY_COLUMNS, PARQUET_BYTES_COLUMNS, first_present
from captioner.data.examples import MAX_PATH_BYTES, raise_bad, short
from captioner.data.folders import IMAGE_EXTENSIONS, walk_files
from captioner.data.tables import read_table
from captioner.errors import CaptionerError, SourceError
from captioner.shards.items import Item, Shard
from captioner.shards.tar import (TAR_IMAGE_SUFFIXES, TAR_SUFFIXES, TarShard, split_tar_member_name,  # noqa: F401
                                  write_tar_with_captions)

logger = logging.getLogger(__name__)

PARQUET_SUFFIXES = (".parquet", ".pq")
TABLE_SUFFIXES = (".csv", ".tsv")
DEFAULT_PARQUET_BATCH_SIZE = 256

_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_GLOB_CHARS = re.compile(r"[*?\[]")
_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


def _is_url(value: str) -> bool:
    return bool(_URL_RE.match(value))


def _path_item(key: str, origin: str, value, base_dir: str) -> Item:
    if value is None or (isinstance(value, str) and not value.strip()):
        return Item(key=key, source=origin, error="missing image path")
    value = str(value).strip()
    if len(value) > MAX_PATH_BYTES or len(value.encode("utf-8", "surrogateescape")) > MAX_PATH_BYTES:
        return Item(key=key, source=origin, error=f"image path {short(value)} is longer than {MAX_PATH_BYTES} bytes")
    if _is_url(value):
        return Item(key=key, source=origin, error=f"image is a URL, which is not fetched: {short(value)}")
    path = value if os.path.isabs(value) else os.path.join(base_dir, value)
    if not os.path.isfile(path):
        return Item(key=key, source=origin, error=f"image file not found: {short(path)}")
    return Item(key=key, source=origin, path=path)


class _KeyTracker:
    """Row keys from a key column (or the row index); a missing or repeated key makes an error item."""

    def __init__(self, column: str | None):
        self.column, self.seen = column, set()

    def key(self, index: int, value) -> tuple[str, str | None]:
        if self.column is None:
            return str(index), None
        if value is None or str(value).strip() == "":
            return f"#{index}", f"missing key in column {self.column!r}"
        key = str(value).strip()
        if key in self.seen:
            return f"{key}#{index}", f"duplicate key {key!r} in column {self.column!r}"
        self.seen.add(key)
        return key, None


@dataclass(kw_only=True)
class ParquetShard(Shard):
    """A parquet file, read `batch_size` rows at a time; `image_kind` is "bytes", "struct" or "path"."""

    path: str
    image_column: str
    image_kind: str
    key_column: str | None = None
    batch_size: int = DEFAULT_PARQUET_BATCH_SIZE
    kind: ClassVar[str] = "parquet"

    def __iter__(self) -> Iterator[Item]:
        import pyarrow.parquet as pq

        columns = [self.image_column] + ([self.key_column] if self.key_column not in (None, self.image_column) else [])
        base_dir = os.path.dirname(self.path)
        keys = _KeyTracker(self.key_column)
        index = 0
        try:
            batches = pq.ParquetFile(self.path).iter_batches(batch_size=self.batch_size, columns=columns)
            for batch in batches:
                images = batch.column(self.image_column)
                if self.image_kind == "struct":
                    names = {images.type.field(i).name for i in range(images.type.num_fields)}
                    values = list(zip(images.field("bytes").to_pylist(),
                                      images.field("path").to_pylist() if "path" in names else [None] * len(images),
                                      images.is_null().to_pylist()))
                else:
                    values = images.to_pylist()
                key_values = batch.column(self.key_column).to_pylist() if self.key_column else [None] * len(values)
                for value, key_value in zip(values, key_values):
                    yield self._item(index, value, key_value, keys, base_dir)
                    index += 1
        except Exception as e:  # pyarrow raises OSError/ArrowInvalid (and others) on corrupt files
            message = f"cannot read parquet after row {index}: {type(e).__name__}: {e}"
            logger.warning("%s: %s", self.source, message)
            yield self._shard_error(message)

    def _item(self, index: int, value, key_value, keys: _KeyTracker, base_dir: str) -> Item:
        origin = f"{self.source}:row {index}"
        key, key_error = keys.key(index, key_value)
        if key_error:
            return Item(key=key, source=origin, error=key_error)
        if self.image_kind == "path":
            return _path_item(key, origin, value, base_dir)
        if self.image_kind == "struct":
            data, path, is_null = value
            if data is None and path is not None and not is_null:
                return _path_item(key, origin, path, base_dir)
            value = data
        if value is None:
            return Item(key=key, source=origin, error=f"no image in column {self.image_column!r} (null)")
        if not value:
            return Item(key=key, source=origin, error=f"empty image bytes in column {self.image_column!r}")
        return Item(key=key, source=origin, data=bytes(value))


@dataclass(kw_only=True)
class CsvShard(Shard):
    """A CSV/TSV file with an image path column (paths relative to the file's folder), read by the one
    table reader (`captioner.data.tables`); a row it cannot use is an error item."""

    path: str
    path_column: str
    key_column: str | None = None
    delimiter: str = ","
    kind: ClassVar[str] = "csv"

    def __iter__(self) -> Iterator[Item]:
        base_dir = os.path.dirname(self.path)
        keys = _KeyTracker(self.key_column)
        index = 0
        bad_rows: list[tuple[str, str]] = []

        def line_of(where: str) -> str:
            return f"{self.source}:line {where.rsplit(':', 1)[1]}"

        def flush() -> Iterator[Item]:
            nonlocal index
            for where, reason in bad_rows:
                yield Item(key=f"#{index}" if self.key_column else str(index), source=line_of(where), error=reason)
                index += 1
            bad_rows.clear()

        try:
            table = read_table(self.path, lambda where, reason: bad_rows.append((where, reason)), "a table of images",
                               fmt="tsv" if self.delimiter == "\t" else "csv", max_bytes=None)
            for where, row in table.rows:
                yield from flush()
                key, key_error = keys.key(index, row.get(self.key_column) if self.key_column else None)
                if key_error:
                    yield Item(key=key, source=line_of(where), error=key_error)
                else:
                    yield _path_item(key, line_of(where), row.get(self.path_column), base_dir)
                index += 1
            yield from flush()
        except CaptionerError as e:
            message = f"cannot read table after row {index}: {e}"
            logger.warning("%s: %s", self.source, message)
            yield self._shard_error(message)


@dataclass(kw_only=True)
class FileShard(Shard):
    """A group of loose image files; an item's key and source are its path."""

    paths: list[str]
    kind: ClassVar[str] = "files"

    def __iter__(self) -> Iterator[Item]:
        for path in self.paths:
            yield Item(key=path, source=path, path=path)


# ------------------------------------------------------------------------------------------ expansion

def _lower_suffix_kind(path: str) -> str | None:
    low = path.lower()
    if low.endswith(TAR_SUFFIXES):
        return "tar"
    if low.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if low.endswith(TABLE_SUFFIXES):
        return "csv"
    if low.endswith(IMAGE_EXTENSIONS):
        return "image"
    return None


def _file_stem(path: str) -> str:
    base = os.path.basename(path)
    low = base.lower()
    for suffix in (".tar.gz",) + TAR_SUFFIXES + PARQUET_SUFFIXES + TABLE_SUFFIXES:
        if low.endswith(suffix) and len(base) > len(suffix):
            return base[: -len(suffix)]
    return base


def _safe_name(stem: str) -> str:
    name = _UNSAFE_NAME_CHARS.sub("_", stem).strip("._") or "shard"
    return name[:120]


def _parquet_columns(path: str, image_column: str | None, key_column: str | None) -> tuple[str, str, str | None, int]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path)
        schema, num_rows = meta.schema_arrow, meta.metadata.num_rows
    except Exception as e:
        raise SourceError(f"{path}: not a readable parquet file: {e}") from e

    def kind_of(name: str) -> str | None:
        t = schema.field(name).type
        if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
            return "bytes"
        if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0:
            return "struct"
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            return "path"
        return None

    names = schema.names
    if image_column is not None:
        if image_column not in names:
            raise SourceError(f"{path}: no column {image_column!r} (columns: {', '.join(names)})")
        image_kind = kind_of(image_column)
        if image_kind is None:
            raise SourceError(f"{path}: column {image_column!r} has type {schema.field(image_column).type}; "
                              "expected binary image bytes, a {bytes, path} struct or a string path")
    else:
        image_kind = None
        for name in dict.fromkeys(PARQUET_BYTES_COLUMNS + IMAGE_COLUMNS):
            if name in names:
                kind = kind_of(name)
                if kind == "path" and name in PARQUET_BYTES_COLUMNS and name != "image":
                    kind = None  # a string "jpg"/"bytes" column is not an image
                if kind is not None:
                    image_column, image_kind = name, kind
                    break
        if image_column is None:
            hint = ("; its 'url' column is not fetched: download the images first (e.g. with img2dataset)"
                    if "url" in names else "")
            raise SourceError(f"{path}: no image column found among {tuple(dict.fromkeys(PARQUET_BYTES_COLUMNS + IMAGE_COLUMNS))} "
                              f"(columns: {', '.join(names)}){hint}; pass image_column=")
    key_column = _pick_key_column(path, names, key_column)
    return image_column, image_kind, key_column, num_rows


def _pick_key_column(path: str, names: Sequence[str], key_column: str | None) -> str | None:
    if key_column is not None:
        if key_column not in names:
            raise SourceError(f"{path}: no key column {key_column!r} (columns: {', '.join(names)})")
        return key_column
    return next((n for n in KEY_COLUMNS if n in names), None)


def _csv_columns(path: str, delimiter: str, image_column: str | None,
                 key_column: str | None) -> tuple[str, str | None]:
    try:
        table = read_table(path, raise_bad, "a table of images", fmt="tsv" if delimiter == "\t" else "csv",
                           max_bytes=None)
        table.rows.close()  # the header is all we need now
    except CaptionerError as e:
        raise SourceError(f"cannot read table header: {e}") from None
    names = table.header
    if image_column is not None:
        if image_column not in names:
            raise SourceError(f"{path}: no column {image_column!r} (columns: {', '.join(names)})")
    else:
        image_column = first_present(names, IMAGE_COLUMNS)
        if image_column is None:
            hint = ("; its 'url' column is not fetched: download the images first (e.g. with img2dataset)"
                    if "url" in names else "")
            raise SourceError(f"{path}: no image path column found among {IMAGE_COLUMNS} "
                              f"(columns: {', '.join(names)}){hint}; pass image_column=")
    return image_column, _pick_key_column(path, names, key_column)


def _expand_spec(spec: str) -> tuple[list[tuple[str, bool]], list[str]]:
    """Paths named by one spec as (path, from_pattern), and the literal paths that do not exist."""
    try:
        import braceexpand

        expanded = list(braceexpand.braceexpand(spec))
    except Exception as e:  # UnbalancedBracesError and friends
        raise SourceError(f"bad brace pattern {spec!r}: {e}") from e
    found, missing = [], []
    patterned = len(expanded) > 1
    for candidate in expanded:
        candidate = os.path.expanduser(candidate)
        if _GLOB_CHARS.search(candidate) and not os.path.exists(candidate):
            matches = sorted(glob.glob(candidate, recursive=True))
            if not matches:
                raise SourceError(f"no files match {candidate!r}" + (f" (from {spec!r})" if patterned else ""))
            found.extend((m, True) for m in matches)
        elif os.path.exists(candidate):
            found.append((candidate, patterned))
        else:
            missing.append(candidate)
    return found, missing


def expand_shards(inputs: Sequence[str], *, files_per_shard: int = 1000, key_column: str | None = None,
                  image_column: str | None = None,
                  parquet_batch_size: int = DEFAULT_PARQUET_BATCH_SIZE) -> list[Shard]:
    """Turn input specs into an ordered list of shards (see the module docstring for what is accepted).

    Tar, parquet and CSV shards come in input order (brace expansions in pattern order, globs sorted);
    loose image files from folders and single files follow, pooled, de-duplicated, sorted and grouped
    into ``files-00000``, ``files-00001``... of `files_per_shard` each. `key_column` and `image_column`
    override the column detection for parquet and CSV inputs. Raises `SourceError` for missing inputs
    (all named in one message), patterns matching nothing, unsupported files and tables without an
    image column.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if files_per_shard < 1:
        raise ValueError(f"files_per_shard must be >= 1, got {files_per_shard}")
    if parquet_batch_size < 1:
        raise ValueError(f"parquet_batch_size must be >= 1, got {parquet_batch_size}")

    structured: list[tuple[str, str, str]] = []  # (kind, path, stem)
    loose: dict[str, str] = {}  # absolute path -> path as named
    seen_files: set[str] = set()
    missing: list[str] = []
    for spec in inputs:
        spec = os.fspath(spec)
        paths, spec_missing = _expand_spec(spec)
        missing.extend(spec_missing)
        contributed = bool(spec_missing)
        for path, from_pattern in paths:
            absolute = os.path.abspath(path)
            if os.path.isdir(path):
                images = walk_files(path, IMAGE_EXTENSIONS)
                for image in images:
                    loose.setdefault(os.path.abspath(image), os.path.normpath(image))
                contributed |= bool(images)
                if not images and not from_pattern:
                    raise SourceError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under folder {path}")
                continue
            kind = _lower_suffix_kind(path)
            if kind is None:
                if from_pattern:
                    logger.warning("skipping %s (matched %r): not a tar, parquet, CSV/TSV or image file", path, spec)
                    continue
                raise SourceError(f"unsupported input {path}: expected a folder, an image, or a "
                                  f"{'/'.join(TAR_SUFFIXES + PARQUET_SUFFIXES + TABLE_SUFFIXES)} file")
            contributed = True
            if kind == "image":
                loose.setdefault(absolute, os.path.normpath(path))
            elif absolute in seen_files:
                logger.warning("%s is named more than once; using it once", path)
            else:
                seen_files.add(absolute)
                structured.append((kind, path, _file_stem(path)))
        if not contributed:
            raise SourceError(f"input {spec!r} names no tar, parquet, CSV/TSV or image files")
    if missing:
        shown = ", ".join(missing[:10]) + (f" (and {len(missing) - 10} more)" if len(missing) > 10 else "")
        raise SourceError(f"{len(missing)} input(s) do not exist: {shown}")

    files = sorted(set(loose.values()))
    groups = [files[i:i + files_per_shard] for i in range(0, len(files), files_per_shard)]
    group_names = [f"files-{i:05d}" for i in range(len(groups))]

    # names compared case-insensitively (case-insensitive filesystems); clashes get a path hash
    counts: dict[str, int] = {}
    for name in [_safe_name(stem).lower() for _, _, stem in structured] + group_names:
        counts[name] = counts.get(name, 0) + 1
    shards: list[Shard] = []
    for kind, path, stem in structured:
        name = _safe_name(stem)
        if counts[name.lower()] > 1:
            name = f"{name}-{hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:8]}"
        if kind == "tar":
            shards.append(TarShard(name=name, source=path, path=path))
        elif kind == "parquet":
            image_col, image_kind, key_col, rows = _parquet_columns(path, image_column, key_column)
            shards.append(ParquetShard(name=name, source=path, size=rows, path=path, image_column=image_col,
                                       image_kind=image_kind, key_column=key_col, batch_size=parquet_batch_size))
        else:
            delimiter = "\t" if path.lower().endswith(".tsv") else ","
            path_col, key_col = _csv_columns(path, delimiter, image_column, key_column)
            shards.append(CsvShard(name=name, source=path, path=path, path_column=path_col,
                                   key_column=key_col, delimiter=delimiter))
    for name, group in zip(group_names, groups):
        source = group[0] if len(group) == 1 else f"{group[0]} .. {group[-1]}"
        shards.append(FileShard(name=name, source=source, size=len(group), paths=group))
    logger.info("%d input spec(s) -> %d shard(s) (%d tar/parquet/CSV, %d of loose files: %d files)",
                len(inputs), len(shards), len(structured), len(groups), len(files))
    return shards
