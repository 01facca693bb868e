"""The shard plan of a sharded run and the merge of its outputs (run.py captions the shards).

Plan: OUT/shards.json lists the run's shards in order, each with a fingerprint of what is in it: its
settings and input names, plus the size and mtime of the file it reads (tar, parquet, CSV; loose files
are identified by their names, which are not stat'ed). Before a shard is captioned its fingerprint goes
to OUT/shards/<shard>.plan. A rerun whose shard has another fingerprint (files added to a folder,
another files-per-shard, a rewritten tar) drops that shard's outputs and captions it again, and rank 0
removes the outputs of shards no longer in the plan. A shard is done only when its .done marker is
readable and its .plan matches the plan.

Merge: once every shard is done, OUT/captions.jsonl is written by streaming the shard outputs (each
(shard, key) once; memory is bounded by one shard's keys), then OUT/index.json with the captions file's
size and SHA-256. A kill between the two renames leaves an index that does not describe the captions
file: `read_index` refuses it and the next merge rewrites both. Merges are serialised by a lock file;
temporary files of killed merges are removed by the next one. A bad input (missing folder, unreadable
marker, corrupt row) is one line naming the file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Iterator, Sequence

from captioner.errors import FileSystemError, OutputError
from captioner.files import TMP_SUFFIX, atomic_write
from captioner.shards.outputs import iter_json_rows, json_line

logger = logging.getLogger(__name__)

PLAN_FORMAT = 2
# Per-shard files in OUT/shards (longest suffix first, so "x.errors.jsonl" is shard "x").
SHARD_SUFFIXES = (".errors.jsonl", ".jsonl", ".done", ".plan")


# ---------------------------------------------------------------------------------------------- plan

def shard_fingerprint(shard) -> str:
    """What identifies a shard's content: its type and settings (file lists included), and the size and
    mtime of the one file a tar/parquet/CSV shard reads."""
    settings = {k: v for k, v in vars(shard).items() if k != "batch_size"}  # read size: not content
    stat = None
    if isinstance(getattr(shard, "path", None), str):
        with contextlib.suppress(OSError):
            st = os.stat(shard.path)
            stat = [st.st_size, st.st_mtime_ns]
    text = json.dumps([type(shard).__name__, settings, stat], sort_keys=True, default=str)  # ASCII: escapes any name
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def make_plan(shards: Sequence) -> list[dict]:
    """[{name, source, fingerprint}] for the shards, in order."""
    names = [s.name for s in shards]
    if len(set(names)) != len(names):
        raise ValueError("shard names are not unique")
    return [{"name": s.name, "source": s.source, "fingerprint": shard_fingerprint(s)} for s in shards]


def _shard_files(out_dir: Path, name: str) -> list[Path]:
    return [out_dir / "shards" / f"{name}{suffix}" for suffix in (".done", ".jsonl", ".errors.jsonl")] + \
        [out_dir / "wds" / f"{name}.tar"]


def _unlink(paths: Sequence[Path]) -> int:
    removed = 0
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            removed += 1
    return removed


def write_plan(out_dir: Path, plan: list[dict]) -> None:
    """Record the plan in OUT/shards.json and remove the outputs of shards that are not in it."""
    atomic_write(out_dir / "shards.json", json.dumps({"format": PLAN_FORMAT, "shards": plan}, indent=0) + "\n")
    names = {e["name"] for e in plan}
    stale = []
    for p in sorted((out_dir / "shards").iterdir()):
        name = next((p.name[:-len(s)] for s in SHARD_SUFFIXES if p.name.endswith(s)), None)
        if name is not None and not p.name.startswith(".") and name not in names:
            stale.append(p)
    if (out_dir / "wds").is_dir():
        stale += [p for p in (out_dir / "wds").glob("*.tar") if p.stem not in names]
    if stale:
        logger.info("removing %d output file(s) of shards no longer in the plan (e.g. %s)", _unlink(stale), stale[0])


def read_plan(out_dir: Path) -> list[dict]:
    """The plan in OUT/shards.json; a list of names (older runs) gives entries without fingerprints."""
    path = out_dir / "shards.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OutputError(f"{path}: missing; not the output folder of a sharded captioning run") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise OutputError(f"{path}: unreadable ({e})") from None
    if isinstance(data, list) and all(isinstance(n, str) for n in data):
        return [{"name": n, "fingerprint": None} for n in data]
    shards = data.get("shards") if isinstance(data, dict) else None
    if not (isinstance(shards, list) and all(isinstance(e, dict) and isinstance(e.get("name"), str) for e in shards)):
        raise OutputError(f"{path}: not a shard plan")
    return shards


def _recorded_fingerprint(out_dir: Path, name: str) -> str | None:
    try:
        return json.loads((out_dir / "shards" / f"{name}.plan").read_text(encoding="utf-8"))["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _read_done(path: Path) -> dict:
    """A shard's .done marker; OutputError naming the file if it cannot be read."""
    try:
        done = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise OutputError(f"{path}: unreadable shard marker ({e.__class__.__name__})") from None
    if not (isinstance(done, dict) and isinstance(done.get("failed"), int) and "source" in done):
        raise OutputError(f"{path}: not a shard marker")
    return done


def prepare_shard(out_dir: Path, entry: dict) -> bool:
    """True if the shard is done with the planned inputs; otherwise make it ready to (re)caption:
    outputs of other inputs are dropped (the .done marker first) and the new fingerprint recorded."""
    name = entry["name"]
    if _recorded_fingerprint(out_dir, name) != entry["fingerprint"]:
        if _unlink(_shard_files(out_dir, name)):
            logger.warning("shard %s: its inputs changed since it was captioned; captioning it again", name)
        atomic_write(out_dir / "shards" / f"{name}.plan",
                     json.dumps({"shard": name, "fingerprint": entry["fingerprint"]}) + "\n")
        return False
    done = out_dir / "shards" / f"{name}.done"
    if not done.exists():
        return False
    try:
        _read_done(done)
    except OutputError as e:
        logger.warning("%s; continuing the shard", e)
        done.unlink()
        return False
    return True


# --------------------------------------------------------------------------------------------- merge

@contextlib.contextmanager
def _merge_lock(out_dir: Path) -> Iterator[None]:
    """One merge at a time per folder (POSIX lock: released when the process ends, however it ends)."""
    fd = os.open(out_dir / ".merge.lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _remove_stale_temporaries(out_dir: Path) -> None:
    """Temporary files of merges killed before their rename (we hold the merge lock: none is live)."""
    stale = [p for name in ("captions.jsonl", "index.json") for p in out_dir.glob(f".{name}.*{TMP_SUFFIX}")]
    if stale:
        logger.info("removing %d temporary file(s) of an interrupted merge", _unlink(stale))


def _problems(out_dir: Path, problems: list[str]) -> OutputError:
    for line in problems:
        logger.error("%s", line)
    more = f" (and {len(problems) - 1} more, listed above)" if len(problems) > 1 else ""
    return OutputError(f"cannot merge {out_dir}: {problems[0]}{more}")


def merge(out_dir: str | Path, plan: Sequence[dict] | None = None) -> dict | None:
    """If every shard of the plan (default: OUT/shards.json) is done, write OUT/captions.jsonl (each
    (shard, key) once) and OUT/index.json, and return the index. Idempotent; returns None (and
    changes nothing) while shards are pending."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise OutputError(f"{out_dir}: no such folder")
    plan = read_plan(out_dir) if plan is None else plan
    try:
        with _merge_lock(out_dir):
            return _merge_locked(out_dir, plan)
    except OSError as e:
        raise FileSystemError(f"{out_dir}: cannot merge: {e.strerror or e}") from None


def _merge_locked(out_dir: Path, plan: Sequence[dict]) -> dict | None:
    _remove_stale_temporaries(out_dir)
    shard_dir = out_dir / "shards"
    pending = [e["name"] for e in plan if not (shard_dir / f"{e['name']}.done").exists()
               or (e.get("fingerprint") is not None and _recorded_fingerprint(out_dir, e["name"]) != e["fingerprint"])]
    if pending:
        logger.info("merge: %d of %d shards pending (e.g. %s); rerun the job to finish them", len(pending),
                    len(plan), ", ".join(pending[:3]))
        return None
    problems, index = [], {}
    for e in plan:
        try:
            done = _read_done(shard_dir / f"{e['name']}.done")
            index[e["name"]] = {"rows": 0, "failed": done["failed"], "source": done["source"]}
        except OutputError as err:
            problems.append(str(err))
    if problems:
        raise _problems(out_dir, problems)
    digest, size = hashlib.sha256(), 0

    def write(f) -> None:
        nonlocal size
        for name, entry in index.items():
            path, seen = shard_dir / f"{name}.jsonl", set()
            try:
                for lineno, row in iter_json_rows(path):
                    if not isinstance(row.get("key"), str) or "caption" not in row:
                        raise OutputError(f"{path}:{lineno}: not a caption row")
                    if row["key"] in seen:
                        continue
                    seen.add(row["key"])
                    line = json_line({"shard": name, **row})
                    f.write(line)
                    digest.update(line)
                    size += len(line)
                    entry["rows"] += 1
            except OutputError as err:
                problems.append(str(err))
            except UnicodeDecodeError:
                problems.append(f"{path}: not UTF-8")
            except FileNotFoundError:
                problems.append(f"{path}: missing although the shard is marked done")
        if problems:  # raised inside the writer, so no captions file is left behind
            raise _problems(out_dir, problems)

    atomic_write(out_dir / "captions.jsonl", write)
    rows = sum(v["rows"] for v in index.values())
    result = {"shards": index, "rows": rows, "failed": sum(v["failed"] for v in index.values()),
              "captions": {"file": "captions.jsonl", "bytes": size, "sha256": digest.hexdigest()}}
    atomic_write(out_dir / "index.json", json.dumps(result, indent=1) + "\n")
    logger.info("merged %d shards: %d captions -> %s", len(index), rows, out_dir / "captions.jsonl")
    return result


def read_index(out_dir: str | Path) -> dict:
    """OUT/index.json, checked against OUT/captions.jsonl (size and SHA-256): OutputError if they disagree
    (a merge was interrupted between its two renames) or the index is missing or unreadable."""
    out_dir = Path(out_dir)
    path = out_dir / "index.json"
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        expected = (index["captions"]["bytes"], index["captions"]["sha256"])
        digest, size = hashlib.sha256(), 0
        with open(out_dir / "captions.jsonl", "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
                size += len(chunk)
    except FileNotFoundError as e:
        raise OutputError(f"{e.filename}: missing; merge the run first") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise OutputError(f"{path}: not an index of a merged run ({e.__class__.__name__})") from None
    if (size, digest.hexdigest()) != expected:
        raise OutputError(f"{path}: does not describe {out_dir / 'captions.jsonl'} (a merge was interrupted); "
                          f"merge again")
    return index
