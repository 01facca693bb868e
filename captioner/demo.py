"""The offline demo: the whole job on generated data, no downloads.

Generates the shapes caption set, trains a tokenizer on its captions, builds a tiny open_clip tower and
a tiny GPT-2, trains on CPU, captions the test split with beam search, scores it (BLEU-4, CIDEr) next to
a most-frequent-caption baseline, and writes an HTML gallery.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass
from pathlib import Path

from .api import Captioner
from .config import DecodeConfig
from .data import read_imagefolder
from .metrics import score_captions
from .report import write_report
from .shapes import make_shapes_dataset
from .tiny import tiny_config, train_tokenizer
from .training import TrainConfig, train

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


def demo_train_config(data: Path, output_dir: Path, tokenizer, *, epochs: int, seed: int) -> TrainConfig:
    return TrainConfig(data=str(data), output_dir=str(output_dir), epochs=epochs, batch_size=64, lr=2e-3,
                       warmup_steps=30, weight_decay=0.0, seed=seed, val_images=60, log_every=20,
                       model=tiny_config(tokenizer))


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
