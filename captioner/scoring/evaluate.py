"""Evaluation workflows over a captioner: which CLIPScore model to use, the per-input ablation, and the
files an evaluation writes (scores.json, predictions.json in the COCO results format, report.html); and
`score_files`, scoring any system's predictions file against references (`captioner score`).

`evaluate_captioner` is what `captioner eval` runs; Python users call it the same way:

    ev = evaluate_captioner(cap, examples, decode=DecodeConfig(strategy="greedy"), output_dir="eval_out")
    ev.result.corpus["CIDEr"]
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

from captioner.config import DecodeConfig
from captioner.errors import ConfigError
from captioner.files import atomic_write

DEFAULT_METRICS = ("BLEU", "METEOR", "ROUGE_L", "CIDEr")
NO_TEXT_TOWER = ("CLIPScore skipped: the captioner's image encoder has no pretrained CLIP text tower; "
                 "give a CLIPScore model (clip_score_model, clip_score_pretrained)")


@dataclasses.dataclass
class Evaluation:
    """What `evaluate_captioner` did: the scores of every input together, the ablation columns (name ->
    corpus scores: all inputs, then each input alone) when asked, notes, and the files written."""

    result: Any  # api.EvalResult
    skipped: list[str]  # metrics not computed and inputs left out, and why
    ablation: dict[str, dict[str, float]] | None = None
    files: list[Path] = dataclasses.field(default_factory=list)


def default_metrics(examples: Sequence, *, spice: bool = False) -> tuple[str, ...]:
    """The COCO metrics, with SPICE when asked or when the set has sounds (audio captioning reports
    SPIDEr = (CIDEr + SPICE) / 2)."""
    with_audio = any(ex.audio for ex in examples)
    return (*DEFAULT_METRICS, *(("SPICE",) if spice or with_audio else ()))


def clip_scorer_for(captioner, *, model: str | None = None, pretrained: str | None = "openai"):
    """(CLIPScorer | None, note | None): open_clip `model` with `pretrained` weights (None: random) when
    given, else the captioner's own CLIP when it is a named pretrained one; otherwise None and a note (a
    random or custom image encoder has no trained text tower)."""
    from captioner.scoring.clipscore import CLIPScorer

    if isinstance(pretrained, str) and pretrained.lower() in ("none", "null"):
        pretrained = None
    if model:
        return CLIPScorer.from_open_clip(model, pretrained, device=captioner.device), None
    cfg = captioner.config
    if cfg.clip_config is None and cfg.clip_pretrained:
        return CLIPScorer.from_open_clip(cfg.clip_model, cfg.clip_pretrained, device=captioner.device), None
    return None, NO_TEXT_TOWER


def _check_ablation(captioner, modalities) -> None:
    if len(captioner.model.modalities) < 2 or modalities:
        raise ConfigError("the ablation needs a captioner with two inputs and no modalities restriction "
                          f"(this one takes {'+'.join(captioner.model.modalities)})")


def ablation_scores(captioner, examples: Sequence, full, *, decode: DecodeConfig, metrics: Sequence[str],
                    batch_size: int = 32, num_workers: int = 0) -> dict[str, dict[str, float]]:
    """The same set captioned from each input alone, next to `full` (the EvalResult from all inputs):
    what each input adds. Needs a captioner with two inputs."""
    _check_ablation(captioner, None)
    modalities = captioner.model.modalities
    columns = {"+".join(modalities): full.corpus}
    for m in modalities:
        only = [ex for ex in examples if m in ex.inputs]
        columns[f"{m} only"] = captioner.evaluate(only, decode=decode, batch_size=batch_size, metrics=metrics,
                                                  modalities=[m], num_workers=num_workers).corpus
    return columns


def write_json(path: str | Path, data) -> Path:
    """Pretty JSON, written whole (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_eval_outputs(output_dir: str | Path, ev: Evaluation, *, decode: DecodeConfig, info: dict | None = None,
                       title: str = "captioner eval") -> list[Path]:
    """scores.json (`info` first, then decode settings, corpus, per-item scores, notes and the ablation),
    predictions.json (COCO results format) and report.html in `output_dir`."""
    from captioner.scoring.report import write_report

    out, r = Path(output_dir), ev.result
    scores = write_json(out / "scores.json", {
        **(info or {}), "decode": dataclasses.asdict(decode), "corpus": r.corpus, "coco_exact": r.coco_exact,
        "skipped": ev.skipped, "per_image": r.per_image, **({"ablation": ev.ablation} if ev.ablation else {})})
    predictions = write_json(out / "predictions.json",
                             [{"image_id": k, "caption": v} for k, v in r.predictions.items()])
    items = [{"image": ex.image or "", "audio": ex.audio, "id": ex.image_id, "prediction": r.predictions[ex.image_id],
              "references": ex.captions, "scores": r.per_image[ex.image_id]} for ex in r.examples]
    report = write_report(out / "report.html", items, title=title, corpus=r.corpus)
    return [scores, predictions, Path(report)]


def evaluate_captioner(captioner, examples: Sequence, *, decode: DecodeConfig | None = None,
                       metrics: Sequence[str] | None = None, modalities: Sequence[str] | None = None,
                       batch_size: int = 32, num_workers: int = 0, clip_scorer: Any = "auto", ablate: bool = False,
                       output_dir: str | Path | None = None, info: dict | None = None,
                       title: str = "captioner eval") -> Evaluation:
    """Caption and score `examples` (`Captioner.evaluate`), plus:

    metrics: default `default_metrics(examples)`. clip_scorer: a `CLIPScorer`, None (no CLIPScore) or
    "auto" (`clip_scorer_for(captioner)`: the captioner's own CLIP when it has a text tower, else a note in
    `skipped`); only used when the set has images. ablate: also score each input alone (`ablation_scores`; not with
    `modalities`). output_dir: write scores.json, predictions.json and report.html there (`info` goes
    first in scores.json)."""
    decode = decode or DecodeConfig()
    if ablate:  # refused before any captioning
        _check_ablation(captioner, modalities)
    metrics = tuple(metrics) if metrics is not None else default_metrics(examples)
    note = None
    if not any(ex.image for ex in examples):
        clip_scorer = None
    elif isinstance(clip_scorer, str) and clip_scorer == "auto":
        clip_scorer, note = clip_scorer_for(captioner)
    result = captioner.evaluate(examples, decode=decode, batch_size=batch_size, metrics=metrics,
                                clip_scorer=clip_scorer, modalities=modalities, num_workers=num_workers)
    ev = Evaluation(result=result, skipped=[*result.skipped, *([note] if note else [])])
    if ablate:
        ev.ablation = ablation_scores(captioner, examples, result, decode=decode, metrics=metrics,
                                      batch_size=batch_size, num_workers=num_workers)
    if output_dir is not None:
        ev.files = write_eval_outputs(output_dir, ev, decode=decode, info=info, title=title)
    return ev


def score_files(predictions: str | Path, references: str | Path, *, split: str = "test", spice: bool = False,
                output: str | Path | None = None, rank: int = 0):
    """Score a predictions file (COCO results JSON, JSONL or CSV) against references (COCO captions JSON,
    Karpathy split JSON, imagefolder, table): `metrics.CaptionScores`; with `output`, also a JSON file of
    the corpus and per-image scores. rank: which caption of a file with several per item is scored
    (`read_predictions`)."""
    from captioner.data import load_references, match_prediction_ids, read_predictions
    from captioner.scoring.metrics import score_captions

    refs = load_references(references, split=split)
    preds = match_prediction_ids(read_predictions(predictions, rank=rank), refs, source=str(predictions))
    metrics = (*DEFAULT_METRICS, *(("SPICE",) if spice else ()))
    scores = score_captions(preds, {k: refs[k] for k in preds}, metrics=metrics)
    if output is not None:
        write_json(output, {"predictions": str(predictions), "references": str(references), "corpus": scores.corpus,
                            "coco_exact": scores.coco_exact, "skipped": scores.skipped,
                            "per_image": {str(k): v for k, v in scores.per_image.items()}})
    return scores
