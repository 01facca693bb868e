"""Input side of sharded captioning: input specs -> an ordered list of shards, each iterable as items.

`expand_shards(inputs)` turns a mix of input specs into an ordered `list[Shard]`:

- brace patterns (``shards/{00000..00999}.tar``, expanded with `braceexpand`, order kept) and globs
  (``data/*.parquet``, matches sorted);
- WebDataset tar shards (img2dataset/LAION layout; ``.tar``, ``.tgz``, ``.tar.gz``): one shard per file;
- parquet files: one shard per file, read in record batches (`pyarrow`) so memory stays bounded;
  the image column holds encoded bytes (also the Hugging Face ``{"bytes", "path"}`` struct) or paths
  relative to the parquet file; URLs are never fetched;
- CSV/TSV files with an image path column: one shard per file;
- folders (searched recursively for image files) and single image files: all these loose files are
  pooled, sorted and cut into shards of ``files_per_shard`` named ``files-00000``, ``files-00001``...

Shard names are filesystem-safe and stable across runs (they are used as output file names): the file
stem for tar/parquet/CSV shards, with a short hash of the absolute path appended when two inputs share
a stem. A shard yields `Item`s; an item that cannot be read carries `error` instead of raising, and a
shard whose file turns out corrupt (truncated tar, unreadable parquet batch) yields the items it could
read, then one error item, and stops. Shards hold only paths and settings, so they pickle and can be
sent to worker processes.

`write_tar_with_captions` writes a tar shard back with one caption member added per captioned sample.

Tar samples follow the WebDataset convention: members are grouped by key, the member path up to the
first dot of its base name (``a/b/000123.jpg`` + ``a/b/000123.json`` -> key ``a/b/000123``), and a
sample's members must be contiguous in the tar. Tars are read with the standard `tarfile` module: the
`webdataset` package's reader cannot tell a tar truncated at a member boundary from a complete one and
imports torch, so only its naming convention is reproduced here.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import hashlib
import io
import json
import logging
import os
import re
import tarfile
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Iterator, Mapping, Sequence

from captioner.data.sets import AUDIO_EXTENSIONS
from captioner.errors import SourceError  # noqa: F401  (defined in errors.py)

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# image members of a tar sample, in order of preference
TAR_IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp", "bmp", "gif")
TAR_SUFFIXES = (".tar", ".tgz", ".tar.gz")
PARQUET_SUFFIXES = (".parquet", ".pq")
TABLE_SUFFIXES = (".csv", ".tsv")

PARQUET_BYTES_COLUMNS = ("image", "jpg", "png", "bytes", "image_bytes")
PARQUET_PATH_COLUMNS = ("path", "image_path", "file_name")
CSV_PATH_COLUMNS = ("path", "image_path", "file_name", "filepath", "filename", "image", "file")
KEY_COLUMNS = ("key", "__key__", "id", "image_id")
DEFAULT_PARQUET_BATCH_SIZE = 256

_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_GLOB_CHARS = re.compile(r"[*?\[]")
_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
_TAR_READ_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error, ValueError)



@dataclass
class Item:
    """One image to caption: encoded bytes (`data`) or a file path (`path`), or an `error`."""

    key: str  # unique within the shard
    source: str  # human-readable origin, e.g. "shards/00001.tar:000123.jpg", "data.parquet:row 17"
    data: bytes | None = None
    path: str | None = None
    error: str | None = None  # set when the item could not be read; data and path are None then
    extra: dict = field(default_factory=dict)  # tars: other members of the sample, suffix -> bytes

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class Shard:
    """A unit of work: `name` (unique, filesystem-safe, stable), `source`, `size` (items, if cheaply known)."""

    name: str
    source: str
    size: int | None = None
    kind: ClassVar[str] = "shard"

    def __iter__(self) -> Iterator[Item]:
        raise NotImplementedError

    def _shard_error(self, message: str) -> Item:
        return Item(key=f"{self.name}:{self.kind}", source=self.source, error=message)


# ----------------------------------------------------------------------------------------------- tars

def split_tar_member_name(name: str) -> tuple[str, str] | None:
    """WebDataset key and suffix of a member name (``a/b/000123.seg.png`` -> ``("a/b/000123", "seg.png")``).

    None for names that belong to no sample: no dot in the base name, hidden files and macOS junk
    (``__MACOSX/``, ``._*``, ``.DS_Store``), and WebDataset's top-level ``__meta__`` entries.
    """
    parts = name.split("/")
    base = parts[-1]
    if "__MACOSX" in parts[:-1] or base.startswith(".") or not base:
        return None
    if len(parts) == 1 and base.startswith("__") and base.endswith("__"):
        return None
    stem, dot, suffix = base.partition(".")
    if not dot or not stem:
        return None
    return "/".join(parts[:-1] + [stem]), suffix


@dataclass
class _TarSample:
    key: str | None  # None: the error concerns the whole shard
    members: list[tuple[tarfile.TarInfo, bytes]] = field(default_factory=list)
    error: str | None = None


def _iter_tar_samples(path: str) -> Iterator[_TarSample]:
    """Contiguous samples of a tar, then (if the tar is corrupt) one error sample; never raises on bad data."""
    try:
        f = open(path, "rb")
    except OSError as e:
        yield _TarSample(None, error=f"cannot open tar: {e}")
        return
    with f:
        ended_by: list[tarfile.HeaderError] = []

        class RecordingTarInfo(tarfile.TarInfo):
            # tarfile takes a missing, partial or garbled header for the end of the archive, so a tar
            # truncated at a member boundary would look complete; record why header reading stopped
            @classmethod
            def fromtarfile(cls, tar):
                try:
                    return super().fromtarfile(tar)
                except tarfile.HeaderError as e:
                    ended_by.append(e)
                    raise

        try:
            tf = tarfile.open(fileobj=f, mode="r|*", tarinfo=RecordingTarInfo)
        except _TAR_READ_ERRORS as e:
            yield _TarSample(None, error=f"not a readable tar: {e}")
            return
        pending: _TarSample | None = None
        last_name: str | None = None
        seen: dict[str, int] = {}

        def finish(sample: _TarSample) -> _TarSample:
            # keys must be unique in a shard: a key seen before (non-contiguous members) becomes an error
            count = seen.get(sample.key, 0)
            seen[sample.key] = count + 1
            if count:
                return _TarSample(f"{sample.key}#{count + 1}", error=(
                    f"duplicate sample key {sample.key!r} (members of a sample must be contiguous in the tar)"))
            return sample

        while True:
            try:
                info = tf.next()
            except _TAR_READ_ERRORS as e:
                # a bad header: the failing member is unknown; what was read so far is intact
                if pending is not None:
                    yield finish(pending)
                after = f" after member {last_name!r}" if last_name else ""
                yield _TarSample(None, error=f"corrupt tar{after}: {e}")
                return
            if info is None:
                break
            tf.members = []  # stream mode keeps every TarInfo otherwise
            if not info.isreg():
                continue
            split = split_tar_member_name(info.name)
            if split is None:
                logger.debug("%s: skipping member %r (not part of a sample)", path, info.name)
                continue
            key, suffix = split
            try:
                member = tf.extractfile(info)
                data = member.read() if member is not None else b""
            except _TAR_READ_ERRORS as e:
                if pending is not None and pending.key != key:
                    yield finish(pending)
                yield finish(_TarSample(key, error=f"cannot read member {info.name!r} (truncated or corrupt tar): {e}"))
                return
            last_name = info.name
            if pending is not None and pending.key != key:
                yield finish(pending)
                pending = None
            if pending is None:
                pending = _TarSample(key)
            pending.members.append((info, data))

        # a complete tar ends with a zero block
        truncated = None
        if not ended_by or not isinstance(ended_by[-1], tarfile.EOFHeaderError):
            reason = ended_by[-1] if ended_by else "no end-of-archive block"
            after = f" after member {last_name!r}" if last_name else ""
            truncated = f"truncated or corrupt tar{after}: {reason} (offset {tf.offset})"
        if pending is not None:
            yield finish(pending)
        if truncated:
            yield _TarSample(None, error=truncated)


def _tar_sample_suffixes(sample: _TarSample) -> tuple[dict[str, tuple[str, bytes]], str | None]:
    """suffix (lowercase) -> (member name, bytes), and an error for duplicate suffixes."""
    by_suffix: dict[str, tuple[str, bytes]] = {}
    for info, data in sample.members:
        suffix = split_tar_member_name(info.name)[1].lower()
        if suffix in by_suffix:
            return by_suffix, f"duplicate member {info.name!r} in sample {sample.key!r}"
        by_suffix[suffix] = (info.name, data)
    return by_suffix, None


@dataclass(kw_only=True)
class TarShard(Shard):
    """A WebDataset tar: one `Item` per sample; the image member's bytes in `data`, the rest in `extra`."""

    path: str
    kind: ClassVar[str] = "tar"

    def __iter__(self) -> Iterator[Item]:
        for sample in _iter_tar_samples(self.path):
            if sample.key is None:
                logger.warning("%s: %s", self.source, sample.error)
                yield self._shard_error(sample.error)
                continue
            origin = f"{self.source}:{sample.key}"
            if sample.error:
                logger.warning("%s: %s", origin, sample.error)
                yield Item(key=sample.key, source=origin, error=sample.error)
                continue
            by_suffix, error = _tar_sample_suffixes(sample)
            image = next((s for s in TAR_IMAGE_SUFFIXES if s in by_suffix), None)
            sound = any(f".{s}" in AUDIO_EXTENSIONS for s in by_suffix)  # a sound alone is an item too
            if error is None and image is None and not sound:
                error = f"no image member (members: {', '.join(sorted(by_suffix))})"
            if error:
                yield Item(key=sample.key, source=origin, error=error)
                continue
            if image is None:
                yield Item(key=sample.key, source=origin, extra={s: d for s, (_, d) in by_suffix.items()})
                continue
            name, data = by_suffix[image]
            extra = {s: d for s, (_, d) in by_suffix.items() if s != image}
            yield Item(key=sample.key, source=f"{self.source}:{name}", data=data, extra=extra)


def _caption_payload(caption: str | list[str] | tuple[str, ...], suffix: str) -> bytes | None:
    captions = [caption] if isinstance(caption, str) else list(caption)
    if not captions:
        return None
    if suffix.lower().rsplit(".", 1)[-1] == "json":
        return json.dumps({"caption": captions[0], "captions": captions}, ensure_ascii=False).encode("utf-8")
    return captions[0].encode("utf-8")


def write_tar_with_captions(shard: Shard, captions: Mapping[str, str | list[str]], out_path: Path, *,
                            suffix: str = "txt") -> int:
    """Write `shard`'s tar to `out_path` with a ``<key>.<suffix>`` caption member added to each sample.

    Only samples whose key is in `captions` are written, with all their original members (names and
    metadata kept) plus the caption: for ``txt`` the first caption, for ``json`` (or ``*.json``)
    ``{"caption": first, "captions": [...]}``. An original member with the same suffix (e.g. the alt
    text ``.txt`` of img2dataset shards) is replaced. The file is written to a temporary file next to
    `out_path` and renamed into place. Returns the number of samples written.
    """
    if not isinstance(shard, TarShard):
        raise SourceError(f"write-back needs a tar shard; {shard.name!r} ({shard.source}) is a {shard.kind} shard")
    if not suffix or "/" in suffix or suffix.startswith("."):
        raise SourceError(f"caption suffix must be a plain extension like 'txt' or 'json', got {suffix!r}")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent)
    written, used, problems = 0, set(), []
    try:
        with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as out:
            for sample in _iter_tar_samples(shard.path):
                if sample.error:
                    problems.append(f"{sample.key or shard.name}: {sample.error}")
                    continue
                if sample.key not in captions:
                    continue
                payload = _caption_payload(captions[sample.key], suffix)
                used.add(sample.key)
                if payload is None:
                    problems.append(f"{sample.key}: empty caption list")
                    continue
                by_suffix, error = _tar_sample_suffixes(sample)
                if error:
                    problems.append(error)
                    continue
                for info, data in sample.members:
                    if split_tar_member_name(info.name)[1].lower() == suffix.lower():
                        continue  # replaced by the new caption
                    out.addfile(_copy_info(info, len(data)), io.BytesIO(data))
                first = sample.members[0][0]
                info = tarfile.TarInfo(f"{sample.key}.{suffix}")
                info.size, info.mtime, info.mode = len(payload), first.mtime, 0o644
                out.addfile(info, io.BytesIO(payload))
                written += 1
            raw.flush()
            out.close()
            os.fsync(raw.fileno())
        os.replace(tmp, out_path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    missing = len(set(captions) - used)
    if missing:
        logger.warning("%s: %d captioned key(s) not found in the tar", shard.source, missing)
    for problem in problems:
        logger.warning("%s: not written: %s", shard.source, problem)
    logger.info("wrote %s: %d samples with .%s captions", out_path, written, suffix)
    return written


def _copy_info(info: tarfile.TarInfo, size: int) -> tarfile.TarInfo:
    new = tarfile.TarInfo(info.name)
    new.size, new.mtime, new.mode = size, info.mtime, info.mode
    new.uid, new.gid, new.uname, new.gname = info.uid, info.gid, info.uname, info.gname
    new.pax_headers = dict(info.pax_headers)
    return new


# -------------------------------------------------------------------------------------- table shards

def _is_url(value: str) -> bool:
    return bool(_URL_RE.match(value))


def _path_item(key: str, origin: str, value, base_dir: str) -> Item:
    if value is None or (isinstance(value, str) and not value.strip()):
        return Item(key=key, source=origin, error="missing image path")
    value = str(value).strip()
    if _is_url(value):
        return Item(key=key, source=origin, error=f"image is a URL, which is not fetched: {value}")
    path = value if os.path.isabs(value) else os.path.join(base_dir, value)
    if not os.path.isfile(path):
        return Item(key=key, source=origin, error=f"image file not found: {path}")
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
    """A CSV/TSV file with an image path column (paths relative to the file's folder)."""

    path: str
    path_column: str
    key_column: str | None = None
    delimiter: str = ","
    kind: ClassVar[str] = "csv"

    def __iter__(self) -> Iterator[Item]:
        base_dir = os.path.dirname(self.path)
        keys = _KeyTracker(self.key_column)
        index = 0
        try:
            with open(self.path, newline="", encoding="utf-8-sig") as f:
                reader = csv.reader(f, delimiter=self.delimiter)
                header = [h.strip() for h in next(reader, [])]
                path_at = header.index(self.path_column)
                key_at = header.index(self.key_column) if self.key_column else None
                for row in reader:
                    if not any(cell.strip() for cell in row):
                        continue  # blank line
                    origin = f"{self.source}:line {reader.line_num}"
                    key_value = row[key_at] if key_at is not None and key_at < len(row) else None
                    key, key_error = keys.key(index, key_value)
                    if key_error:
                        yield Item(key=key, source=origin, error=key_error)
                    else:
                        yield _path_item(key, origin, row[path_at] if path_at < len(row) else None, base_dir)
                    index += 1
        except (OSError, UnicodeDecodeError, csv.Error, ValueError) as e:
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


def _is_junk(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


def _walk_images(folder: str) -> list[str]:
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not _is_junk(d))
        found.extend(os.path.join(root, f) for f in sorted(files)
                     if not _is_junk(f) and f.lower().endswith(IMAGE_EXTENSIONS))
    return found


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
        for name in PARQUET_BYTES_COLUMNS + PARQUET_PATH_COLUMNS:
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
            raise SourceError(f"{path}: no image column found among {PARQUET_BYTES_COLUMNS + PARQUET_PATH_COLUMNS} "
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
        with open(path, newline="", encoding="utf-8-sig") as f:
            header = next(csv.reader(f, delimiter=delimiter), None)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise SourceError(f"{path}: cannot read table header: {e}") from e
    if not header:
        raise SourceError(f"{path}: empty table (no header row)")
    names = [h.strip() for h in header]
    if image_column is not None:
        if image_column not in names:
            raise SourceError(f"{path}: no column {image_column!r} (columns: {', '.join(names)})")
    else:
        image_column = next((n for n in CSV_PATH_COLUMNS if n in names), None)
        if image_column is None:
            hint = ("; its 'url' column is not fetched: download the images first (e.g. with img2dataset)"
                    if "url" in names else "")
            raise SourceError(f"{path}: no image path column found among {CSV_PATH_COLUMNS} "
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
                images = _walk_images(path)
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
