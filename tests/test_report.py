"""Tests for the self-contained HTML report writer (captioner.scoring.report)."""

from __future__ import annotations

import base64
import io
import logging
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from captioner.scoring.report import write_report


class _Collector(HTMLParser):
    """Collects item-table rows, their score cells, image sources and external references."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict] = []
        self.img_srcs: list[str] = []
        self.refs: list[str] = []  # every src/href attribute
        self.headers: list[dict] = []
        self._in_items = False
        self._cell: dict | None = None
        self._th: dict | None = None
        self.texts: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for name in ("src", "href"):
            if name in a:
                self.refs.append(a[name])
        if tag == "table" and a.get("id") == "items":
            self._in_items = True
        if not self._in_items:
            return
        if tag == "tr" and "data-id" in a:
            self.rows.append({"id": a["data-id"], "index": int(a["data-index"]), "cells": []})
        elif tag == "td" and self.rows:
            self._cell = {"attrs": a, "text": ""}
            self.rows[-1]["cells"].append(self._cell)
        elif tag == "th":
            self._th = {"attrs": a, "text": ""}
            self.headers.append(self._th)
        elif tag == "img":
            self.img_srcs.append(a.get("src", ""))

    def handle_endtag(self, tag):
        if tag == "table":
            self._in_items = False
        if tag == "td":
            self._cell = None
        if tag == "th":
            self._th = None

    def handle_data(self, data):
        self.texts.append(data)
        if self._cell is not None:
            self._cell["text"] += data
        if self._th is not None:
            self._th["text"] += data


def _png(path: Path, size=(300, 150), colour=(200, 30, 30)) -> Path:
    Image.new("RGB", size, colour).save(path)
    return path


def _parse(path: Path) -> tuple[str, _Collector]:
    text = path.read_text(encoding="utf-8")
    parser = _Collector()
    parser.feed(text)
    parser.close()
    return text, parser


@pytest.fixture()
def items(tmp_path: Path) -> list[dict]:
    img = _png(tmp_path / "a.png")
    jpg = tmp_path / "b.jpg"
    Image.new("RGB", (64, 200), (10, 200, 10)).save(jpg, format="JPEG")
    return [
        {"image": img, "id": "mid", "prediction": "a red square",
         "references": ["a red square in the center"], "scores": {"CIDEr": 0.75, "BLEU-4": 0.5}},
        {"image": str(jpg), "id": "best", "prediction": "a green circle",
         "references": ["a green circle"], "scores": {"CIDEr": 2.5, "BLEU-4": 0.9}},
        {"image": img, "id": "worst", "prediction": "<script>alert('x')</script> & \"q\"",
         "references": ["a <b>bold</b> caption", "x < y & z > w"],
         "scores": {"CIDEr": 0.125, "BLEU-4": 0.25}},
        {"image": img, "id": "unscored", "prediction": "p", "references": []},
    ]


def test_writes_file_and_returns_path(tmp_path: Path, items: list[dict]) -> None:
    out = write_report(tmp_path / "sub" / "report.html", items, title="My <report>")
    assert out == tmp_path / "sub" / "report.html"
    text, parser = _parse(out)
    assert text.startswith("<!DOCTYPE html>")
    assert "<title>My &lt;report&gt;</title>" in text
    assert [r["id"] for r in parser.rows] and len(parser.rows) == len(items)


def test_text_is_escaped(tmp_path: Path, items: list[dict]) -> None:
    text, parser = _parse(write_report(tmp_path / "r.html", items))
    assert "<script>alert" not in text
    assert "<b>bold</b>" not in text
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; &quot;q&quot;" in text
    assert "x &lt; y &amp; z &gt; w" in text
    # Only our own inline script exists, and the decoded text round-trips.
    assert text.count("<script>") == 1
    worst = next(r for r in parser.rows if r["id"] == "worst")
    assert worst["cells"][3]["text"] == "<script>alert('x')</script> & \"q\""


def test_self_contained(tmp_path: Path, items: list[dict]) -> None:
    text, parser = _parse(write_report(tmp_path / "r.html", items, thumb_size=64))
    assert not re.search(r"https?://", text)
    assert not re.search(r"""(src|href)\s*=\s*["']?/""", text)
    assert "<link" not in text and "@import" not in text
    assert all(ref.startswith("data:image/") for ref in parser.refs)
    assert len(parser.img_srcs) == len(items)
    mimes = set()
    for src in parser.img_srcs:
        head, data = src.split(",", 1)
        assert head in ("data:image/png;base64", "data:image/jpeg;base64")
        mimes.add(head)
        with Image.open(io.BytesIO(base64.b64decode(data))) as thumb:
            assert max(thumb.size) == 64  # longest side scaled down to thumb_size
    assert mimes == {"data:image/png;base64", "data:image/jpeg;base64"}


def test_rows_sorted_worst_first_by_cider(tmp_path: Path, items: list[dict]) -> None:
    text, parser = _parse(write_report(tmp_path / "r.html", items))
    assert [r["id"] for r in parser.rows] == ["worst", "mid", "best", "unscored"]
    score_headers = [h for h in parser.headers if "sortable" in h["attrs"].get("class", "")]
    names = [h["text"].strip() for h in score_headers]
    assert names[:3] == ["#", "CIDEr", "BLEU-4"]
    cider = score_headers[1]
    assert cider["attrs"].get("aria-sort") == "ascending"
    col = int(cider["attrs"]["data-col"])
    values = [r["cells"][col]["attrs"]["data-value"] for r in parser.rows]
    assert [float(v) for v in values[:3]] == [0.125, 0.75, 2.5]
    assert values[3] == ""  # missing score: empty sort key, shown last
    assert "addEventListener" in text  # the inline sorting script is present
    # histogram of per-image CIDEr, inline SVG with one bar per bin
    assert '<svg id="histogram"' in text
    assert text.count('<rect class="bar"') == 10


def test_without_cider_keeps_order_and_has_no_histogram(tmp_path: Path) -> None:
    img = _png(tmp_path / "a.png", size=(20, 20))
    its = [{"image": img, "id": f"i{k}", "prediction": "x", "references": ["y"],
            "scores": {"BLEU-4": 1.0 - k / 10}} for k in range(3)]
    text, parser = _parse(write_report(tmp_path / "r.html", its))
    assert [r["id"] for r in parser.rows] == ["i0", "i1", "i2"]
    assert "<svg" not in text


def test_missing_image_gives_placeholder(tmp_path: Path, caplog) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    its = [
        {"image": tmp_path / "nope.png", "id": "missing", "prediction": "p", "references": ["r"],
         "scores": {"CIDEr": 1.0}},
        {"image": broken, "id": "broken", "prediction": "p", "references": ["r"],
         "scores": {"CIDEr": 2.0}},
        {"image": _png(tmp_path / "ok.png"), "id": "ok", "prediction": "p", "references": ["r"],
         "scores": {"CIDEr": 3.0}},
    ]
    with caplog.at_level(logging.WARNING, logger="captioner.scoring.report"):
        text, parser = _parse(write_report(tmp_path / "r.html", its))
    assert len(parser.img_srcs) == 1
    by_id = {r["id"]: r for r in parser.rows}
    assert "image unavailable" in by_id["missing"]["cells"][1]["text"]
    assert "nope.png" in by_id["missing"]["cells"][1]["text"]
    assert "image unavailable" in by_id["broken"]["cells"][1]["text"]
    assert "image unavailable" not in by_id["ok"]["cells"][1]["text"]
    assert sum("cannot read image" in rec.getMessage() for rec in caplog.records) == 2


def test_corpus_table(tmp_path: Path, items: list[dict]) -> None:
    corpus = {"CIDEr": 0.8765, "BLEU-4": 0.3141, "METEOR<x>": 0.2}
    text, _ = _parse(write_report(tmp_path / "r.html", items, corpus=corpus))
    table = text[text.index('<table id="corpus"'):]
    table = table[: table.index("</table>")]
    for shown in ("CIDEr", "0.8765", "BLEU-4", "0.3141", "METEOR&lt;x&gt;", "0.2000"):
        assert shown in table
    assert text.index('id="corpus"') < text.index('id="items"')  # corpus metrics at the top

    text_without, _ = _parse(write_report(tmp_path / "r2.html", items))
    assert 'id="corpus"' not in text_without


def test_empty_items(tmp_path: Path) -> None:
    text, parser = _parse(write_report(tmp_path / "r.html", [], corpus={"CIDEr": 0.0}))
    assert parser.rows == []
    assert "0.0000" in text


def test_audio_items_show_name_and_player_linked_relative_to_the_report(tmp_path):
    sounds = tmp_path / "data" / "my clips"
    sounds.mkdir(parents=True)
    wav = sounds / "a&b.wav"
    wav.write_bytes(b"RIFF")
    out = write_report(tmp_path / "eval" / "report.html", [
        {"audio": str(wav), "id": "x", "prediction": "a beep", "references": ["a beep"]},
        {"image": "", "id": "y", "prediction": "?", "references": ["?"]}])
    text = out.read_text()
    assert "a&amp;b.wav" in text  # the name, escaped
    assert 'src="../data/my%20clips/a%26b.wav"' in text  # relative to the report, URL-quoted
    assert text.count("<audio ") == 1 and text.count("no image given") == 1  # the audio item has no placeholder
