"""WebDataset tar shards: reading samples (`TarShard`) and writing a tar back with captions added
(`write_tar_with_captions`).

Tar samples follow the WebDataset convention: members are grouped by key, the member path up to the
first dot of its base name (``a/b/000123.jpg`` + ``a/b/000123.json`` -> key ``a/b/000123``), and a
sample's members must be contiguous in the tar. Tars are read with the standard `tarfile` module: the
`webdataset` package's reader cannot tell a tar truncated at a member boundary from a complete one and
imports torch, so only its naming convention is reproduced here.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Iterator, Mapping

from captioner.data.folders import AUDIO_EXTENSIONS
from captioner.errors import SourceError
from captioner.files import atomic_write
from captioner.shards.items import Item, Shard

logger = logging.getLogger("captioner.shards.sources")

# image members of a tar sample, in order of preference
TAR_IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp", "bmp", "gif")
TAR_SUFFIXES = (".tar", ".tgz", ".tar.gz")
_TAR_READ_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error, ValueError)


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
    written, used, problems = 0, set(), []

    def write(raw) -> None:
        nonlocal written
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as out:
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

    atomic_write(out_path, write)
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
