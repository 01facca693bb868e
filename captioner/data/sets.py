"""Caption sets, image loading and input collection.

A caption set is a list of `CaptionExample` (item id, image and/or audio path, reference captions).
Readers report problem rows with file and line, skip them and count them; `strict=True` makes them errors.

Formats: HF imagefolder (`read_imagefolder`; rows with an image, an audio file or both), COCO captions
JSON (`read_coco_captions`), Karpathy split JSON (`read_karpathy`), CSV/TSV/JSONL tables with image and/or
audio columns (`read_caption_table`), Clotho and AudioCaps audio-caption CSVs (`read_clotho`,
`read_audiocaps`), any Hugging Face `datasets` dataset with an image and/or an audio column
(`read_hf_dataset`: save_to_disk directories, local data files, hf:NAME); `load_caption_set` picks one by
path (and a CSV by its header).
For scoring: `load_references` ({item id: [captions]}) and `read_predictions` ({item id: caption}).
Input collection for captioning: `collect_images`, `collect_audio`.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import glob
import io
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Callable, Iterable, Iterator, NamedTuple, Sequence

from PIL import Image, UnidentifiedImageError

from captioner.errors import DataError  # noqa: F401  (defined in errors.py)
from captioner.inputs.image import ImageError, load_image  # noqa: F401  (re-exported: the data layer's image reader)

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif", ".au")
# Input limits (documented in README "Limits"): rows over them are reported and skipped, files over
# them are errors.
MAX_CAPTION_CHARS = 1000  # characters in one caption
MAX_REFERENCES = 100  # reference captions in one row
MAX_FILE_BYTES = 4 * 2**30  # a caption-set, reference or prediction file read whole (COCO Karpathy: 140 MB)



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
    """What a reader skipped, with reasons."""

    source: str
    kept: int = 0
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return f"{self.source}: {self.kept} items kept, {len(self.problems)} rows skipped"


def collect_images(inputs: Sequence[str]) -> tuple[list[str], list[str]]:
    """Expand files, folders (recursively, image extensions only) and globs.
    Returns (paths, errors); an input that matches nothing is an error line."""
    return _collect(inputs, IMAGE_EXTENSIONS, "images")


def collect_audio(inputs: Sequence[str]) -> tuple[list[str], list[str]]:
    """`collect_images` for sound files: folders yield files with `AUDIO_EXTENSIONS`."""
    return _collect(inputs, AUDIO_EXTENSIONS, "audio files")


def _collect(inputs: Sequence[str], extensions: Sequence[str], what: str) -> tuple[list[str], list[str]]:
    paths, errors = [], []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(
                str(p) for p in Path(item).rglob("*") if p.suffix.lower() in extensions and p.is_file()
            )
            if not found:
                errors.append(f"{item}: folder holds no {what} ({', '.join(extensions)})")
            paths.extend(found)
        elif glob.has_magic(item):
            found = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
            if not found:
                errors.append(f"{item}: pattern matches no file")
            paths.extend(found)
        else:
            paths.append(item)  # files are checked when opened, so the error names the reason
    return paths, errors


def _inside(root: Path, path: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def read_imagefolder(root: str | Path, split: str | None = None, *, strict: bool = False
                     ) -> tuple[list[CaptionExample], ReadReport]:
    """HF imagefolder layout: `root[/split]/metadata.jsonl`, one JSON object per line with `file_name` (an
    image), `audio_file` (a sound) or both, and `captions` (a list) or `caption` (a string). Paths are
    relative to the metadata's folder and must stay inside it. The id is the stem of `file_name`, else of
    `audio_file`, prefixed with "split/" when a split is given. Each row is one example."""
    folder = Path(root) / split if split else Path(root)
    if not (folder / "metadata.jsonl").exists():
        raise DataError(f"{folder / 'metadata.jsonl'}: missing (an imagefolder caption set needs metadata.jsonl)")
    return _imagefolder_table(folder, split, strict=strict, require_files=True, group=False)


# ------------------------------------------------------------------ more caption-set formats
#
# Every reader below returns (examples, ReadReport) like `read_imagefolder`: a problem row is reported as
# "FILE:LINE: reason" (JSON documents, which have no rows, as "FILE: images[3]: reason"), skipped and
# counted; strict=True raises DataError on the first one. `require_images=False` / `require_files=False`
# (references for scoring) skips the image- and audio-file checks; paths must still stay inside the root.

KARPATHY_SPLITS = ("train", "restval", "val", "test", "train+restval")
TABLE_IMAGE_COLUMNS = ("image", "file_name", "image_id", "id")  # tried in order when no column is named
TABLE_AUDIO_COLUMNS = ("audio", "audio_file")  # an optional audio column, tried in order when none is named
TABLE_CAPTION_COLUMNS = ("caption", "captions")
PREDICTION_ID_KEYS = ("image_id", "id", "image")  # first present wins
_TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson")
_REFERENCE_FORMATS = ("COCO captions JSON ('images' + 'annotations'), Karpathy split JSON ('images' with "
                      "'sentences'), an imagefolder directory (metadata.jsonl, optionally in a split folder), "
                      "a Clotho or AudioCaps captions .csv, or a .csv/.tsv/.jsonl table with image and/or audio "
                      "and caption columns")
_CAPTION_SET_FORMATS = ("an imagefolder directory (metadata.jsonl), a COCO captions or Karpathy split .json, "
                        "a Clotho (file_name,caption_1,...) or AudioCaps (audiocap_id,youtube_id,start_time,"
                        "caption) .csv, a .csv/.tsv/.jsonl table with image and/or audio columns, or a "
                        "`datasets` dataset with images (a save_to_disk directory, a .parquet/.arrow file, or "
                        "hf:OWNER/NAME)")

_Bad = Callable[[str, str], None]


def _reporter(report: ReadReport, strict: bool) -> _Bad:
    """bad(where, reason): record "where: reason" in the report, or raise it when strict."""
    def bad(where: str, reason: str) -> None:
        msg = f"{where}: {reason}"
        if strict:
            raise DataError(msg)
        report.problems.append(msg)
    return bad


def _raise(where: str, reason: str) -> None:
    raise DataError(f"{where}: {reason}")


def _finish(report: ReadReport, examples: list[CaptionExample], what: str = "no usable rows"
            ) -> tuple[list[CaptionExample], ReadReport]:
    report.kept = len(examples)
    if report.problems:
        for p in report.problems[:20]:
            logger.warning(p)
        logger.warning(report.summary())
    if not examples:
        raise DataError(f"{report.source}: {what} ({len(report.problems)} skipped)")
    return examples, report


def _is_utf8(text: str) -> bool:
    """False for strings holding lone surrogates: undecodable bytes (surrogateescape) or JSON '\\ud800'."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _is_id(value) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, str) and value != "")


def _clean_captions(value, *, allow_list: bool = True) -> tuple[list[str], str | None]:
    """One row's caption(s) -> (captions, None), or ([], reason). Whitespace is normalised and empty
    captions are dropped; a non-string, non-UTF-8 or over-long caption rejects the whole row."""
    caps = [value] if isinstance(value, str) else value
    if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps) or (
            not allow_list and not isinstance(value, str)):
        return [], "caption must be a string" + (" or a list of strings" if allow_list else "")
    if not all(_is_utf8(c) for c in caps):
        return [], "caption is not valid UTF-8"
    caps = [c for c in (" ".join(c.split()) for c in caps) if c]
    if not caps:
        return [], "no non-empty caption"
    if any(len(c) > MAX_CAPTION_CHARS for c in caps):
        return [], f"caption longer than {MAX_CAPTION_CHARS} characters"
    if len(caps) > MAX_REFERENCES:
        return [], f"more than {MAX_REFERENCES} captions in one row"
    return caps, None


def _check_file(root: Path, name, *, must_exist: bool, what: str = "image") -> tuple[str, str | None]:
    """An input path relative to the dataset root -> (path, None), or ("", reason); `what` ("image" or
    "audio") names it in the reason. The path must stay inside the root (no absolute paths, no '..' or
    symlink escapes); the file must exist when `must_exist`."""
    if not isinstance(name, str) or not name.strip():
        return "", f"{what} path must be a non-empty string"
    if not _is_utf8(name):
        return "", f"{what} path is not valid UTF-8"
    if "\x00" in name:
        return "", f"{what} path {name!r} contains a NUL character"
    path = root / name
    try:
        inside = not Path(name).is_absolute() and _inside(root, path)
    except (OSError, RuntimeError) as e:  # RuntimeError: symlink loop
        return "", f"{what} path {name!r} cannot be resolved ({e})"
    if not inside:
        return "", f"{what} path {name!r} escapes the dataset folder"
    if must_exist:
        try:
            found = path.is_file()
        except OSError as e:
            return "", f"{what} file {name!r} unreadable ({e.strerror or e})"
        if not found:
            return "", f"{what} file {name!r} not found"
    return str(path), None


def _read_bytes(path: Path) -> bytes:
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise DataError(f"{path}: larger than {MAX_FILE_BYTES / 2**30:.0f} GiB (MAX_FILE_BYTES); split it")
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not a file") from None
    except PermissionError:
        raise DataError(f"{path}: permission denied") from None
    except OSError as e:
        raise DataError(f"{path}: unreadable ({e.strerror or e})") from None


def _load_json(path: Path):
    """A whole JSON document, or DataError naming the file (and the line of a syntax error)."""
    raw = _read_bytes(path)
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


def _json_kind(data) -> str | None:
    """'coco', 'karpathy' or None for a parsed JSON document."""
    if not isinstance(data, dict):
        return None
    if "annotations" in data:
        return "coco"
    images = data.get("images")
    if isinstance(images, list):
        return "karpathy" if any(isinstance(im, dict) and "sentences" in im for im in images) else "coco"
    return None


def _jsonl_rows(path: Path, raw: bytes, bad: _Bad) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank JSONL line; other lines go to bad()."""
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        if lineno == 1:
            line = line.removeprefix(codecs.BOM_UTF8)
        try:
            text = line.decode("utf-8").strip()
        except UnicodeDecodeError:
            bad(f"{path}:{lineno}", "not valid UTF-8")
            continue
        if not text:
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            bad(f"{path}:{lineno}", f"invalid JSON ({e.msg})")
            continue
        except (ValueError, RecursionError) as e:
            bad(f"{path}:{lineno}", f"invalid JSON ({type(e).__name__})")
            continue
        if not isinstance(row, dict):
            bad(f"{path}:{lineno}", "row must be a JSON object")
            continue
        yield lineno, row


def _csv_records(path: Path, raw: bytes, delimiter: str, bad: _Bad) -> Iterator[tuple[int, list[str]]]:
    """(first line number, fields) for each non-blank CSV record. Line numbers are the file's own, also
    when a quoted field spans lines. Undecodable bytes become lone surrogates (see `_is_utf8`)."""
    text = raw.decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
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
        start, prev = prev + 1, reader.line_num
        if any(field.strip() for field in record):
            yield start, record


def _table_format(path: Path, raw: bytes) -> str:
    """'jsonl', 'tsv' or 'csv': by extension, else by content (a leading '{', more tabs than commas)."""
    ext = path.suffix.lower()
    if ext in (".jsonl", ".ndjson"):
        return "jsonl"
    if ext == ".tsv":
        return "tsv"
    head = raw[:65536].removeprefix(codecs.BOM_UTF8)
    if ext != ".csv" and head.lstrip()[:1] == b"{":
        return "jsonl"
    first = head.lstrip(b"\r\n").split(b"\n", 1)[0]
    return "tsv" if first.count(b"\t") > first.count(b",") else "csv"


def _csv_rows(path: Path, raw: bytes, delimiter: str, bad: _Bad, what: str
              ) -> tuple[int, list[str], Iterator[tuple[str, dict[str, str]]]]:
    """(header line, header, rows) of a CSV/TSV with a header row; rows are (where, {column: field}), and
    records with another number of fields go to bad(). An empty file is a DataError: `what` needs a header."""
    records = _csv_records(path, raw, delimiter, bad)
    first = next(records, None)
    if first is None:
        raise DataError(f"{path}: empty file ({what} needs a header row)")
    header_line, header = first
    header = [h.strip() for h in header]
    index = {h: i for i, h in reversed(list(enumerate(header)))}  # a repeated column name means its first one

    def rows() -> Iterator[tuple[str, dict[str, str]]]:
        for lineno, record in records:
            where = f"{path}:{lineno}"
            if len(record) != len(header):
                bad(where, f"row has {len(record)} fields, the header has {len(header)} "
                           "(unquoted delimiter in a caption?)")
                continue
            yield where, {h: record[i] for h, i in index.items()}
    return header_line, header, rows()


def _table_keys(present: Iterable[str], image_columns: Sequence[str], audio_columns: Sequence[str],
                caption_columns: Sequence[str]) -> tuple[str | None, str | None, str | None]:
    """(image key, audio key, caption key): the first candidate of each among `present`, or None."""
    present = set(present)
    audio_key = next((c for c in audio_columns if c in present), None)
    if audio_key is not None and len(image_columns) > 1:
        # auto-detected next to an audio column, an id column names the item, not an image file
        image_columns = [c for c in image_columns if c not in ("image_id", "id")]
    return (next((c for c in image_columns if c in present), None), audio_key,
            next((c for c in caption_columns if c in present), None))


def _table_rows(path: Path, raw: bytes, fmt: str, image_columns: Sequence[str], audio_columns: Sequence[str],
                caption_columns: Sequence[str], bad: _Bad
                ) -> Iterator[tuple[str, dict, str | None, str | None, str | None]]:
    """(where, row, image key, audio key, caption key) for each table row; keys are None when the row (a
    JSONL line) or the header (CSV/TSV) lacks them. A header needs a caption column and an image or audio
    column; an audio column named by the caller (the only candidate) must be there."""
    if fmt == "jsonl":
        for lineno, row in _jsonl_rows(path, raw, bad):
            yield (f"{path}:{lineno}", row, *_table_keys(row, image_columns, audio_columns, caption_columns))
        return
    header_line, header, rows = _csv_rows(path, raw, "\t" if fmt == "tsv" else ",", bad,
                                          f"a {fmt.upper()} caption table")
    image_key, audio_key, caption_key = _table_keys(header, image_columns, audio_columns, caption_columns)
    has = f"the header has {', '.join(map(repr, header))}"
    if audio_key is None and len(audio_columns) == 1:
        raise DataError(f"{path}:{header_line}: no audio column {audio_columns[0]!r} ({has})")
    if image_key is None and audio_key is None:
        nor = f"; nor an audio column: {', '.join(map(repr, audio_columns))}" if audio_columns else ""
        raise DataError(f"{path}:{header_line}: no image column (looked for "
                        f"{', '.join(map(repr, image_columns))}{nor}; {has})")
    if caption_key is None:
        raise DataError(f"{path}:{header_line}: no caption column (looked for "
                        f"{', '.join(map(repr, caption_columns))}; {has})")
    for where, row in rows:
        yield where, row, image_key, audio_key, caption_key


def _row_inputs(row: dict, image_key: str | None, audio_key: str | None) -> dict[str, object]:
    """{"image"/"audio": cell} of the inputs a table row gives. Next to an audio column an empty cell is no
    input (an audio-only row of an image+audio table); without one, the image cell is taken as it is, so an
    empty image is reported as such. JSONL integer ids become strings."""
    if audio_key is None:
        cells = {"image": row[image_key]} if image_key is not None else {}
    else:
        cells = {m: row[k] for m, k in (("image", image_key), ("audio", audio_key))
                 if k is not None and row[k] is not None and not (isinstance(row[k], str) and not row[k].strip())}
    return {m: str(v) if _is_id(v) and not isinstance(v, str) else v for m, v in cells.items()}


def _read_table(path: Path, *, image_columns: Sequence[str], caption_columns: Sequence[str],
                audio_columns: Sequence[str] = (), strict: bool, require_images: bool, split: str,
                image_id: Callable[[str], str] | None = None, group: bool = True
                ) -> tuple[list[CaptionExample], ReadReport]:
    """Shared body of `read_caption_table` and the imagefolder readers. Each row needs a caption and an
    image or audio path; the id comes from the image path, else the audio path (`image_id` of it, default:
    the path normalised). With `group`, rows with the same id are one example (the first row's files)."""
    raw = _read_bytes(path)
    fmt = _table_format(path, raw)
    report = ReadReport(source=str(path))
    bad = _reporter(report, strict)
    root = path.parent
    examples: list[CaptionExample] = []
    by_id: dict[str, CaptionExample] = {}
    for where, row, image_key, audio_key, caption_key in _table_rows(path, raw, fmt, image_columns, audio_columns,
                                                                     caption_columns, bad):
        cells = _row_inputs(row, image_key, audio_key)
        if not cells:  # (an empty cell counts as no field where audio may stand in for the image)
            audio = f" or an audio field ({' or '.join(map(repr, audio_columns))})" if audio_columns else ""
            bad(where, f"row needs an image field ({' or '.join(map(repr, image_columns))}){audio}")
            continue
        if caption_key is None:
            bad(where, f"row needs a caption field ({' or '.join(map(repr, caption_columns))})")
            continue
        caps, reason = _clean_captions(row[caption_key])
        paths: dict[str, str] = {}
        for modality, name in cells.items():
            if reason is None:
                paths[modality], reason = _check_file(root, name, must_exist=require_images, what=modality)
        if reason is not None:
            bad(where, reason)
            continue
        name = cells.get("image", cells.get("audio"))
        key = image_id(name) if image_id else os.path.normpath(name).replace(os.sep, "/")
        if group and key in by_id:
            by_id[key].captions.extend(caps)
            continue
        by_id[key] = CaptionExample(image_id=key, image=paths.get("image"), captions=caps, split=split,
                                    audio=paths.get("audio"))
        examples.append(by_id[key])
    return _finish(report, examples)


def read_caption_table(path: str | Path, *, image_column: str | None = "image", caption_column: str | None = "caption",
                       audio_column: str | None = None, strict: bool = False, require_images: bool = True
                       ) -> tuple[list[CaptionExample], ReadReport]:
    """A CSV, TSV (extension .tsv, or more tabs than commas in the header) or JSONL (extension .jsonl, or
    content starting with '{') table with one caption per row; rows naming the same item are grouped in
    first-seen order. Image paths are relative to the table's folder; the image id is that path,
    normalised ('./a.jpg' -> 'a.jpg'). An imagefolder `metadata.csv` reads with image_column="file_name".
    A column of None is auto-detected (`TABLE_IMAGE_COLUMNS`, `TABLE_CAPTION_COLUMNS`). JSONL rows may
    hold a list of captions. Problems carry the file's own line numbers (a quoted CSV field may span
    lines: the row's first line is given). Examples' split is the file's stem.

    Audio: an audio column (`audio_column`, which must then exist; None: the first of
    `TABLE_AUDIO_COLUMNS` present, if any) holds sound-file paths, relative like image paths. With one,
    the image column is optional (an audio-only table is fine; 'image_id'/'id' columns are then not taken
    for image paths unless named): each row needs an image or an audio path, and the id is the normalised
    image path, else the normalised audio path. `require_images=False` skips both files' existence checks."""
    path = Path(path)
    return _read_table(path, image_columns=(image_column,) if image_column else TABLE_IMAGE_COLUMNS,
                       audio_columns=(audio_column,) if audio_column else TABLE_AUDIO_COLUMNS,
                       caption_columns=(caption_column,) if caption_column else TABLE_CAPTION_COLUMNS,
                       strict=strict, require_images=require_images, split=path.stem)


# ------------------------------------------------------------------ audio caption sets: Clotho, AudioCaps

_CLOTHO_PREFIX = "clotho_captions_"  # clotho_captions_<split>.csv sits beside the <split>/ audio folder


def read_clotho(path: str | Path, audio_root: str | Path | None = None, *, strict: bool = False,
                require_files: bool = True) -> tuple[list[CaptionExample], ReadReport]:
    """Clotho captions CSV (clotho_captions_development.csv, _validation, _evaluation): header
    `file_name,caption_1,...,caption_5`, one audio clip a row with its captions (empty caption cells are
    dropped). The clip is audio_root/file_name (default root: the CSV's folder); a file not there is also
    looked for in `<CSV folder>/<split>/` when the CSV is named clotho_captions_<split>.csv (Clotho's own
    layout). The id is file_name; examples' split is <split>, else the file's stem."""
    path = Path(path)
    split = path.stem.removeprefix(_CLOTHO_PREFIX) or path.stem
    roots = [Path(audio_root) if audio_root is not None else path.parent]
    if split != path.stem:
        roots.append(path.parent / split)
    report = ReadReport(source=str(path))
    bad = _reporter(report, strict)
    header_line, header, rows = _csv_rows(path, _read_bytes(path), ",", bad, "a Clotho captions CSV")
    caption_columns = [h for h in header if re.fullmatch(r"caption_\d+", h)]
    if "file_name" not in header or not caption_columns:
        raise DataError(f"{path}:{header_line}: not a Clotho captions CSV (the header needs file_name, caption_1, "
                        f"...; it has {', '.join(map(repr, header))})")
    by_id: dict[str, CaptionExample] = {}
    for where, row in rows:
        caps, reason = _clean_captions([row[c] for c in caption_columns])
        if reason is not None:
            bad(where, reason)
            continue
        for root in roots:
            audio, reason = _check_file(root, row["file_name"], must_exist=require_files, what="audio")
            if reason is None:
                break
        else:  # in no root
            bad(where, f"{reason} (looked in {', '.join(map(str, roots))})")
            continue
        key = row["file_name"]
        if key in by_id:
            by_id[key].captions.extend(caps)
        else:
            by_id[key] = CaptionExample(image_id=key, image=None, captions=caps, split=split, audio=audio)
    return _finish(report, list(by_id.values()), "no usable clips")


def read_audiocaps(path: str | Path, audio_root: str | Path | None = None, *, strict: bool = False,
                   require_files: bool = True) -> tuple[list[CaptionExample], ReadReport]:
    """AudioCaps CSV (train.csv, val.csv, test.csv): header `audiocap_id,youtube_id,start_time,caption`
    (audiocap_id optional), one caption a row; rows with the same youtube_id and start_time are one clip
    (val and test have 5 captions a clip). The id is "{youtube_id}_{start_time}" as written; examples'
    split is the file's stem.

    Downloaded AudioCaps audio is named in several ways, so the audio root (default: the CSV's folder) is
    indexed once, recursively (`AUDIO_EXTENSIONS`), by file stem, and each clip takes the first stem found
    of: {audiocap_id} (of each of its rows), {youtube_id}_{start_time} (as written, and as an integer and a
    float when integral: 30 and 30.0), Y{youtube_id}, {youtube_id}. A clip without a file is reported at
    its first row, after the row problems (all rows are read before files are looked up).
    `require_files=False` (references for scoring) skips the lookup: examples then have no audio path."""
    path = Path(path)
    root = Path(audio_root) if audio_root is not None else path.parent
    report = ReadReport(source=str(path))
    bad = _reporter(report, strict)
    header_line, header, rows = _csv_rows(path, _read_bytes(path), ",", bad, "an AudioCaps CSV")
    if not {"youtube_id", "start_time", "caption"} <= set(header):
        raise DataError(f"{path}:{header_line}: not an AudioCaps CSV (the header needs youtube_id, start_time "
                        f"and caption; it has {', '.join(map(repr, header))})")
    by_id: dict[str, CaptionExample] = {}
    clips: dict[str, tuple[str, str, str, list[str]]] = {}  # id -> (first row, youtube_id, start, audiocap ids)
    for where, row in rows:
        ytid, start = row["youtube_id"].strip(), row["start_time"].strip()
        if not ytid or not start or not _is_utf8(ytid + start):
            bad(where, "row needs a youtube_id and a start_time (non-empty, valid UTF-8)")
            continue
        caps, reason = _clean_captions(row["caption"], allow_list=False)
        if reason is not None:
            bad(where, reason)
            continue
        key = f"{ytid}_{start}"
        if key not in by_id:
            by_id[key] = CaptionExample(image_id=key, image=None, captions=[], split=path.stem)
            clips[key] = (where, ytid, start, [])
        by_id[key].captions.extend(caps)
        audiocap_id = row.get("audiocap_id", "").strip()
        if audiocap_id:
            clips[key][3].append(audiocap_id)  # val/test give each caption row its own id: any may name the file
    if not require_files:
        return _finish(report, list(by_id.values()), "no usable clips")
    if not root.is_dir():
        raise DataError(f"{root}: no such directory (the audio root of {path})")
    files: dict[str, str] = {}  # file stem -> path; the first in sorted order where stems repeat
    for found in collect_audio([str(root)])[0]:
        files.setdefault(Path(found).stem, found)
    examples = []
    for key, example in by_id.items():
        where, ytid, start, audiocap_ids = clips[key]
        tried = _audiocaps_stems(audiocap_ids, ytid, start)
        example.audio = next((files[stem] for stem in tried if stem in files), None)
        if example.audio is None:
            bad(where, f"audio for youtube_id {ytid} (start {start}) not found in {root} (tried {', '.join(tried)})")
            continue
        examples.append(example)
    return _finish(report, examples, "no usable clips")


def _audiocaps_stems(audiocap_ids: Sequence[str], youtube_id: str, start: str) -> list[str]:
    """The file stems an AudioCaps clip may be saved under, in the order they are tried."""
    starts = [start]
    with contextlib.suppress(ValueError, OverflowError):
        t = float(start)
        if t.is_integer():
            starts += [str(int(t)), str(float(int(t)))]  # "30" and "30.0", whichever was written
    return list(dict.fromkeys([*audiocap_ids, *(f"{youtube_id}_{s}" for s in starts), f"Y{youtube_id}", youtube_id]))


def _audio_csv_reader(path: Path) -> Callable[..., tuple[list[CaptionExample], ReadReport]] | None:
    """`read_clotho` or `read_audiocaps` for a .csv whose header is theirs, else None (a generic table).
    Only the first line is read: a caption set may be large."""
    if path.suffix.lower() != ".csv" or not path.is_file():
        return None
    try:
        with open(path, "rb") as f:
            first = f.readline(65536)
    except OSError:
        return None  # the reader that opens it next names the reason
    text = first.decode("utf-8", errors="replace").removeprefix("\ufeff").rstrip("\r\n")
    try:
        header = {h.strip() for h in next(csv.reader([text]), [])}
    except csv.Error:
        return None
    if {"file_name", "caption_1"} <= header:
        return read_clotho
    if {"youtube_id", "caption"} <= header:
        return read_audiocaps
    return None


def read_coco_captions(annotation_file: str | Path, image_root: str | Path | None = None, *, strict: bool = False,
                       require_images: bool = True) -> tuple[list[CaptionExample], ReadReport]:
    """COCO captions JSON (captions_train2014.json, captions_val2017.json, ...):
    `{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}`. Captions are grouped per
    image in annotation order; image_id is str(id); the image path is image_root/file_name (default root:
    the JSON's folder). Annotations naming an unknown image id and images without captions are reported.
    Examples' split is the file's stem without 'captions_' (e.g. 'val2014')."""
    path = Path(annotation_file)
    return _coco_from_data(_load_json(path), path, image_root, strict=strict, require_images=require_images)


def _coco_from_data(data, path: Path, image_root, *, strict: bool, require_images: bool
                    ) -> tuple[list[CaptionExample], ReadReport]:
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{path}: not a COCO captions file (needs an 'images' list and an 'annotations' list)")
    if not isinstance(data.get("annotations"), list):
        raise DataError(f"{path}: no 'annotations' list (an image-info file without captions?)")
    root = Path(image_root) if image_root is not None else path.parent
    report = ReadReport(source=str(path))
    bad = _reporter(report, strict)
    images: dict[str, tuple[int, str]] = {}  # id -> (index in 'images', file_name)
    rejected: set[str] = set()  # ids of reported image entries: their annotations are skipped silently
    for i, entry in enumerate(data["images"]):
        where = f"{path}: images[{i}]"
        image_id = entry.get("id") if isinstance(entry, dict) else None
        if not _is_id(image_id) or not isinstance(entry.get("file_name"), str):
            bad(where, "entry needs an 'id' (integer or string) and a string 'file_name'")
            if _is_id(image_id):
                rejected.add(str(image_id))
            continue
        key = str(image_id)
        if key in images:
            bad(where, f"duplicate image id {key!r} (first at images[{images[key][0]}])")
            continue
        images[key] = (i, entry["file_name"])
    captions: dict[str, list[str]] = {key: [] for key in images}
    for i, ann in enumerate(data["annotations"]):
        where = f"{path}: annotations[{i}]"
        if not isinstance(ann, dict) or not _is_id(ann.get("image_id")) or "caption" not in ann:
            bad(where, "entry needs an 'image_id' (integer or string) and a 'caption'")
            continue
        key = str(ann["image_id"])
        if key not in captions:
            if key not in rejected:
                bad(where, f"image_id {key!r} is not in 'images'")
            continue
        caps, reason = _clean_captions(ann["caption"], allow_list=False)
        if reason is not None:
            bad(where, reason)
            continue
        captions[key].extend(caps)
    split = path.stem.removeprefix("captions_")
    examples = []
    for key, (i, name) in images.items():
        where = f"{path}: images[{i}]"
        if not captions[key]:
            bad(where, f"image {key!r} has no captions")
            continue
        image, reason = _check_file(root, name, must_exist=require_images)
        if reason is not None:
            bad(where, reason)
            continue
        examples.append(CaptionExample(image_id=key, image=image, captions=captions[key], split=split))
    return _finish(report, examples, "no usable images")


def read_karpathy(split_file: str | Path, image_root: str | Path | None = None, split: str = "test", *,
                  strict: bool = False, require_images: bool = True) -> tuple[list[CaptionExample], ReadReport]:
    """Karpathy split JSON (dataset_coco.json, dataset_flickr8k.json, dataset_flickr30k.json):
    `{"images": [{"filepath"?, "filename", "split", "cocoid"? | "imgid", "sentences": [{"raw"}]}]}`.
    `split`: one of `KARPATHY_SPLITS`; "train+restval" takes both. image_id is str(cocoid) when present,
    else str(imgid); the image path is image_root[/filepath]/filename (default root: the JSON's folder).
    Each example's split is its entry's own split. Entries of other splits are skipped silently."""
    path = Path(split_file)
    if split not in KARPATHY_SPLITS:  # before reading a possibly large file
        raise DataError(f"{path}: unknown Karpathy split {split!r} (one of {', '.join(KARPATHY_SPLITS)})")
    return _karpathy_from_data(_load_json(path), path, image_root, split, strict=strict,
                               require_images=require_images)


def _karpathy_from_data(data, path: Path, image_root, split: str, *, strict: bool, require_images: bool
                        ) -> tuple[list[CaptionExample], ReadReport]:
    if split not in KARPATHY_SPLITS:
        raise DataError(f"{path}: unknown Karpathy split {split!r} (one of {', '.join(KARPATHY_SPLITS)})")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{path}: not a Karpathy split file (needs an 'images' list)")
    wanted = {"train", "restval"} if split == "train+restval" else {split}
    root = Path(image_root) if image_root is not None else path.parent
    report = ReadReport(source=str(path))
    bad = _reporter(report, strict)
    seen: dict[str, int] = {}
    examples = []
    for i, entry in enumerate(data["images"]):
        where = f"{path}: images[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("split"), str):
            bad(where, "entry needs a string 'split'")
            continue
        if entry["split"] not in wanted:
            continue
        image_id = entry["cocoid"] if "cocoid" in entry else entry.get("imgid")
        if not _is_id(image_id):
            bad(where, "entry needs a 'cocoid' or 'imgid' (integer or string)")
            continue
        filename, filepath = entry.get("filename"), entry.get("filepath", "")
        if not isinstance(filename, str) or not isinstance(filepath, str):
            bad(where, "entry needs a string 'filename' (and 'filepath', when present)")
            continue
        sentences = entry.get("sentences")
        if not isinstance(sentences, list) or not all(isinstance(s, dict) for s in sentences):
            bad(where, "'sentences' must be a list of objects")
            continue
        raws = []
        for s in sentences:
            raw = s.get("raw")
            if raw is None and isinstance(s.get("tokens"), list) and all(isinstance(t, str) for t in s["tokens"]):
                raw = " ".join(s["tokens"])
            raws.append(raw)
        caps, reason = _clean_captions(raws)
        if reason is not None:
            bad(where, reason)
            continue
        key = str(image_id)
        if key in seen:
            bad(where, f"duplicate image id {key!r} (first at images[{seen[key]}])")
            continue
        image, reason = _check_file(root, os.path.join(filepath, filename) if filepath else filename,
                                    must_exist=require_images)
        if reason is not None:
            bad(where, reason)
            continue
        seen[key] = i
        examples.append(CaptionExample(image_id=key, image=image, captions=caps, split=entry["split"]))
    return _finish(report, examples, f"no usable images in split {split!r}")


def _imagefolder_table(folder: Path, split: str | None, *, strict: bool, require_files: bool, group: bool
                       ) -> tuple[list[CaptionExample], ReadReport]:
    """`folder/metadata.jsonl` as `read_imagefolder` reads it: ids 'split/stem' (or 'stem' without a split)
    of `file_name`, else of `audio_file`. References (require_files=False) group rows naming one file."""
    return _read_table(folder / "metadata.jsonl", image_columns=("file_name",), audio_columns=("audio_file",),
                       caption_columns=("captions", "caption"), strict=strict, require_images=require_files,
                       split=split or "train", group=group,
                       image_id=lambda name: f"{split}/{Path(name).stem}" if split else Path(name).stem)


def load_references(path: str | Path, *, split: str = "test") -> dict[str, list[str]]:
    """Reference captions for scoring, {item id: [captions]}, from any of: a COCO captions JSON (has
    'annotations'), a Karpathy split JSON (its `split`), an imagefolder directory (path/split/metadata.jsonl,
    else path/metadata.jsonl; image and/or audio rows), a Clotho or AudioCaps captions CSV (by its header;
    one split already) or a .csv/.tsv/.jsonl table (columns auto-detected). Image and audio files need not
    exist. Problem rows are logged and skipped; an unknown format is a DataError listing the accepted ones."""
    path = Path(path)
    audio_reader = _audio_csv_reader(path)
    if path.is_dir():
        if (path / split / "metadata.jsonl").is_file():
            examples, _ = _imagefolder_table(path / split, split, strict=False, require_files=False, group=True)
        elif (path / "metadata.jsonl").is_file():
            examples, _ = _imagefolder_table(path, None, strict=False, require_files=False, group=True)
        else:
            raise DataError(f"{path}: directory holds no metadata.jsonl (nor {split}/metadata.jsonl); "
                            f"accepted reference formats: {_REFERENCE_FORMATS}")
    elif not path.exists():
        raise DataError(f"{path}: no such file or directory")
    elif audio_reader is not None:
        examples, _ = audio_reader(path, require_files=False)
    elif path.suffix.lower() in _TABLE_SUFFIXES:
        examples, _ = read_caption_table(path, image_column=None, caption_column=None, require_images=False)
    elif path.suffix.lower() == ".json":
        data = _load_json(path)
        kind = _json_kind(data)
        if kind == "coco":
            examples, _ = _coco_from_data(data, path, None, strict=False, require_images=False)
        elif kind == "karpathy":
            examples, _ = _karpathy_from_data(data, path, None, split, strict=False, require_images=False)
        else:
            hint = " (a list: predictions in COCO results format?)" if isinstance(data, list) else ""
            raise DataError(f"{path}: not a reference file{hint}; accepted reference formats: {_REFERENCE_FORMATS}")
    else:
        raise DataError(f"{path}: unknown reference format; accepted reference formats: {_REFERENCE_FORMATS}")
    return {ex.image_id: ex.captions for ex in examples}


# ------------------------------------------------------------------ Hugging Face `datasets`
#
# `read_hf_dataset` reads any `datasets` dataset: a directory written by `save_to_disk`, a local data
# directory or file `load_dataset` understands (imagefolder, parquet, csv, json, arrow), or a hub name
# "hf:owner/name" (optionally "hf:owner/name:config"). The rest of the project needs image and audio FILES
# (the feature cache keys on path, size and mtime), so images and sounds that are not files on disk are
# written once to `cache_dir/<dataset fingerprint>/<split>/<row index>.<ext>` (audio: `<row index>.audio<ext>`)
# and reused by later reads.

HF_PREFIX = "hf:"
HF_SAVED_MARKERS = ("dataset_dict.json", "state.json", "dataset_info.json")  # what save_to_disk writes
HF_IMAGE_COLUMNS = ("image", "img", "file_name", "filepath", "image_path", "path")  # tried when none is named
HF_AUDIO_COLUMNS = ("audio", "audio_file", "audio_path")  # tried when none is named and no column is an Audio
HF_CAPTION_COLUMNS = ("caption", "captions", "text")
HF_ID_COLUMNS = ("image_id", "id")  # first present (and not an image/audio/caption column) gives image ids
# Next to an audio column these name the sound file as often as an image, so they are not taken as images.
_HF_GENERIC_PATH_COLUMNS = ("file_name", "filepath", "path")
DEFAULT_HF_IMAGE_CACHE = Path("~/.cache/captioner/hf_images")
_HF_FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".tsv": "csv", ".json": "json",
                     ".jsonl": "json", ".ndjson": "json", ".txt": "text"}
_PIL_FORMAT_EXT = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "GIF": ".gif", "BMP": ".bmp", "WEBP": ".webp",
                   "TIFF": ".tif"}
_SOUNDFILE_FORMAT_EXT = {"WAV": ".wav", "WAVEX": ".wav", "FLAC": ".flac", "OGG": ".ogg", "MP3": ".mp3",
                         "AIFF": ".aiff"}


def is_saved_hf_dataset(path: str | Path) -> bool:
    """Whether `path` is a directory written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`."""
    path = Path(path)
    return path.is_dir() and any((path / name).is_file() for name in HF_SAVED_MARKERS)


def _load_hf(spec: str):
    """The Dataset or DatasetDict that `spec` names (see `read_hf_dataset`), or DataError."""
    import datasets

    if spec.startswith(HF_PREFIX):
        name, _, config = spec[len(HF_PREFIX):].partition(":")
        if not name.strip():
            raise DataError(f"{spec}: no dataset name after 'hf:' (e.g. hf:nlphuji/flickr30k)")
        from captioner import hub

        if not hub.hub_reachable():
            try:  # a dataset loaded once before is in the local cache
                with hub.hub_offline():
                    return datasets.load_dataset(name, config or None)
            except Exception:
                raise DataError(
                    f"{spec}: the Hugging Face hub is unreachable and the dataset is not in the local cache; "
                    "use a local path instead: a directory written by save_to_disk (on a machine with internet: "
                    "datasets.load_dataset(NAME).save_to_disk(DIR)), or a local data directory or file "
                    "(imagefolder, parquet, csv, json)") from None
        try:
            return datasets.load_dataset(name, config or None)
        except Exception as e:
            raise DataError(f"{spec}: could not load the dataset from the hub ({type(e).__name__}: {e})") from None
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(f"{spec}: no such file or directory (a hub dataset is named hf:OWNER/NAME)")
    try:
        with hub.hub_offline():
            if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
                return datasets.load_from_disk(str(path))
            if path.is_dir():
                return datasets.load_dataset(str(path.resolve()))
            builder = _HF_FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise DataError(f"{spec}: unknown data file type (one of {', '.join(_HF_FILE_BUILDERS)}, or a "
                                "directory)")
            extra = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
            return datasets.load_dataset(builder, data_files=str(path.resolve()), split="train", **extra)  # one split
    except DataError:
        raise
    except Exception as e:  # the datasets library raises many kinds; all mean "not loadable"
        raise DataError(f"{spec}: could not load it as a datasets dataset ({type(e).__name__}: {e})") from None


def _saved_split_name(spec: str) -> str | None:
    """The split name of a Dataset folder inside a saved DatasetDict (parent/dataset_dict.json lists it)."""
    path = Path(spec).expanduser()
    try:
        splits = json.loads((path.parent / "dataset_dict.json").read_text("utf-8")).get("splits", [])
    except (OSError, ValueError, AttributeError):
        return None
    return path.name if path.name in splits else None


def _hf_caption_columns(spec: str, columns: Sequence[str], wanted: str | None) -> list[str]:
    """The caption column(s): named ("caption" or "caption_1,caption_2,..."), else the first of
    HF_CAPTION_COLUMNS, else every numbered column caption_1, caption_2, ... (Clotho on the hub), in order."""
    if wanted is not None:
        return [_pick_column(spec, columns, name.strip(), HF_CAPTION_COLUMNS, "caption") for name in wanted.split(",")]
    numbered = sorted((c for c in columns if re.fullmatch(r"captions?_\d+", c)),
                      key=lambda c: int(c.rsplit("_", 1)[1]))
    if numbered and not any(c in columns for c in HF_CAPTION_COLUMNS):
        return numbered
    return [_pick_column(spec, columns, None, HF_CAPTION_COLUMNS, "caption")]


def _pick_column(spec: str, columns: Sequence[str], wanted: str | None, candidates: Sequence[str], what: str) -> str:
    if wanted is not None:
        if wanted not in columns:
            raise DataError(f"{spec}: no {what} column {wanted!r} (columns: {', '.join(map(repr, columns))})")
        return wanted
    found = next((c for c in candidates if c in columns), None)
    if found is None:
        raise DataError(f"{spec}: no {what} column (looked for {', '.join(map(repr, candidates))}; columns: "
                        f"{', '.join(map(repr, columns))}); name it with --{what}-column")
    return found


def _write_atomic(target: Path, data: bytes) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as e:
        raise DataError(f"{target}: cannot write the file cache ({e.strerror or e})") from None


class _MediaKind(NamedTuple):
    """What `_hf_media_file` needs to know about one kind of cell ("image" or "audio")."""

    decoded: str  # what a decoded cell is, for messages
    recognised: str  # what its bytes must be: "<kind> bytes are not a recognised <this>"
    extensions: tuple[str, ...]  # a file name with one of these is trusted; other bytes are sniffed
    format_ext: dict[str, str]  # sniffed format -> file extension
    stem: str  # after the row index in cache names, so a row's sound never overwrites its image


_HF_MEDIA = {
    "image": _MediaKind("an image", "image", IMAGE_EXTENSIONS, _PIL_FORMAT_EXT, ""),
    "audio": _MediaKind("decoded audio ({'array', 'sampling_rate'})", "sound", AUDIO_EXTENSIONS,
                        _SOUNDFILE_FORMAT_EXT, ".audio"),
}


def _encode_decoded(value, kind: str) -> tuple[bytes, str, str | None] | None:
    """A decoded cell as file bytes -> (bytes, a file name giving the extension, None), or (b"", "", reason);
    None when `value` is not a decoded cell of this kind. Images (PIL) become PNG; audio dicts
    {'array': (samples,) or (samples, channels) floats in [-1, 1], 'sampling_rate'} become 16-bit WAV
    (lossless for the 16-bit recordings such arrays usually come from, half the size of float)."""
    buf = io.BytesIO()
    if kind == "image" and isinstance(value, Image.Image):
        try:
            value.save(buf, format="PNG")
        except (OSError, ValueError) as e:
            return b"", "", f"image cannot be encoded ({e})"
        return buf.getvalue(), "x.png", None
    if kind == "audio" and isinstance(value, dict) and "array" in value:
        import numpy as np
        import soundfile

        rate = value.get("sampling_rate")
        if not isinstance(rate, int) or isinstance(rate, bool) or rate <= 0:
            return b"", "", f"audio sampling_rate must be a positive integer, not {rate!r}"
        try:
            samples = np.asarray(value["array"], dtype="float32")
            if samples.size == 0:
                return b"", "", "audio array is empty"
            soundfile.write(buf, samples, rate, format="WAV", subtype="PCM_16")  # clips outside [-1, 1]
        except (TypeError, ValueError, RuntimeError) as e:  # RuntimeError: libsndfile refused the shape
            return b"", "", f"audio array cannot be encoded ({e})"
        return buf.getvalue(), "x.wav", None
    return None


def _sniff_format(data: bytes, kind: str) -> str | None:
    """The format name PIL (images) or libsndfile (audio) reads in `data`, or None."""
    try:
        if kind == "image":
            with Image.open(io.BytesIO(data)) as im:
                return im.format or ""
        import soundfile

        return soundfile.info(io.BytesIO(data)).format
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, RuntimeError, Image.DecompressionBombError):
        return None  # RuntimeError: soundfile's LibsndfileError


def _hf_media_file(value, kind: str, *, root: Path | None, folder: Path, index: int) -> tuple[str, str | None]:
    """One image or audio cell (`kind`) -> (path of a file, None), or ("", reason). A path that exists
    (absolute, or relative to the dataset's folder; a bare path string also relative to the working directory)
    is used as is; bytes or a decoded image/sound are written once to folder/<index><ext> (images) or
    folder/<index>.audio<ext> (audio)."""
    media = _HF_MEDIA[kind]
    decoded = _encode_decoded(value, kind)
    if decoded is not None:
        data, name, reason = decoded
        if reason is not None:
            return "", reason
    elif isinstance(value, dict) and ("bytes" in value or "path" in value):
        data, name = value.get("bytes"), value.get("path")
    elif isinstance(value, str):
        data, name = None, value
    elif value is None:
        return "", f"no {kind}"
    else:
        return "", f"{kind} cell holds {type(value).__name__}, not {media.decoded}, a path or {{'bytes', 'path'}}"
    if data is not None and not isinstance(data, (bytes, bytearray)):
        return "", f"{kind} 'bytes' must be bytes, not {type(data).__name__}"
    if name is not None and not isinstance(name, str):
        return "", f"{kind} path must be a string, not {type(name).__name__}"
    if name and decoded is None:
        if not _is_utf8(name) or "\x00" in name:
            return "", f"{kind} path is not a valid path"
        p = Path(name).expanduser()
        candidates = [p] if p.is_absolute() else [*([root / p] if root is not None else []),
                                                  *([p] if data is None else [])]
        for c in candidates:
            try:
                if c.is_file():
                    return str(c), None
            except OSError:
                continue
    if not data:
        return "", f"{kind} file {name!r} not found" if name else f"{kind} has neither bytes nor a path"
    ext = Path(name).suffix.lower() if name else ""
    if ext not in media.extensions:
        fmt = _sniff_format(data, kind)
        if fmt is None:
            return "", f"{kind} bytes are not a recognised {media.recognised}"
        ext = media.format_ext.get(fmt, "." + fmt.lower())
    target = folder / f"{index}{media.stem}{ext}"
    try:
        present = target.stat().st_size == len(data)
    except OSError:
        present = False
    if not present:
        _write_atomic(target, bytes(data))
    return str(target), None


def read_hf_dataset(spec: str, split: str | None, *, image_column: str | None = None,
                    caption_column: str | None = None, strict: bool = False,
                    cache_dir: str | Path | None = None, audio_column: str | None = None
                    ) -> tuple[list[CaptionExample], ReadReport]:
    """Any `datasets` dataset as a caption set. `spec`: a directory written by `save_to_disk` (Dataset or
    DatasetDict), a local data directory or file that `load_dataset` reads (imagefolder, parquet, csv,
    json, arrow), or a hub name "hf:owner/name[:config]" (offline: the local datasets cache only, else a
    DataError asking for a local path).

    `split` picks a split of a DatasetDict (an error lists the splits; None works for a single split); a
    single Dataset or data file is one split already and `split` only labels its examples (default: the
    dataset's own split name, or its folder's name inside a saved DatasetDict, else "train").

    Each row gives an image, a sound or both. The image column may hold decoded images, {'bytes', 'path'}
    dicts or path strings; the audio column {'bytes', 'path'} dicts (an `Audio` feature, read undecoded),
    decoded {'array', 'sampling_rate'} dicts or path strings. An existing file is used where it is; other
    images are written once to `cache_dir/<fingerprint>/<split>/<row>.<ext>` and sounds to
    `.../<row>.audio<ext>` (default `DEFAULT_HF_IMAGE_CACHE`), and reused later. The caption column holds a
    string or a list of strings; `caption_column` may name several ("caption_1,caption_2"), and numbered
    columns caption_1, caption_2, ... are all read when no column of `HF_CAPTION_COLUMNS` is there.
    image_id is the `image_id`/`id` column (as a string) when there is one, rows
    with equal ids being merged (the first row's files are kept), else "<split>/<row>".

    A column of None is auto-detected: audio is the `Audio` feature column, else the first of
    `HF_AUDIO_COLUMNS`; captions the first of `HF_CAPTION_COLUMNS`; the image the first of `HF_IMAGE_COLUMNS`,
    which must be there unless the dataset has audio (then an `Image` feature column, else a non-generic
    image name, or none: an audio-only set). With both columns a None cell is no input for that row. A named
    column must exist. Problem rows are reported as "SPEC: split[row]: reason"."""
    import datasets

    spec = str(spec)
    loaded = _load_hf(spec)
    if isinstance(loaded, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        names = list(loaded.keys())
        if split is None and len(names) == 1:
            split = names[0]
        if split is None or split not in loaded:
            what = "no split given" if split is None else f"no split {split!r}"
            raise DataError(f"{spec}: {what} (available splits: {', '.join(map(repr, names))})")
        ds, label = loaded[split], split
    else:
        ds = loaded
        label = split or (str(ds.split) if getattr(ds, "split", None) else _saved_split_name(spec) or "train")
    if not isinstance(ds, datasets.Dataset):
        raise DataError(f"{spec}: a streaming dataset is not supported (load it as a map-style Dataset)")
    columns = list(ds.column_names)
    features = ds.features
    if audio_column is not None:
        audio_column = _pick_column(spec, columns, audio_column, HF_AUDIO_COLUMNS, "audio")
    else:
        audio_column = next((c for c in columns if isinstance(features[c], datasets.Audio)), None) or next(
            (c for c in HF_AUDIO_COLUMNS if c in columns), None)
    if image_column is not None or audio_column is None:
        image_column = _pick_column(spec, columns, image_column, HF_IMAGE_COLUMNS, "image")
    else:  # optional next to audio (Clotho has none); a generic path column there is likely the sound's
        image_column = next((c for c in columns if isinstance(features[c], datasets.Image)), None) or next(
            (c for c in HF_IMAGE_COLUMNS if c in columns and c not in _HF_GENERIC_PATH_COLUMNS), None)
    caption_columns = _hf_caption_columns(spec, columns, caption_column)
    media = {kind: c for kind, c in (("image", image_column), ("audio", audio_column)) if c is not None}
    id_column = next((c for c in HF_ID_COLUMNS if c in columns and c not in (*media.values(), *caption_columns)),
                     None)
    fingerprint = str(getattr(ds, "_fingerprint", None) or "unknown")
    keep = [*media.values(), *caption_columns, *([id_column] if id_column else [])]
    ds = ds.select_columns(list(dict.fromkeys(keep)))
    for column in media.values():  # raw bytes and paths, no decoding (decoding audio would need torchcodec)
        if isinstance(features[column], datasets.Image):
            ds = ds.cast_column(column, datasets.Image(decode=False))
        elif isinstance(features[column], datasets.Audio):
            ds = ds.cast_column(column, datasets.Audio(decode=False))
    spec_path = Path(spec).expanduser() if not spec.startswith(HF_PREFIX) else None
    root = (spec_path if spec_path.is_dir() else spec_path.parent) if spec_path is not None else None
    safe_label = "".join(ch if ch.isalnum() or ch in "-_.+" else "_" for ch in label) or "split"
    cache_root = Path(cache_dir if cache_dir is not None else DEFAULT_HF_IMAGE_CACHE).expanduser()
    folder = cache_root / fingerprint / safe_label

    report = ReadReport(source=spec)
    bad = _reporter(report, strict)
    by_id: dict[str, CaptionExample] = {}
    for index, row in enumerate(ds):
        where = f"{spec}: {label}[{index}]"
        if len(caption_columns) == 1:
            caps, reason = _clean_captions(row[caption_columns[0]])
        else:  # several columns: an empty cell is no caption, as in Clotho's CSVs
            values = []
            for cell in (row[c] for c in caption_columns):
                values.extend(cell if isinstance(cell, list) else [] if cell is None else [cell])
            caps, reason = _clean_captions(values)
        if reason is not None:
            bad(where, reason)
            continue
        if id_column is not None:
            raw_id = row[id_column]
            if not _is_id(raw_id):
                bad(where, f"{id_column} must be a non-empty string or an integer, not {raw_id!r}")
                continue
            key = str(raw_id)
            if key in by_id:
                by_id[key].captions.extend(caps)
                continue
        else:
            key = f"{label}/{index}"
        # with both columns an empty cell is no input (an audio-only row); alone, it is reported as missing
        cells = {kind: row[c] for kind, c in media.items() if row[c] is not None or len(media) == 1}
        if not cells:
            bad(where, "no image and no audio")
            continue
        paths: dict[str, str] = {}
        for kind, value in cells.items():
            if reason is None:
                paths[kind], reason = _hf_media_file(value, kind, root=root, folder=folder, index=index)
        if reason is not None:
            bad(where, reason)
            continue
        by_id[key] = CaptionExample(image_id=key, image=paths.get("image"), captions=caps, split=label,
                                    audio=paths.get("audio"))
    return _finish(report, list(by_id.values()), f"no usable rows in split {label!r}")


def load_caption_set(spec: str | Path, split: str | None, *, strict: bool = False, image_column: str | None = None,
                     caption_column: str | None = None, image_root: str | Path | None = None,
                     cache_dir: str | Path | None = None, audio_root: str | Path | None = None,
                     audio_column: str | None = None) -> tuple[list[CaptionExample], ReadReport]:
    """A caption set for training or evaluation: a directory -> `read_imagefolder` (its `split` folder
    when that exists, else the directory itself); a .json -> `read_coco_captions` or `read_karpathy` by
    content (a COCO file is one split already: `split` only labels its examples); a .csv whose header is
    Clotho's or AudioCaps' -> `read_clotho` / `read_audiocaps` (one split already, like COCO); other
    .csv/.tsv/.jsonl -> `read_caption_table` (columns auto-detected unless named; `audio_column` names its
    audio column, here and for `datasets` datasets). `image_root` (COCO/Karpathy only; default: the JSON's
    folder) is where image paths start; `audio_root` (Clotho/AudioCaps only; default: the CSV's folder) is
    where audio files are. Images and audio files must exist.

    `read_hf_dataset` (a `datasets` dataset with images and/or audio; `cache_dir` is where images and sounds
    that are not files go) reads "hf:owner/name" hub names, directories written by `save_to_disk`,
    .parquet/.arrow files, and directories without metadata.jsonl when an image, audio or caption column is
    named."""
    path = Path(spec)
    if image_root is not None and (str(spec).startswith(HF_PREFIX) or path.is_dir() or path.suffix.lower() != ".json"):
        raise DataError(f"{path}: an image root applies only to COCO/Karpathy JSON files (image paths of an "
                        "imagefolder or a table are relative to its own folder)")
    audio_reader = _audio_csv_reader(path)
    if audio_root is not None and audio_reader is None:
        raise DataError(f"{path}: an audio root applies only to Clotho and AudioCaps CSV files (audio paths of an "
                        "imagefolder or a table are relative to its own folder)")
    named = image_column or caption_column or audio_column
    if str(spec).startswith(HF_PREFIX) or is_saved_hf_dataset(path) or (
            path.is_file() and path.suffix.lower() in (".parquet", ".arrow")) or (
            path.is_dir() and named and not (path / "metadata.jsonl").is_file()
            and not (split and (path / split / "metadata.jsonl").is_file())):
        return read_hf_dataset(str(spec), split, image_column=image_column, caption_column=caption_column,
                               strict=strict, cache_dir=cache_dir, audio_column=audio_column)
    if audio_column is not None and (audio_reader is not None or path.suffix.lower() not in _TABLE_SUFFIXES):
        raise DataError(f"{path}: an audio column applies only to .csv/.tsv/.jsonl caption tables and `datasets` "
                        "datasets (Clotho and AudioCaps CSVs have their own layout)")
    if path.is_dir():
        return read_imagefolder(path, split if split and (path / split).is_dir() else None, strict=strict)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    ext = path.suffix.lower()
    if ext == ".json":
        data = _load_json(path)
        kind = _json_kind(data)
        if kind == "karpathy":
            return _karpathy_from_data(data, path, image_root, split or "test", strict=strict, require_images=True)
        if kind != "coco":
            raise DataError(f"{path}: neither a COCO captions file nor a Karpathy split file; accepted caption "
                            f"sets: {_CAPTION_SET_FORMATS}")
        examples, report = _coco_from_data(data, path, image_root, strict=strict, require_images=True)
    elif audio_reader is not None:
        examples, report = audio_reader(path, audio_root, strict=strict)
    elif ext in _TABLE_SUFFIXES:
        examples, report = read_caption_table(path, image_column=image_column, caption_column=caption_column,
                                              audio_column=audio_column, strict=strict)
    else:
        raise DataError(f"{path}: unknown caption-set format; accepted caption sets: {_CAPTION_SET_FORMATS}")
    if split:
        for ex in examples:
            ex.split = split
    return examples, report


def read_predictions(path: str | Path) -> dict[str, str]:
    """Predicted captions for scoring, {image id: caption}, from a COCO results JSON
    (`[{"image_id", "caption"}]`), JSONL (one object per line, as `captioner caption` writes) or CSV/TSV
    (header with caption and image_id, id or image; with a 'rank' column only rank 0 rows count). The id
    is the first of `PREDICTION_ID_KEYS` present, as a string. Any problem is a DataError naming the file
    and the line (JSONL, CSV) or entry index (JSON): predictions are all-or-nothing."""
    path = Path(path)
    raw = _read_bytes(path)
    ext = path.suffix.lower()
    head = raw.removeprefix(codecs.BOM_UTF8).lstrip()[:1]
    entries: Iterable[tuple[str, str, object]]  # (where, short location, entry)
    if ext == ".json" or (ext not in _TABLE_SUFFIXES and head == b"["):
        data = _load_json(path)
        if not isinstance(data, list):
            raise DataError(f"{path}: not a list (COCO results format is [{{\"image_id\": ..., \"caption\": ...}}])")
        entries = ((f"{path}: entry {i}", f"entry {i}", e) for i, e in enumerate(data))
    elif ext in (".jsonl", ".ndjson") or (ext not in _TABLE_SUFFIXES and head == b"{"):
        entries = ((f"{path}:{n}", f"line {n}", row) for n, row in _jsonl_rows(path, raw, _raise))
    else:
        entries = _prediction_csv_rows(path, raw, "\t" if _table_format(path, raw) == "tsv" else ",")
    predictions: dict[str, str] = {}
    first: dict[str, str] = {}
    for where, label, entry in entries:
        if not isinstance(entry, dict):
            raise DataError(f"{where}: must be an object with 'image_id' and 'caption'")
        key = next((k for k in PREDICTION_ID_KEYS if k in entry), None)
        if key is None:
            raise DataError(f"{where}: missing 'image_id' (or {' or '.join(map(repr, PREDICTION_ID_KEYS[1:]))})")
        if "caption" not in entry:
            raise DataError(f"{where}: missing 'caption'")
        image_id, caption = entry[key], entry["caption"]
        if not _is_id(image_id):
            raise DataError(f"{where}: {key} must be a non-empty string or an integer, not {image_id!r}")
        if not isinstance(caption, str):
            raise DataError(f"{where}: caption must be a string, not {type(caption).__name__}")
        image_id = str(image_id)
        if not _is_utf8(caption) or not _is_utf8(image_id):
            raise DataError(f"{where}: not valid UTF-8")
        if image_id in predictions:
            raise DataError(f"{where}: duplicate image_id {image_id!r} (first at {first[image_id]})")
        predictions[image_id] = " ".join(caption.split())
        first[image_id] = label
    if not predictions:
        raise DataError(f"{path}: no predictions")
    return predictions


def _prediction_csv_rows(path: Path, raw: bytes, delimiter: str) -> Iterator[tuple[str, str, dict]]:
    header_line, header, rows = _csv_rows(path, raw, delimiter, _raise,
                                          "a CSV of predictions (image_id,caption)")
    key = next((k for k in PREDICTION_ID_KEYS if k in header), None)
    if key is None or "caption" not in header:
        raise DataError(f"{path}:{header_line}: header needs 'caption' and 'image_id' (or 'id' or 'image'); "
                        f"it has {', '.join(map(repr, header))}")
    for where, record in rows:
        if record.get("rank", "0").strip() not in ("0", ""):
            continue  # `captioner caption --num-captions N` writes N ranked rows per image: rank 0 is the caption
        yield where, f"line {where.rsplit(':', 1)[1]}", {key: record[key], "caption": record["caption"]}


def match_prediction_ids(predictions: dict[str, str], references: dict[str, list[str]], *, source: str = "predictions"
                         ) -> dict[str, str]:
    """Key predictions by reference id. An id not found as is may be an image path (as `captioner
    caption` writes): its longest trailing path components that name a reference id are used, with or
    without the file extension ('/data/test/00012.png' -> 'test/00012'). Unknown ids, two predictions for
    one image and references without a prediction are DataErrors naming them."""
    out: dict[str, str] = {}
    origin: dict[str, str] = {}
    unknown, duplicates = [], []
    for pid, caption in predictions.items():
        key = pid if pid in references else None
        if key is None:
            p = PurePath(pid)
            for parts in (p.parts, p.with_suffix("").parts if p.suffix else ()):
                key = next(("/".join(parts[-n:]) for n in range(len(parts), 0, -1)
                            if "/".join(parts[-n:]) in references), None)
                if key is not None:
                    break
        if key is None:
            unknown.append(pid)
        elif key in out:
            duplicates.append(f"{origin[key]} and {pid} (both {key})")
        else:
            out[key], origin[key] = caption, pid

    def show(items):
        return ", ".join(map(str, items[:5])) + (f" and {len(items) - 5} more" if len(items) > 5 else "")
    if unknown:
        raise DataError(f"{source}: {len(unknown)} prediction id(s) not in the references: {show(unknown)}")
    if duplicates:
        raise DataError(f"{source}: several predictions for one image: {show(duplicates)}")
    missing = [k for k in references if k not in out]
    if missing:
        raise DataError(f"{source}: {len(missing)} reference image(s) have no prediction: {show(missing)}")
    return out


INPUT_COLUMNS = {"image": ("image", "file_name"), "audio": TABLE_AUDIO_COLUMNS}  # no id columns: paths only


def read_input_table(path: str | Path) -> tuple[list[dict[str, str]], list[str]]:
    """Inputs to caption from a CSV/TSV/JSONL table with an image column ('image' or 'file_name'), an
    audio column ('audio' or 'audio_file'), or both; relative paths start at the table's folder, empty
    cells mean the row lacks that input. Returns ({"image": path, "audio": path} per row, problems as
    "FILE:LINE: reason" for rows with no input)."""
    path = Path(path)
    raw = _read_bytes(path)
    report = ReadReport(source=str(path))
    bad = _reporter(report, strict=False)
    fmt = _table_format(path, raw)
    if fmt == "jsonl":
        rows = ((f"{path}:{n}", row) for n, row in _jsonl_rows(path, raw, bad))
    else:
        _, _, rows = _csv_rows(path, raw, "\t" if fmt == "tsv" else ",", bad, "an input table")
    items = []
    for where, row in rows:
        item = {}
        for modality, names in INPUT_COLUMNS.items():
            value = next((row[c] for c in names if isinstance(row.get(c), str) and row[c].strip()), None)
            if value is not None:
                item[modality] = str(path.parent / value.strip())
        if item:
            items.append(item)
        else:
            bad(where, f"row has no input (columns: {', '.join(n for ns in INPUT_COLUMNS.values() for n in ns)})")
    return items, report.problems
