"""Self-contained HTML report: corpus metrics, a CIDEr histogram and a per-image gallery.

`write_report` turns a list of per-image results into one HTML file that needs nothing
else to be viewed: CSS and the small sorting script are inline, thumbnails are embedded
as base64 ``data:`` URIs and the histogram is inline SVG. Every piece of text taken from
the items (ids, captions, metric names, file names) is HTML-escaped.

Each item is a mapping::

    {"image": "path/to/image.png", "id": "00012", "prediction": "a red circle ...",
     "references": ["a red circle in the top left", ...], "scores": {"CIDEr": 1.23, ...}}

``scores`` is optional; so is ``"audio": "path/to/sound.wav"``, shown in the image cell as the file name
with a player that links to the file (relative to the report; sounds are not embedded, so the player
works where the report sits next to its data). The item table is sortable by clicking a score column header and
is initially sorted worst first by CIDEr when any item has a CIDEr score (items without
one go last). An image that cannot be read gets a placeholder cell and a logged warning.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from PIL import Image, ImageOps

from captioner.files import atomic_write

logger = logging.getLogger(__name__)

__all__ = ["write_report"]

SORT_METRIC = "CIDEr"
_HIST_BINS = 10
_HIST_WIDTH = 480
_HIST_HEIGHT = 140

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.1em; margin-top: 1.5em; }
table { border-collapse: collapse; }
th, td { border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; text-align: left; }
th { background: #f2f2f2; }
th.sortable { cursor: pointer; user-select: none; white-space: nowrap; }
th.sortable::after { content: " \\2195"; color: #999; }
th[aria-sort="ascending"]::after { content: " \\2191"; color: #222; }
th[aria-sort="descending"]::after { content: " \\2193"; color: #222; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.thumb img { display: block; image-rendering: auto; }
.placeholder { display: inline-block; padding: 8px; border: 1px dashed #c66; color: #a33;
               font-size: 0.85em; max-width: 12em; word-break: break-all; }
ul.refs { margin: 0; padding-left: 1.2em; }
.prediction { font-weight: 600; }
.missing { color: #999; }
svg text { font-size: 11px; fill: #444; }
svg rect.bar { fill: #4a78c2; } svg rect.bar:hover { fill: #2b4f8a; }
"""

_JS = """
(function () {
  var table = document.getElementById("items");
  if (!table) { return; }
  var tbody = table.tBodies[0];
  var headers = Array.prototype.slice.call(table.querySelectorAll("th.sortable"));
  function cellValue(row, col) {
    var v = row.cells[col].getAttribute("data-value");
    return (v === null || v === "") ? null : parseFloat(v);
  }
  function sortBy(th) {
    var col = parseInt(th.getAttribute("data-col"), 10);
    var asc = th.getAttribute("aria-sort") !== "ascending";
    headers.forEach(function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", asc ? "ascending" : "descending");
    var rows = Array.prototype.slice.call(tbody.rows);
    rows.sort(function (a, b) {
      var x = cellValue(a, col), y = cellValue(b, col);
      var ia = parseInt(a.getAttribute("data-index"), 10);
      var ib = parseInt(b.getAttribute("data-index"), 10);
      if (x === null && y === null) { return ia - ib; }
      if (x === null) { return 1; }   /* missing values always last */
      if (y === null) { return -1; }
      if (x === y) { return ia - ib; }
      return asc ? x - y : y - x;
    });
    rows.forEach(function (r) { tbody.appendChild(r); });
  }
  headers.forEach(function (th) {
    th.addEventListener("click", function () { sortBy(th); });
    th.addEventListener("keydown", function (e) {
      if (e.key === "Enter" || e.key === " ") { e.preventDefault(); sortBy(th); }
    });
  });
})();
"""


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _as_float(value: Any) -> float:
    """A score as a float; NaN for anything that is not a number."""
    if isinstance(value, bool):
        return float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _fmt(value: float) -> str:
    """A score for display: four decimals, or nan/inf/-inf."""
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.4f}"


def _data_value(value: float) -> str:
    """A score for the ``data-value`` sort key, readable by JavaScript's parseFloat."""
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return repr(value)


def _thumbnail(image_path: Any, thumb_size: int) -> str:
    """An ``<img>`` tag with the thumbnail as a data URI, or a placeholder ``<span>``."""
    if image_path is None or image_path == "":
        return '<span class="placeholder">no image given</span>'
    try:
        with Image.open(image_path) as img:
            source_format = img.format
            img = ImageOps.exif_transpose(img)
            img.thumbnail((thumb_size, thumb_size))
            if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                img = Image.new("RGB", rgba.size, (255, 255, 255))
                img.paste(rgba, mask=rgba.getchannel("A"))
            else:
                img = img.convert("RGB")
            buf = io.BytesIO()
            if source_format == "JPEG":
                img.save(buf, format="JPEG", quality=85)
                mime = "image/jpeg"
            else:
                img.save(buf, format="PNG", optimize=True)
                mime = "image/png"
    except Exception as exc:  # any unreadable image becomes a placeholder, not a crash
        logger.warning("cannot read image %s: %s", image_path, exc)
        return f'<span class="placeholder">image unavailable: {_esc(Path(str(image_path)).name)}</span>'
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return (
        f'<img src="data:{mime};base64,{data}" width="{img.width}" height="{img.height}" '
        f'alt="{_esc(Path(str(image_path)).name)}">'
    )


def _corpus_table(corpus: Mapping[str, float]) -> str:
    rows = "".join(
        f'<tr><th scope="row">{_esc(name)}</th><td class="num">{_esc(_fmt(_as_float(v)))}</td></tr>'
        for name, v in corpus.items()
    )
    return (
        '<h2>Corpus metrics</h2>\n<table id="corpus"><thead><tr><th>metric</th>'
        f'<th class="num">value</th></tr></thead><tbody>{rows}</tbody></table>\n'
    )


def _histogram(values: Sequence[float], metric: str) -> str:
    """Inline SVG histogram of the finite ``values``."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return ""
    lo, hi = min(0.0, min(finite)), max(finite)
    if hi <= lo:
        hi = lo + 1.0
    n_bins = _HIST_BINS
    step = (hi - lo) / n_bins
    counts = [0] * n_bins
    for v in finite:
        counts[min(int((v - lo) / step), n_bins - 1)] += 1
    top = max(counts)
    left, bottom, pad_top = 30, 20, 8
    plot_w, plot_h = _HIST_WIDTH - left - 10, _HIST_HEIGHT - bottom - pad_top
    bar_w = plot_w / n_bins
    parts = []
    for i, count in enumerate(counts):
        h = plot_h * count / top if top else 0.0
        x = left + i * bar_w
        y = pad_top + plot_h - h
        a, b = lo + i * step, lo + (i + 1) * step
        closing = "]" if i == n_bins - 1 else ")"
        parts.append(
            f'<rect class="bar" x="{x + 1:.1f}" y="{y:.1f}" width="{bar_w - 2:.1f}" '
            f'height="{h:.1f}"><title>[{a:.3g}, {b:.3g}{closing}: {count}</title></rect>'
        )
    base_y = pad_top + plot_h
    parts.append(
        f'<line x1="{left}" y1="{base_y}" x2="{left + plot_w}" y2="{base_y}" stroke="#666"/>'
    )
    parts.append(f'<text x="{left}" y="{base_y + 14}" text-anchor="middle">{lo:.3g}</text>')
    parts.append(  # right-aligned: a centred label would be cut at the SVG's edge
        f'<text x="{left + plot_w}" y="{base_y + 14}" text-anchor="end">{hi:.3g}</text>'
    )
    parts.append(f'<text x="{left - 4}" y="{pad_top + 10}" text-anchor="end">{top}</text>')
    parts.append(f'<text x="{left - 4}" y="{base_y}" text-anchor="end">0</text>')
    mean = sum(finite) / len(finite)
    label = (
        f"per-image {metric}: n={len(finite)}, mean={mean:.3f}, "
        f"min={min(finite):.3f}, max={max(finite):.3f}"
    )
    return (
        f"<h2>Per-image {_esc(metric)}</h2>\n"
        f'<svg id="histogram" role="img" aria-label="{_esc(label)}" width="{_HIST_WIDTH}" '
        f'height="{_HIST_HEIGHT}" viewBox="0 0 {_HIST_WIDTH} {_HIST_HEIGHT}">'
        f"<title>{_esc(label)}</title>{''.join(parts)}</svg>\n"
        f"<p>{_esc(label)}</p>\n"
    )


def _normalise(item: Mapping, index: int) -> dict[str, Any]:
    if not isinstance(item, Mapping):
        raise TypeError(f"item {index} must be a mapping, got {type(item).__name__}")
    refs = item.get("references") or []
    if isinstance(refs, str):
        refs = [refs]
    scores = item.get("scores") or {}
    if not isinstance(scores, Mapping):
        raise TypeError(f"item {index}: 'scores' must be a mapping, got {type(scores).__name__}")
    return {
        "index": index,
        "image": item.get("image"),
        "audio": item.get("audio"),
        "id": str(item.get("id", index)),
        "prediction": str(item.get("prediction", "")),
        "references": [str(r) for r in refs],
        "scores": {str(k): _as_float(v) for k, v in scores.items()},
    }


def _audio(audio_path: Any, report_dir: Path) -> str:
    """The sound's file name and a player linking to it, relative to the report's folder."""
    import os
    from urllib.parse import quote

    try:
        src = os.path.relpath(os.path.abspath(str(audio_path)), os.path.abspath(report_dir))
    except ValueError:  # another drive (Windows): keep the absolute path
        src = os.path.abspath(str(audio_path))
    name = Path(str(audio_path)).name
    return (f'<div class="audio">&#128266; {_esc(name)}<br>'
            f'<audio controls preload="none" src="{_esc(quote(Path(src).as_posix()))}"></audio></div>')


def write_report(
    path: str | Path,
    items: Sequence[Mapping],
    *,
    title: str = "captioner report",
    corpus: Mapping[str, float] | None = None,
    thumb_size: int = 128,
) -> Path:
    """Write a self-contained HTML report of ``items`` to ``path`` and return the path.

    Shows the ``corpus`` metrics (if given), a histogram of per-image CIDEr (if any item
    has one) and a table with a thumbnail (longest side ``thumb_size``), the id, the
    prediction, the references and the per-image scores of every item, initially sorted
    worst first by CIDEr. Parent folders of ``path`` are created.
    """
    if thumb_size < 1:
        raise ValueError(f"thumb_size must be positive, got {thumb_size}")
    rows_data = [_normalise(item, i) for i, item in enumerate(items)]

    # Score columns in order of first appearance, CIDEr first.
    metrics: list[str] = []
    for row in rows_data:
        for name in row["scores"]:
            if name not in metrics:
                metrics.append(name)
    has_sort_metric = SORT_METRIC in metrics
    if has_sort_metric:
        metrics.remove(SORT_METRIC)
        metrics.insert(0, SORT_METRIC)

        def key(row: dict[str, Any]) -> tuple[int, float]:
            v = row["scores"].get(SORT_METRIC, math.nan)
            return (1, 0.0) if math.isnan(v) else (0, v)

        rows_data.sort(key=key)  # stable: ties keep their input order

    fixed_cols = ["#", "image", "id", "prediction", "references"]
    head = ['<th class="sortable num" data-col="0" tabindex="0">#</th>']
    head += [f"<th>{name}</th>" for name in fixed_cols[1:]]
    for j, name in enumerate(metrics):
        sort_attr = ' aria-sort="ascending"' if has_sort_metric and j == 0 else ""
        head.append(
            f'<th class="sortable num" data-col="{len(fixed_cols) + j}" tabindex="0"'
            f'{sort_attr}>{_esc(name)}</th>'
        )

    body = []
    for row in rows_data:
        refs = "".join(f"<li>{_esc(r)}</li>" for r in row["references"])
        media = _thumbnail(row["image"], thumb_size) if row["image"] or not row["audio"] else ""
        if row["audio"]:
            media += _audio(row["audio"], Path(path).parent)
        cells = [
            f'<td class="num" data-value="{row["index"]}">{row["index"]}</td>',
            f'<td class="thumb">{media}</td>',
            f"<td>{_esc(row['id'])}</td>",
            f'<td class="prediction">{_esc(row["prediction"])}</td>',
            f'<td><ul class="refs">{refs}</ul></td>',
        ]
        for name in metrics:
            v = row["scores"].get(name)
            if v is None or math.isnan(v):
                text = "n/a" if v is None else "nan"
                cells.append(f'<td class="num missing" data-value="">{text}</td>')
            else:
                cells.append(f'<td class="num" data-value="{_data_value(v)}">{_esc(_fmt(v))}</td>')
        body.append(
            f'<tr data-index="{row["index"]}" data-id="{_esc(row["id"])}">{"".join(cells)}</tr>'
        )

    sections = [f"<h1>{_esc(title)}</h1>\n"]
    if corpus:
        sections.append(_corpus_table(corpus))
    if has_sort_metric:
        sections.append(
            _histogram([r["scores"].get(SORT_METRIC, math.nan) for r in rows_data], SORT_METRIC)
        )
    note = " (click a score header to sort"
    note += f"; initially worst first by {SORT_METRIC})" if has_sort_metric else ")"
    sections.append(f"<h2>Images: {len(rows_data)}{_esc(note)}</h2>\n")
    sections.append(
        f'<table id="items"><thead><tr>{"".join(head)}</tr></thead>\n<tbody>\n'
        + "\n".join(body)
        + "\n</tbody></table>\n"
    )

    document = (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "".join(sections)
        + f"<script>{_JS}</script>\n</body>\n</html>\n"
    )
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, document)  # whole or not at all: a kill never leaves half a report
    logger.info("wrote report with %d items to %s", len(rows_data), out)
    return out
