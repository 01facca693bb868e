"""The offline demos: the whole job on generated data, no downloads.

`run_demo` generates the shapes caption set, trains a tokenizer on its captions, builds a tiny open_clip
tower and a tiny GPT-2, trains on CPU, captions the test split with beam search, scores it (BLEU-4,
CIDEr) next to a most-frequent-caption baseline, and writes an HTML gallery.

`run_audio_demo` does the same with image + sound "scenes" (sounds.py) whose captions need both inputs
("a red circle and two high beeps"), a tiny CLAP audio encoder and modality dropout; it captions the
test split from both inputs, the image alone and the sound alone, and scores each whole caption and the
part of it each input can know, next to most-frequent baselines.

`run_scst_demo` continues the shapes demo's cross-entropy captioner with SCST and, for comparison, with
as many cross-entropy steps, and scores the three on the test split.
"""

from __future__ import annotations

import collections
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from captioner.api import Captioner
from captioner.config import DecodeConfig
from captioner.data import read_imagefolder
from captioner.files import read_lines
from captioner.scoring.metrics import score_captions
from captioner.scoring.report import write_report
from captioner.demo.numerics import with_pinned_threads
from captioner.demo.shapes import make_shapes_dataset
from captioner.demo.sounds import make_scenes_dataset, split_scene_caption
from captioner.demo.tiny import TINY_TRAIN, tiny_config, train_tokenizer
from captioner.config import TrainConfig
from captioner.train.loop import train

logger = logging.getLogger(__name__)


@dataclass
class DemoResult:
    scores: dict[str, float]
    baseline: dict[str, float]
    baseline_caption: str
    coco_exact: bool
    samples: list[tuple[str, str, list[str]]]  # (image, prediction, references)
    model_dir: Path
    report: Path


def most_frequent_caption(examples) -> str:
    return collections.Counter(c for ex in examples for c in ex.captions).most_common(1)[0][0]


def demo_train_config(data: Path, output_dir: Path, tokenizer, *, epochs: int, seed: int, **model) -> TrainConfig:
    # overwrite: a rerun of the demo regenerates its data and starts its run afresh
    return TrainConfig(data=str(data), output_dir=str(output_dir), epochs=epochs, **TINY_TRAIN, seed=seed,
                       val_images=60, log_every=20, overwrite=True, model=tiny_config(tokenizer, **model))


@with_pinned_threads
def run_demo(output_dir: str | Path = "demo_out", *, epochs: int = 12, n_train: int = 600, seed: int = 0
             ) -> DemoResult:
    out = Path(output_dir)
    data = make_shapes_dataset(out / "data", n_train=n_train, n_val=60, n_test=60, seed=seed)
    train_ex, _ = read_imagefolder(data, "train")
    tokenizer = train_tokenizer([c for ex in train_ex for c in ex.captions])
    best = train(demo_train_config(data, out / "run", tokenizer, epochs=epochs, seed=seed), tokenizer=tokenizer)

    captioner = Captioner.from_pretrained(best)
    test_ex, _ = read_imagefolder(data, "test")
    result = captioner.evaluate(test_ex, decode=DecodeConfig(strategy="beam", num_beams=3, max_new_tokens=20))
    frequent = most_frequent_caption(train_ex)
    baseline = score_captions({ex.image_id: frequent for ex in test_ex}, {ex.image_id: ex.captions for ex in test_ex},
                              use_java=result.coco_exact)
    preds = result.predictions
    items = [{"image": ex.image, "id": ex.image_id, "prediction": preds[ex.image_id], "references": ex.captions,
              "scores": result.per_image[ex.image_id]} for ex in result.examples]
    report = write_report(out / "report.html", items, title="captioner offline demo: shapes test split",
                          corpus={**result.corpus, "baseline CIDEr": baseline.corpus["CIDEr"]})
    return DemoResult(scores=result.corpus, baseline=baseline.corpus, baseline_caption=frequent,
                      coco_exact=result.coco_exact,
                      samples=[(ex.image, preds[ex.image_id], ex.captions) for ex in result.examples],
                      model_dir=best, report=report)


@dataclass
class AudioDemoResult:
    """Scores of one image+audio captioner on the scenes test split, per input used."""

    whole: dict[str, float]  # CIDEr of the whole caption: both, image, audio, baseline
    parts: dict[str, float]  # CIDEr of the part an input can know: image, image baseline, audio, audio baseline
    baselines: dict[str, str]  # the most frequent training caption / image part / sound part
    coco_exact: bool
    samples: list[tuple[str, str, str, str, str]]  # (item, both, image only, audio only, first reference)
    model_dir: Path
    report: Path


def _part(caption: str, index: int) -> str:
    """One side of "image phrase and sound phrase"; a caption without the separator counts as that side
    (an image-only answer may leave out the sound)."""
    try:
        return split_scene_caption(caption)[index]
    except ValueError:
        return caption


@with_pinned_threads
def run_audio_demo(output_dir: str | Path = "demo_audio_out", *, epochs: int = 12, n_train: int = 432,
                   seed: int = 0, modality_dropout: float = 0.3) -> AudioDemoResult:
    out = Path(output_dir)
    data = make_scenes_dataset(out / "data", n_train=n_train, n_val=54, n_test=108, seed=seed)
    train_ex, _ = read_imagefolder(data, "train")
    tokenizer = train_tokenizer([c for ex in train_ex for c in ex.captions])
    config = demo_train_config(data, out / "run", tokenizer, epochs=epochs, seed=seed, modalities=["image", "audio"])
    config.modality_dropout = modality_dropout
    best = train(config, tokenizer=tokenizer)

    captioner = Captioner.from_pretrained(best)
    test_ex, _ = read_imagefolder(data, "test")
    refs = {ex.image_id: ex.captions for ex in test_ex}
    decode = DecodeConfig(strategy="beam", num_beams=3, max_new_tokens=24)
    # Captions only (metrics=()); every number below is scored once, with the same tokeniser.
    preds = {name: captioner.evaluate(test_ex, decode=decode, modalities=mods, metrics=()).predictions
             for name, mods in (("both", None), ("image", ["image"]), ("audio", ["audio"]))}
    exact = False  # pure-Python tokenisation: fast and identical across the runs compared here

    def scores(predictions, references):
        return score_captions(predictions, references, metrics=("CIDEr",), use_java=exact)

    def cider(predictions, references):
        return scores(predictions, references).corpus["CIDEr"]

    frequent = most_frequent_caption(train_ex)
    both = scores(preds["both"], refs)  # per-item scores for the report
    whole = {"both": both.corpus["CIDEr"], **{name: cider(preds[name], refs) for name in ("image", "audio")}}
    whole["baseline"] = cider({k: frequent for k in refs}, refs)
    parts, baselines = {}, {"caption": frequent}
    for side, name in ((0, "image"), (1, "audio")):
        part_refs = {k: [_part(c, side) for c in caps] for k, caps in refs.items()}
        common = collections.Counter(_part(c, side) for ex in train_ex for c in ex.captions).most_common(1)[0][0]
        baselines[name] = common
        parts[name] = cider({k: _part(v, side) for k, v in preds[name].items()}, part_refs)
        parts[f"{name} baseline"] = cider({k: common for k in refs}, part_refs)
    samples = [(ex.image_id, preds["both"][ex.image_id], preds["image"][ex.image_id], preds["audio"][ex.image_id],
                ex.captions[0]) for ex in test_ex]
    report = write_report(out / "report.html", [
        {"image": ex.image, "audio": ex.audio, "id": ex.image_id, "references": ex.captions,
         "prediction": f"{preds['both'][ex.image_id]} | image only: {preds['image'][ex.image_id]} | "
                       f"audio only: {preds['audio'][ex.image_id]}",
         "scores": both.per_image[ex.image_id]} for ex in test_ex],
        title="captioner offline audio demo: scenes test split (both inputs | image only | audio only)",
        corpus={f"CIDEr {k}": v for k, v in whole.items()})
    return AudioDemoResult(whole=whole, parts=parts, baselines=baselines, coco_exact=exact, samples=samples,
                           model_dir=best, report=report)


@dataclass
class ScstDemoResult:
    """Test CIDEr (greedy captions, pure-Python tokenisation) of a cross-entropy captioner ("start"), after
    `steps` more cross-entropy steps ("xe") and after as many SCST steps from the same checkpoint ("scst")."""

    start: float
    xe: float
    scst: float
    rewards: list[float]  # mean SCST reward of each step, in order
    seconds_per_step: dict[str, float]  # median wall time of one optimiser step: xe, scst
    runs: dict[str, Path]  # base, xe, scst run directories


def _step_seconds(run: Path) -> float:
    times = [json.loads(line)["time"] for line in read_lines(run / "metrics.jsonl") if '"time"' in line]
    gaps = sorted(b - a for a, b in zip(times, times[1:]))
    return gaps[len(gaps) // 2] if gaps else float("nan")


@with_pinned_threads
def run_scst_demo(output_dir: str | Path = "demo_scst_out", *, data: str | Path | None = None, n_train: int = 600,
                  xe_epochs: int = 12, steps: int = 60, xe_lr: float = 2e-4, scst_lr: float = 2e-4,
                  batch_size: int = 160, seed: int = 0, val_images: int = 30) -> ScstDemoResult:
    """The shapes demo's cross-entropy captioner (trained here, or the one in output_dir/base from an earlier
    call), then `steps` steps of cross-entropy and of SCST from it, both with batch_size captions per step
    (SCST: batch_size / 5 images x 5 samples), scored on the test split. `data`: an existing shapes set
    (default: generated with n_train training images). `seed` also seeds the continuations."""
    import dataclasses

    from captioner.train.loop import caption_metrics, encode_examples

    out = Path(output_dir)
    data = Path(data) if data is not None else make_shapes_dataset(out / "data", n_train=n_train, n_val=60,
                                                                    n_test=60, seed=seed)
    train_ex, _ = read_imagefolder(data, "train")
    tokenizer = train_tokenizer([c for ex in train_ex for c in ex.captions])
    config = demo_train_config(data, out / "base", tokenizer, epochs=xe_epochs, seed=seed)
    config = dataclasses.replace(config, feature_cache=str(out / "features"), val_images=val_images)
    base = out / "base" / "last"
    if not (base / "config.json").exists():
        train(config, tokenizer=tokenizer)
    # Both continuations: same start, steps and batch size, a constant learning rate, a log line per step.
    more = dict(init_from=str(base), max_steps=steps, epochs=1000, warmup_steps=0, schedule="constant", log_every=1,
                batch_size=batch_size)
    runs = {"base": out / "base", "xe": out / "xe", "scst": out / "scst"}
    train(dataclasses.replace(config, output_dir=str(runs["xe"]), lr=xe_lr, **more))
    train(dataclasses.replace(config, output_dir=str(runs["scst"]), lr=scst_lr, scst=True, **more))

    test_ex, _ = read_imagefolder(data, "test")
    scores, feats = {}, None
    for name, run in runs.items():
        captioner = Captioner.from_pretrained(run / "last")
        if feats is None:
            test_ex, feats = encode_examples(captioner, test_ex, config, desc="encoding test")
        scores[name] = caption_metrics(captioner, feats, test_ex, limit=len(test_ex),
                                       decode=DecodeConfig(strategy="greedy", max_new_tokens=20))["val_cider"]
    rewards = [json.loads(line)["reward"] for line in read_lines(runs["scst"] / "metrics.jsonl") if '"reward"' in line]
    return ScstDemoResult(start=scores["base"], xe=scores["xe"], scst=scores["scst"], rewards=rewards,
                          seconds_per_step={k: _step_seconds(runs[k]) for k in ("xe", "scst")}, runs=runs)
