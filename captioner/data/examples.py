"""Caption-set rows and their checks: `CaptionExample`, `ReadReport`, the input limits, caption cleaning,
path containment, and the reporter every reader uses for problem rows.

A reader reports a problem row as "WHERE: reason" (WHERE is FILE:LINE, or "FILE: images[3]" for JSON
documents), skips and counts it; `strict=True` raises DataError on the first one instead.
"""

from __future__ import annotations

import logging
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from captioner.errors import DataError

logger = logging.getLogger("captioner.data")

# Input limits (documented in README "Limits"): rows over them are reported and skipped, files over
# them are errors.
MAX_CAPTION_CHARS = 1000  # characters in one caption
MAX_REFERENCES = 100  # reference captions in one row
MAX_FILE_BYTES = 4 * 2**30  # a caption-set, reference or prediction file read whole (COCO Karpathy: 140 MB)
MAX_PATH_BYTES = 4096  # a path named in a data file (Linux PATH_MAX); longer ones are refused unresolved
MAX_NAME_CHARS = 200  # characters of a name quoted in a message


@dataclass
class CaptionExample:
    """One captioned item: an image, a sound, or both (a video frame with its soundtrack)."""

    image_id: str  # the item's id (named after images for COCO compatibility; audio-only sets use it too)
    image: str | None  # path to the image file, None for audio-only items
    captions: list[str]
    split: str = "train"
    audio: str | None = None  # path to the audio file, None for image-only items

    @property
    def inputs(self) -> dict[str, str]:
        """{modality: path} of the inputs this item has ("image", "audio")."""
        return {m: p for m, p in (("image", self.image), ("audio", self.audio)) if p is not None}


@dataclass
class ReadReport:
    """What a reader skipped, with reasons, and what it changed (`notes`: cleaned captions, merged rows)."""

    source: str
    kept: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return f"{self.source}: {self.kept} items kept, {len(self.problems)} rows skipped"


class Reporter:
    """bad(where, reason): record "where: reason" in the report, or raise it when strict.
    bad.note(where, what): record a change made to a kept row (never raises)."""

    def __init__(self, report: ReadReport, strict: bool):
        self.report, self.strict = report, strict

    def __call__(self, where: str, reason: str) -> None:
        msg = f"{where}: {reason}"
        if self.strict:
            raise DataError(msg)
        self.report.problems.append(msg)

    def note(self, where: str, what: str) -> None:
        self.report.notes.append(f"{where}: {what}")


Bad = Callable[[str, str], None]


def raise_bad(where: str, reason: str) -> None:
    """A `Bad` for all-or-nothing files: the first problem is a DataError."""
    raise DataError(f"{where}: {reason}")


def finish(report: ReadReport, examples: list[CaptionExample], what: str = "no usable rows"
           ) -> tuple[list[CaptionExample], ReadReport]:
    """Log the report (first 20 problems and notes) and return; no examples at all is a DataError."""
    report.kept = len(examples)
    for n in report.notes[:20]:
        logger.warning(n)
    if len(report.notes) > 20:
        logger.warning("%s: %d more rows changed", report.source, len(report.notes) - 20)
    if report.problems:
        for p in report.problems[:20]:
            logger.warning(p)
        logger.warning(report.summary())
    if not examples:
        raise DataError(f"{report.source}: {what} ({len(report.problems)} skipped)")
    return examples, report


def is_utf8(text: str) -> bool:
    """False for strings holding lone surrogates: undecodable bytes (surrogateescape) or JSON '\\ud800'."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def is_id(value) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, str) and value != "")


def short(name, limit: int = MAX_NAME_CHARS) -> str:
    """repr(name) for a message, cut to `limit` characters with an ellipsis (names may be megabytes)."""
    text = repr(name[:limit + 1] if isinstance(name, str) else name)
    return text if len(text) <= limit else text[:limit] + "..."


def _visible(c: str) -> bool:
    # format characters (zero-width, BOM, bidi controls: category Cf) and whitespace show nothing alone
    return not c.isspace() and unicodedata.category(c) != "Cf"


def clean_caption(text: str) -> tuple[str, bool]:
    """(cleaned caption, whether characters other than whitespace were removed). Whitespace runs become
    one space; control characters (NUL, escape, ...) are removed; invisible characters (zero-width, BOM,
    bidi controls) are removed at both ends, so a caption of only those is empty. Inside a caption they
    stay: they join emoji and shape some scripts."""
    out = " ".join(text.split())
    if any(unicodedata.category(c) == "Cc" for c in out):
        out = " ".join("".join(c for c in out if unicodedata.category(c) != "Cc").split())
    start, end = 0, len(out)
    while start < end and not _visible(out[start]):
        start += 1
    while end > start and not _visible(out[end - 1]):
        end -= 1
    cleaned = out[start:end]
    return cleaned, len(cleaned) != len(" ".join(text.split()))


def clean_captions(value, *, allow_list: bool = True, note: Callable[[str], None] | None = None
                   ) -> tuple[list[str], str | None]:
    """One row's caption(s) -> (captions, None), or ([], reason). Captions are cleaned (`clean_caption`;
    `note` is told when characters were removed) and empty ones dropped; a non-string, non-UTF-8 or
    over-long caption rejects the whole row."""
    caps = [value] if isinstance(value, str) else value
    if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps) or (
            not allow_list and not isinstance(value, str)):
        return [], "caption must be a string" + (" or a list of strings" if allow_list else "")
    if not all(is_utf8(c) for c in caps):
        return [], "caption is not valid UTF-8"
    cleaned = [clean_caption(c) for c in caps]
    changed = sum(1 for c, removed in cleaned if removed)
    caps = [c for c, _ in cleaned if c]
    if not caps:
        return [], "no non-empty caption" + (" (only invisible or control characters)" if changed else "")
    if any(len(c) > MAX_CAPTION_CHARS for c in caps):
        return [], f"caption longer than {MAX_CAPTION_CHARS} characters"
    if len(caps) > MAX_REFERENCES:
        return [], f"more than {MAX_REFERENCES} captions in one row"
    if changed and note is not None:
        note(f"removed control or invisible characters from {changed} caption(s)")
    return caps, None


def inside(root: Path, path: Path) -> bool:
    """Whether `path` resolves to somewhere under `root` (resolved too)."""
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def path_problem(name, what: str) -> str | None:
    """Why `name` cannot be a path named in a data file (not a non-empty string, not UTF-8, a NUL, longer
    than `MAX_PATH_BYTES`), else None. Checked before anything touches the file system."""
    if not isinstance(name, str) or not name.strip():
        return f"{what} path must be a non-empty string"
    if not is_utf8(name):
        return f"{what} path is not valid UTF-8"
    if "\x00" in name:
        return f"{what} path {short(name)} contains a NUL character"
    if len(name) > MAX_PATH_BYTES or len(name.encode("utf-8")) > MAX_PATH_BYTES:
        return f"{what} path {short(name)} is longer than {MAX_PATH_BYTES} bytes"
    return None


def contained(root: Path, name: str, what: str) -> tuple[str, str | None]:
    """`root / name` -> (path, None) when it stays inside `root` (no absolute paths, no '..' or symlink
    escapes), else ("", reason). `name` passed `path_problem`."""
    path = root / name
    try:
        ok = not Path(name).is_absolute() and inside(root, path)
    except (OSError, RuntimeError) as e:  # RuntimeError: symlink loop
        return "", f"{what} path {short(name)} cannot be resolved ({e})"
    if not ok:
        return "", f"{what} path {short(name)} escapes the dataset folder"
    return str(path), None


def check_file(root: Path, name, *, must_exist: bool, what: str = "image") -> tuple[str, str | None]:
    """An input path relative to the dataset root -> (path, None), or ("", reason); `what` ("image" or
    "audio") names it in the reason. The path must stay inside the root (`contained`); the file must
    exist when `must_exist`."""
    reason = path_problem(name, what)
    if reason is not None:
        return "", reason
    path, reason = contained(root, name, what)
    if reason is not None or not must_exist:
        return path, reason
    try:
        found = Path(path).is_file()
    except OSError as e:
        return "", f"{what} file {short(name)} unreadable ({e.strerror or e})"
    if not found:
        return "", f"{what} file {short(name)} not found"
    return path, None
