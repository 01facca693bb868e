"""The offline demos: the whole job on generated data, no downloads.

`run_demo` generates the shapes caption set, trains a tokenizer on its captions, builds a tiny open_clip
tower and a tiny GPT-2, trains on CPU, captions the test split with beam search, scores it (BLEU-4,
CIDEr) next to a most-frequent-caption baseline, and writes an HTML gallery.

`run_audio_demo` does the same with image + sound "scenes" (sounds.py) whose captions need both inputs
("a red circle and two high beeps"), a tiny CLAP audio encoder and modality dropout; it captions the
test split from both inputs, the image alone and the sound alone, and scores each whole caption and the
part of it each input can know, next to most-frequent baselines.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass
from pathlib import Path

from captioner.api import Captioner
from captioner.config import DecodeConfig
from captioner.data import read_imagefolder
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
