"""Caption tables: CSV/TSV/JSONL files with an image and/or audio column and a caption column
(`read_caption_table`), and the row logic shared with imagefolder metadata (`read_rows`, `table_keys`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from captioner.data.columns import (AUDIO_COLUMNS, CAPTION_COLUMNS, TABLE_IMAGE_COLUMNS, caption_keys, first_present,
                                    image_candidates)
from captioner.data.examples import (CaptionExample, ReadReport, Reporter, check_file, clean_captions, finish, is_id,
                                     short)
from captioner.data.tables import read_table, table_format
from captioner.errors import DataError


def table_keys(present: Iterable[str], image_columns: Sequence[str], audio_columns: Sequence[str],
               caption_columns: Sequence[str] = ()) -> tuple[str | None, str | None, list[str]]:
    """(image key, audio key, caption keys) among the columns `present`: the first image and audio
    candidate there (next to audio, see `columns.image_candidates`), the caption columns of
    `columns.caption_keys`."""
    present = set(present)
    audio_key = first_present(present, audio_columns)
    image_key = first_present(present, image_candidates(image_columns, audio_key is not None))
    return image_key, audio_key, caption_keys(present, caption_columns)


def row_inputs(row: dict, image_key: str | None, audio_key: str | None) -> dict[str, object]:
    """{"image"/"audio": cell} of the inputs a table row gives. Next to an audio column an empty cell is no
    input (an audio-only row of an image+audio table); without one, the image cell is taken as it is, so an
    empty image is reported as such. JSONL integer ids become strings."""
    if audio_key is None:
        cells = {"image": row[image_key]} if image_key is not None else {}
    else:
        cells = {m: row[k] for m, k in (("image", image_key), ("audio", audio_key))
                 if k is not None and row.get(k) is not None and not (isinstance(row[k], str) and not row[k].strip())}
    return {m: str(v) if is_id(v) and not isinstance(v, str) else v for m, v in cells.items()}


def _table_rows(path: Path, image_columns: Sequence[str], audio_columns: Sequence[str],
                caption_columns: Sequence[str], bad: Reporter, audio_required: bool
                ) -> Iterator[tuple[str, dict, str | None, str | None, list[str]]]:
    """(where, row, image key, audio key, caption keys) for each table row; keys are None (captions: [])
    when the row (a JSONL line) or the header (CSV/TSV) lacks them. A header needs a caption column and an
    image or audio column; an audio column named by the caller (`audio_required`) must be there."""
    fmt = table_format(path)
    table = read_table(path, bad, f"a {fmt.upper()} caption table", fmt=fmt)
    if table.header is None:
        for where, row in table.rows:
            yield (where, row, *table_keys(row, image_columns, audio_columns, caption_columns))
        return
    header = table.header
    image_key, audio_key, captions_at = table_keys(header, image_columns, audio_columns, caption_columns)
    has = f"the header has {', '.join(map(short, header))}"
    if audio_key is None and audio_required:
        raise DataError(f"{table.where()}: no audio column {audio_columns[0]!r} ({has})")
    if image_key is None and audio_key is None:
        nor = f"; nor an audio column: {', '.join(map(repr, audio_columns))}" if audio_columns else ""
        raise DataError(f"{table.where()}: no image column (looked for "
                        f"{', '.join(map(repr, image_columns))}{nor}; {has})")
    if not captions_at:
        raise DataError(f"{table.where()}: no caption column (looked for "
                        f"{', '.join(map(repr, caption_columns))}; {has})")
    for where, row in table.rows:
        yield where, row, image_key, audio_key, captions_at


def read_rows(path: Path, *, image_columns: Sequence[str], caption_columns: Sequence[str],
              audio_columns: Sequence[str] = (), strict: bool, require_images: bool, split: str,
              audio_required: bool = False, image_id: Callable[[str], str] | None = None,
              image_root: str | Path | None = None) -> tuple[list[CaptionExample], ReadReport]:
    """Shared body of `read_caption_table` and the imagefolder readers. Each row needs a caption and an
    image or audio path; the id comes from the image path, else the audio path (`image_id` of it, default:
    the path normalised). Rows with the same id are one example, their captions merged, the first row's
    files kept (a row naming another file under that id is reported). A row with both 'caption' and 'captions' gives both (noted)."""
    report = ReadReport(source=str(path))
    bad = Reporter(report, strict)
    roots = {"image": Path(image_root) if image_root is not None else path.parent, "audio": path.parent}
    examples: list[CaptionExample] = []
    by_id: dict[str, tuple[str, CaptionExample]] = {}  # id -> (where first seen, example)
    merged_columns = False
    for where, row, image_key, audio_key, captions_at in _table_rows(path, image_columns, audio_columns,
                                                                      caption_columns, bad, audio_required):
        cells = row_inputs(row, image_key, audio_key)
        if not cells:  # (an empty cell counts as no field where audio may stand in for the image)
            audio = f" or an audio field ({' or '.join(map(repr, audio_columns))})" if audio_columns else ""
            bad(where, f"row needs an image field ({' or '.join(map(repr, image_columns))}){audio}")
            continue
        if not captions_at:
            bad(where, f"row needs a caption field ({' or '.join(map(repr, caption_columns))})")
            continue
        value = row[captions_at[0]]
        if len(captions_at) > 1:  # 'caption' and 'captions': one concept, both read
            value = [c for k in captions_at for c in (row[k] if isinstance(row[k], list) else [row[k]])]
            if not merged_columns:
                merged_columns = True
                bad.note(where, f"rows have both {' and '.join(map(repr, captions_at))}: the captions of both are used")
        caps, reason = clean_captions(value, note=lambda what: bad.note(where, what))
        paths: dict[str, str] = {}
        for modality, name in cells.items():
            if reason is None:
                paths[modality], reason = check_file(roots[modality], name, must_exist=require_images, what=modality)
        if reason is not None:
            bad(where, reason)
            continue
        name = cells.get("image", cells.get("audio"))
        key = image_id(name) if image_id else os.path.normpath(name).replace(os.sep, "/")
        if key in by_id:
            first, example = by_id[key]
            if any(example.inputs.get(m, p) != p for m, p in paths.items()):
                bad(where, f"id {short(key)} is already another item's (first at {first}; its files: "
                           f"{', '.join(map(short, example.inputs.values()))})")
                continue
            example.captions.extend(caps)
            continue
        example = CaptionExample(image_id=key, image=paths.get("image"), captions=caps, split=split,
                                 audio=paths.get("audio"))
        by_id[key] = (where, example)
        examples.append(example)
    return finish(report, examples)


def read_caption_table(path: str | Path, *, image_column: str | None = "image", caption_column: str | None = "caption",
                       audio_column: str | None = None, strict: bool = False, require_images: bool = True,
                       image_root: str | Path | None = None) -> tuple[list[CaptionExample], ReadReport]:
    """A CSV, TSV (extension .tsv, or more tabs than commas in the header) or JSONL (extension .jsonl, or
    content starting with '{') table with one caption per row; rows naming the same item are grouped in
    first-seen order. Image paths are relative to `image_root` (default: the table's folder) and must stay
    inside it; the image id is that path,
    normalised ('./a.jpg' -> 'a.jpg'). An imagefolder `metadata.csv` reads with image_column="file_name".
    A column of None is auto-detected (`columns.TABLE_IMAGE_COLUMNS`, `columns.CAPTION_COLUMNS`). JSONL
    rows may hold a list of captions. Problems carry the file's own line numbers (a quoted CSV field may
    span lines: the row's first line is given). Examples' split is the file's stem.

    Audio: an audio column (`audio_column`, which must then exist; None: the first of
    `columns.AUDIO_COLUMNS` present, if any) holds sound-file paths, relative like image paths. With one,
    the image column is optional (an audio-only table is fine; id and generic path columns are then not
    taken for image paths unless named): each row needs an image or an audio path, and the id is the
    normalised image path, else the normalised audio path. `require_images=False` skips both files'
    existence checks."""
    path = Path(path)
    return read_rows(path, image_columns=(image_column,) if image_column else TABLE_IMAGE_COLUMNS,
                     audio_columns=(audio_column,) if audio_column else AUDIO_COLUMNS,
                     caption_columns=(caption_column,) if caption_column else CAPTION_COLUMNS,
                     strict=strict, require_images=require_images, split=path.stem,
                     audio_required=audio_column is not None, image_root=image_root)
