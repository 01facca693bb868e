"""Hugging Face `datasets` datasets as caption sets (`read_hf_dataset`).

`read_hf_dataset` reads any `datasets` dataset: a directory written by `save_to_disk`, a local data
directory or file `load_dataset` understands (imagefolder, parquet, csv, json, arrow), or a hub name
"hf:owner/name" (optionally "hf:owner/name:config"). The rest of the project needs image and audio FILES
(the feature cache keys on path, size and mtime), so images and sounds that are not files on disk are
written once to `cache_dir/<dataset fingerprint>/<split>/<row index>.<ext>` (audio: `<row index>.audio<ext>`)
and reused by later reads. Paths in cells must stay inside the dataset's folder (a hub dataset: the
Hugging Face caches), like paths in folders and tables, unless `allow_outside_paths`.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import NamedTuple, Sequence

from PIL import Image, UnidentifiedImageError

from captioner import hub
from captioner.data.columns import (AUDIO_COLUMNS, CAPTION_COLUMNS, GENERIC_PATH_COLUMNS, ID_COLUMNS, IMAGE_COLUMNS,
                                    MERGED_CAPTION_COLUMNS, caption_keys)
from captioner.data.examples import (CaptionExample, ReadReport, Reporter, clean_captions, finish, inside, is_id,
                                     path_problem, short)
from captioner.data.folders import AUDIO_EXTENSIONS, IMAGE_EXTENSIONS
from captioner.errors import DataError
from captioner.files import atomic_write

HF_PREFIX = "hf:"
HF_SAVED_MARKERS = ("dataset_dict.json", "state.json", "dataset_info.json")  # what save_to_disk writes
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
    """The caption column(s): named ("caption" or "caption_1,caption_2,..."), else those of
    `columns.caption_keys`, else every numbered column caption_1, caption_2, ... (Clotho on the hub), in order."""
    if wanted is not None:
        return [_pick_column(spec, columns, name.strip(), CAPTION_COLUMNS, "caption") for name in wanted.split(",")]
    numbered = sorted((c for c in columns if re.fullmatch(r"captions?_\d+", c)),
                      key=lambda c: int(c.rsplit("_", 1)[1]))
    if numbered and not any(c in columns for c in CAPTION_COLUMNS):
        return numbered
    return caption_keys(columns, CAPTION_COLUMNS) or [_pick_column(spec, columns, None, CAPTION_COLUMNS, "caption")]


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


def _hub_caches() -> list[Path]:
    """Where files of hub datasets are: the datasets cache and the hub's download cache."""
    import datasets
    from huggingface_hub import constants

    return [Path(datasets.config.HF_DATASETS_CACHE).expanduser(), Path(constants.HF_HUB_CACHE).expanduser()]


def _write_cache(target: Path, data: bytes) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, data)
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


def _media_path(name: str, kind: str, *, root: Path | None, allowed: list[Path] | None, cwd: bool
                ) -> tuple[str | None, str]:
    """(path, "") of the existing file a cell's path names, or (None, why not). Relative paths start at the
    dataset's folder `root` (and, with `cwd`, the working directory); a path outside every folder of
    `allowed` (None: anywhere) is refused before the file system is asked about it."""
    reason = path_problem(name, kind)
    if reason is not None:
        return None, reason
    p = Path(name).expanduser()
    candidates = [p] if p.is_absolute() else [*([root / p] if root is not None else []), *([p] if cwd else [])]
    outside = False
    for i, c in enumerate(candidates):
        try:
            contained = allowed is None or any(inside(r, c) for r in allowed)
            if i == 0 and not contained:
                outside = True  # the path escapes the dataset: its file is never looked at
            elif c.is_file():
                if contained:
                    return str(c), ""
                outside = True  # found from the working directory, outside the dataset
        except (OSError, RuntimeError):  # RuntimeError: symlink loop
            continue
    if outside:
        return None, f"{kind} path {short(name)} escapes the dataset folder (see allow_outside_paths)"
    return None, f"{kind} file {short(name)} not found"


def _hf_media_file(value, kind: str, *, root: Path | None, folder: Path, index: int,
                   allowed: list[Path] | None) -> tuple[str, str | None]:
    """One image or audio cell (`kind`) -> (path of a file, None), or ("", reason). A path that exists
    (absolute, or relative to the dataset's folder; a bare path string also relative to the working directory)
    inside the `allowed` folders is used as is; bytes or a decoded image/sound are written once to
    folder/<index><ext> (images) or folder/<index>.audio<ext> (audio)."""
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
        found, why = _media_path(name, kind, root=root, allowed=allowed, cwd=data is None)
        if found is not None:
            return found, None
        if not data:  # with bytes, the bytes are used instead
            return "", why
    if not data:
        return "", f"{kind} has neither bytes nor a path"
    ext = Path(name).suffix.lower() if name and len(name) < 4096 else ""
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
        _write_cache(target, bytes(data))
    return str(target), None


def read_hf_dataset(spec: str, split: str | None, *, image_column: str | None = None,
                    caption_column: str | None = None, strict: bool = False,
                    cache_dir: str | Path | None = None, audio_column: str | None = None,
                    allow_outside_paths: bool = False) -> tuple[list[CaptionExample], ReadReport]:
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
    columns caption_1, caption_2, ... are all read when no column of `CAPTION_COLUMNS` is there.
    image_id is the `image_id`/`id` column (as a string) when there is one, rows
    with equal ids being merged (the first row's files are kept), else "<split>/<row>".

    A column of None is auto-detected: audio is the `Audio` feature column, else the first of
    `AUDIO_COLUMNS`; captions those of `columns.caption_keys`; the image the first of `IMAGE_COLUMNS`,
    which must be there unless the dataset has audio (then an `Image` feature column, else a non-generic
    image name, or none: an audio-only set). With both columns a None cell is no input for that row. A named
    column must exist. Problem rows are reported as "SPEC: split[row]: reason".

    A path in a cell must stay inside the dataset's folder (a hub dataset's: the Hugging Face caches), as
    in folders and tables; `allow_outside_paths=True` reads absolute and '../' paths wherever they point."""
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
        audio_column = _pick_column(spec, columns, audio_column, AUDIO_COLUMNS, "audio")
    else:
        audio_column = next((c for c in columns if isinstance(features[c], datasets.Audio)), None) or next(
            (c for c in AUDIO_COLUMNS if c in columns), None)
    if image_column is not None or audio_column is None:
        image_column = _pick_column(spec, columns, image_column, IMAGE_COLUMNS, "image")
    else:  # optional next to audio (Clotho has none); a generic path column there is likely the sound's
        image_column = next((c for c in columns if isinstance(features[c], datasets.Image)), None) or next(
            (c for c in IMAGE_COLUMNS if c in columns and c not in GENERIC_PATH_COLUMNS), None)
    caption_columns = _hf_caption_columns(spec, columns, caption_column)
    media = {kind: c for kind, c in (("image", image_column), ("audio", audio_column)) if c is not None}
    id_column = next((c for c in ID_COLUMNS if c in columns and c not in (*media.values(), *caption_columns)),
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
    allowed = None if allow_outside_paths else [root] if root is not None else _hub_caches()
    safe_label = "".join(ch if ch.isalnum() or ch in "-_.+" else "_" for ch in label) or "split"
    cache_root = Path(cache_dir if cache_dir is not None else DEFAULT_HF_IMAGE_CACHE).expanduser()
    folder = cache_root / fingerprint / safe_label

    report = ReadReport(source=spec)
    bad = Reporter(report, strict)
    if caption_column is None and len(caption_columns) > 1 and set(caption_columns) <= set(MERGED_CAPTION_COLUMNS):
        bad.note(spec, f"has both {' and '.join(map(repr, caption_columns))}: the captions of both are used")
    by_id: dict[str, CaptionExample] = {}
    for index, row in enumerate(ds):
        where = f"{spec}: {label}[{index}]"
        if len(caption_columns) == 1:
            caps, reason = clean_captions(row[caption_columns[0]], note=lambda what: bad.note(where, what))
        else:  # several columns: an empty cell is no caption, as in Clotho's CSVs
            values = []
            for cell in (row[c] for c in caption_columns):
                values.extend(cell if isinstance(cell, list) else [] if cell is None else [cell])
            caps, reason = clean_captions(values, note=lambda what: bad.note(where, what))
        if reason is not None:
            bad(where, reason)
            continue
        if id_column is not None:
            raw_id = row[id_column]
            if not is_id(raw_id):
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
                paths[kind], reason = _hf_media_file(value, kind, root=root, folder=folder, index=index,
                                                     allowed=allowed)
        if reason is not None:
            bad(where, reason)
            continue
        by_id[key] = CaptionExample(image_id=key, image=paths.get("image"), captions=caps, split=label,
                                    audio=paths.get("audio"))
    return finish(report, list(by_id.values()), f"no usable rows in split {label!r}")

