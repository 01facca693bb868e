"""Predictions for scoring (`read_predictions`, `match_prediction_ids`) and input tables for captioning
(`read_input_table`); both are read by the one table reader (JSON lists aside).
"""

from __future__ import annotations

import logging
from pathlib import Path, PurePath
from typing import Iterable, Iterator

from captioner.data.caption_tables import table_keys
from captioner.data.columns import AUDIO_COLUMNS, IMAGE_COLUMNS, PREDICTION_ID_COLUMNS, first_present
from captioner.data.examples import MAX_NAME_CHARS, MAX_PATH_BYTES, ReadReport, Reporter, clean_caption, is_id, is_utf8, raise_bad, short
from captioner.data.tables import TABLE_SUFFIXES, head, load_json, read_table
from captioner.errors import DataError

logger = logging.getLogger(__name__)


def read_predictions(path: str | Path, *, rank: int = 0) -> dict[str, str]:
    """Predicted captions for scoring, {image id: caption}, from a COCO results JSON
    (`[{"image_id", "caption"}]`), JSONL (one object per line, as `captioner caption` writes) or CSV/TSV
    (header with caption and an id column). Files with several captions per item (`captioner caption
    --num-captions N`: a CSV 'rank' column, JSONL 'captions' lists) give the captions of `rank` (default 0,
    the best); which rank is scored is logged, and a rank no row has is a DataError naming the ranks there. The id is the
    first of `columns.PREDICTION_ID_COLUMNS` present (image_id, id, or an image or audio path column), as a
    string. Any problem is a DataError naming the file and the line (JSONL, CSV) or entry index (JSON):
    predictions are all-or-nothing. Captions are cleaned like references (`examples.clean_caption`)."""
    path = Path(path)
    ext = path.suffix.lower()
    start = head(path).lstrip()[:1]
    entries: Iterable[tuple[str, str, object]]  # (where, short location, entry)
    ranks: set[int] = set()  # ranks present in a file with several captions per item
    if ext == ".json" or (ext not in TABLE_SUFFIXES and start == b"["):
        data = load_json(path)
        if not isinstance(data, list):
            raise DataError(f"{path}: not a list (COCO results format is [{{\"image_id\": ..., \"caption\": ...}}])")
        entries = ((f"{path}: entry {i}", f"entry {i}", e) for i, e in enumerate(data))
    else:
        fmt = "jsonl" if ext in (".jsonl", ".ndjson") or (ext not in TABLE_SUFFIXES and start == b"{") else None
        table = read_table(path, raise_bad, "a CSV of predictions (image_id,caption)", fmt=fmt)
        entries = _prediction_rows(table, rank, ranks)
    predictions: dict[str, str] = {}
    first: dict[str, str] = {}
    for where, label, entry in entries:
        if not isinstance(entry, dict):
            raise DataError(f"{where}: must be an object with 'image_id' and 'caption'")
        key = first_present(entry, PREDICTION_ID_COLUMNS)
        if key is None:
            raise DataError(f"{where}: missing 'image_id' (or {' or '.join(map(repr, PREDICTION_ID_COLUMNS[1:]))})")
        if "caption" not in entry:
            raise DataError(f"{where}: missing 'caption'")
        image_id, caption = entry[key], entry["caption"]
        if not is_id(image_id):
            raise DataError(f"{where}: {key} must be a non-empty string or an integer, not {short(image_id)}")
        if not isinstance(caption, str):
            raise DataError(f"{where}: caption must be a string, not {type(caption).__name__}")
        image_id = str(image_id)
        if not is_utf8(caption) or not is_utf8(image_id):
            raise DataError(f"{where}: not valid UTF-8")
        if image_id in predictions:
            raise DataError(f"{where}: duplicate image_id {short(image_id)} (first at {first[image_id]})")
        predictions[image_id] = clean_caption(caption)[0]
        first[image_id] = label
    if ranks:
        if rank not in ranks:
            raise DataError(f"{path}: no predictions of rank {rank} (the file has ranks {_span(ranks)})")
        logger.info("%s: %d captions per item (ranks %s); scoring rank %d", path, len(ranks), _span(ranks), rank)
    elif rank:
        raise DataError(f"{path}: one caption per item (no ranks); only rank 0 can be scored")
    if not predictions:
        raise DataError(f"{path}: no predictions")
    return predictions


def _span(ranks: set[int]) -> str:
    return f"{min(ranks)}-{max(ranks)}" if len(ranks) > 1 else str(min(ranks))


def _prediction_rows(table, rank: int, ranks: set[int]) -> Iterator[tuple[str, str, dict]]:
    """(where, "line N", row) of a JSONL or CSV/TSV predictions table; CSV rows keep the id and caption
    columns, and only `rank` where there is a 'rank' column; a JSONL row with a 'captions' list gives its
    `rank`th caption. The ranks seen are added to `ranks`."""
    if table.header is None:
        for where, row in table.rows:
            captions = row.get("captions")
            if isinstance(captions, list) and captions:
                ranks.update(range(len(captions)))
                if rank >= len(captions):
                    continue
                row = {**row, "caption": captions[rank]}
            elif rank:
                continue  # one caption: it is rank 0
            yield where, f"line {where.rsplit(':', 1)[1]}", row
        return
    key = first_present(table.header, PREDICTION_ID_COLUMNS)
    if key is None or "caption" not in table.header:
        raise DataError(f"{table.where()}: header needs 'caption' and an id column (one of "
                        f"{', '.join(map(repr, PREDICTION_ID_COLUMNS))}); it has {', '.join(map(short, table.header))}")
    for where, record in table.rows:
        if "rank" in record:  # `captioner caption --num-captions N` writes N ranked rows per image
            value = record["rank"].strip() or "0"
            if not value.isdigit():
                raise DataError(f"{where}: rank must be a whole number, not {short(value)}")
            ranks.add(int(value))
            if int(value) != rank:
                continue
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
    # no reference id has more components than this: longer tails are not tried (linear in the id's length)
    depth = max((k.count("/") + 1 for k in references), default=1)
    for pid, caption in predictions.items():
        key = pid if pid in references else None
        if key is None and len(pid) <= MAX_PATH_BYTES:
            p = PurePath(pid)
            for parts in (p.parts, p.with_suffix("").parts if p.suffix else ()):
                key = next(("/".join(parts[-n:]) for n in range(min(len(parts), depth), 0, -1)
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
        cut = [s if len(s) <= MAX_NAME_CHARS else s[:MAX_NAME_CHARS] + "..." for s in map(str, items[:5])]
        return ", ".join(cut) + (f" and {len(items) - 5} more" if len(items) > 5 else "")
    if unknown:
        raise DataError(f"{source}: {len(unknown)} prediction id(s) not in the references: {show(unknown)}")
    if duplicates:
        raise DataError(f"{source}: several predictions for one image: {show(duplicates)}")
    missing = [k for k in references if k not in out]
    if missing:
        raise DataError(f"{source}: {len(missing)} reference image(s) have no prediction: {show(missing)}")
    return out



def read_input_table(path: str | Path) -> tuple[list[dict[str, str]], list[str]]:
    """Inputs to caption from a CSV/TSV/JSONL table with an image column (the first of
    `columns.IMAGE_COLUMNS`), an audio column (`columns.AUDIO_COLUMNS`), or both (next to audio, generic
    path columns are not images: see `columns.image_candidates`); relative paths start at the table's
    folder, empty cells mean the row lacks that input. Returns ({"image": path, "audio": path} per row,
    problems as "FILE:LINE: reason" for rows with no input)."""
    path = Path(path)
    report = ReadReport(source=str(path))
    bad = Reporter(report, strict=False)
    table = read_table(path, bad, "an input table")
    keys = table_keys(table.header, IMAGE_COLUMNS, AUDIO_COLUMNS) if table.header is not None else None
    items = []
    for where, row in table.rows:
        image_key, audio_key, _ = keys or table_keys(row, IMAGE_COLUMNS, AUDIO_COLUMNS)
        item, too_long = {}, None
        for modality, column in (("image", image_key), ("audio", audio_key)):
            value = row.get(column) if column is not None else None
            if isinstance(value, str) and value.strip():
                if len(value.encode("utf-8", "surrogateescape")) > MAX_PATH_BYTES:
                    too_long = f"{modality} path {short(value)} is longer than {MAX_PATH_BYTES} bytes"
                item[modality] = str(path.parent / value.strip())
        if too_long:
            bad(where, too_long)
        elif item:
            items.append(item)
        else:
            bad(where, f"row has no input (columns: {', '.join((*IMAGE_COLUMNS, *AUDIO_COLUMNS))})")
    return items, report.problems
