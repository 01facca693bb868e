"""Audio caption sets: Clotho and AudioCaps captions CSVs (`read_clotho`, `read_audiocaps`), and
`audio_csv_reader`, which tells their CSVs from generic caption tables by the header.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Callable, Sequence

from captioner.data.examples import (CaptionExample, ReadReport, Reporter, check_file, clean_captions, finish,
                                     is_utf8, raise_bad)
from captioner.data.folders import collect_audio
from captioner.data.tables import read_table
from captioner.errors import DataError

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
    bad = Reporter(report, strict)
    table = read_table(path, bad, "a Clotho captions CSV", fmt="csv")
    header_line, header, rows = table.header_line, table.header, table.rows
    caption_columns = [h for h in header if re.fullmatch(r"caption_\d+", h)]
    if "file_name" not in header or not caption_columns:
        raise DataError(f"{path}:{header_line}: not a Clotho captions CSV (the header needs file_name, caption_1, "
                        f"...; it has {', '.join(map(repr, header))})")
    by_id: dict[str, CaptionExample] = {}
    for where, row in rows:
        caps, reason = clean_captions([row[c] for c in caption_columns], note=lambda what: bad.note(where, what))
        if reason is not None:
            bad(where, reason)
            continue
        for root in roots:
            audio, reason = check_file(root, row["file_name"], must_exist=require_files, what="audio")
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
    return finish(report, list(by_id.values()), "no usable clips")


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
    bad = Reporter(report, strict)
    table = read_table(path, bad, "an AudioCaps CSV", fmt="csv")
    header_line, header, rows = table.header_line, table.header, table.rows
    if not {"youtube_id", "start_time", "caption"} <= set(header):
        raise DataError(f"{path}:{header_line}: not an AudioCaps CSV (the header needs youtube_id, start_time "
                        f"and caption; it has {', '.join(map(repr, header))})")
    by_id: dict[str, CaptionExample] = {}
    clips: dict[str, tuple[str, str, str, list[str]]] = {}  # id -> (first row, youtube_id, start, audiocap ids)
    for where, row in rows:
        ytid, start = row["youtube_id"].strip(), row["start_time"].strip()
        if not ytid or not start or not is_utf8(ytid + start):
            bad(where, "row needs a youtube_id and a start_time (non-empty, valid UTF-8)")
            continue
        caps, reason = clean_captions(row["caption"], allow_list=False, note=lambda what: bad.note(where, what))
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
        return finish(report, list(by_id.values()), "no usable clips")
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
    return finish(report, examples, "no usable clips")


def _audiocaps_stems(audiocap_ids: Sequence[str], youtube_id: str, start: str) -> list[str]:
    """The file stems an AudioCaps clip may be saved under, in the order they are tried."""
    starts = [start]
    with contextlib.suppress(ValueError, OverflowError):
        t = float(start)
        if t.is_integer():
            starts += [str(int(t)), str(float(int(t)))]  # "30" and "30.0", whichever was written
    return list(dict.fromkeys([*audiocap_ids, *(f"{youtube_id}_{s}" for s in starts), f"Y{youtube_id}", youtube_id]))


def audio_csv_reader(path: Path) -> Callable[..., tuple[list[CaptionExample], ReadReport]] | None:
    """`read_clotho` or `read_audiocaps` for a .csv whose header is theirs, else None (a generic table).
    Only the header row is read: a caption set may be large."""
    if path.suffix.lower() != ".csv" or not path.is_file():
        return None
    try:
        header = set(read_table(path, raise_bad, "a CSV", fmt="csv", max_bytes=None).header)
    except DataError:
        return None  # the reader that opens it next names the reason
    if {"file_name", "caption_1"} <= header:
        return read_clotho
    if {"youtube_id", "caption"} <= header:
        return read_audiocaps
    return None

