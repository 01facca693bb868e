"""The one training loop (accelerate): cached image features -> mapper (+ LM) -> caption loss.

The image encoder is frozen, so each unique image is encoded once before training (not once per
caption, as ClipCap does). Every epoch logs train/val loss and caption metrics on a validation subset
to `metrics.jsonl`, and saves `last/` and `best/` (lowest validation loss) captioners in the run dir.
"""

from __future__ import annotations

import json
import logging
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .api import Captioner
from .config import ConfigError, DecodeConfig, ModelConfig, save_json
from .data import CaptionExample, caption_pairs, load_image, read_imagefolder
from .tokens import encode_captions

logger = logging.getLogger(__name__)


def _doc(text, **kw):
    return field(metadata={"help": text}, **kw)


@dataclass
class TrainConfig:
    """A training run. `model` nests the ModelConfig of the captioner being trained."""

    data: str = _doc("Caption set: an imagefolder root whose split folders hold metadata.jsonl.", default="")
    output_dir: str = _doc("Run directory: config, metrics.jsonl and the last/ and best/ captioners.",
                           default="runs/captioner")
    train_split: str = _doc("Split folder used for training.", default="train")
    val_split: str | None = _doc("Split folder used for validation (none to skip).", default="val")
    epochs: int = _doc("Passes over all (image, caption) pairs.", default=10)
    batch_size: int = _doc("Captions per optimisation step.", default=64)
    lr: float = _doc("Peak learning rate (AdamW).", default=2e-5)
    weight_decay: float = _doc("AdamW weight decay.", default=0.01)
    warmup_steps: int = _doc("Linear warm-up steps before the schedule.", default=100)
    schedule: str = _doc("Learning-rate schedule after warm-up: cosine, linear or constant.", default="cosine")
    grad_clip: float = _doc("Clip the gradient norm to this (0 disables).", default=1.0)
    max_caption_tokens: int = _doc("Captions are cut to this many tokens (EOS included).", default=40)
    mixed_precision: str = _doc("Autocast: no, bf16 or fp16.", default="no")
    seed: int = _doc("Random seed (data order, init).", default=0)
    encode_batch_size: int = _doc("Images per batch when computing image features.", default=64)
    val_images: int = _doc("Validation images captioned (greedy) each epoch for BLEU-4/CIDEr (0 skips).",
                           default=100)
    log_every: int = _doc("Log the training loss every N steps.", default=20)
    model: ModelConfig = field(default_factory=ModelConfig)

    def __post_init__(self) -> None:
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ConfigError(f"schedule must be cosine, linear or constant, got {self.schedule!r}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ConfigError(f"mixed_precision must be no, bf16 or fp16, got {self.mixed_precision!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("epochs and batch_size must be >= 1")


def lr_lambda(step: int, *, warmup: int, total: int, schedule: str) -> float:
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress


@torch.no_grad()
def encode_examples(captioner: Captioner, examples: list[CaptionExample], *, batch_size: int,
                    desc: str = "encoding images") -> torch.Tensor:
    """Image features (N, F) for each example, one encoder pass per unique image."""
    feats = []
    for start in tqdm(range(0, len(examples), batch_size), desc=desc, unit="batch", leave=False):
        batch = [load_image(ex.image) for ex in examples[start:start + batch_size]]
        feats.append(captioner.encode(batch).cpu())
    return torch.cat(feats)


class _Collate:
    def __init__(self, features, tokenizer, *, max_tokens, prompt):
        self.features, self.tokenizer, self.max_tokens, self.prompt = features, tokenizer, max_tokens, prompt

    def __call__(self, pairs):
        idx = torch.tensor([i for i, _ in pairs])
        ids, mask = encode_captions(self.tokenizer, [c for _, c in pairs], max_tokens=self.max_tokens,
                                    prompt=self.prompt)
        return self.features[idx], ids, mask


def evaluate_loss(model, loader, accelerator) -> float:
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for features, ids, mask in loader:
            n = mask.sum().item()
            total += model(features, ids, mask).loss.item() * n
            count += n
    model.train()
    return total / max(count, 1)


def caption_metrics(captioner: Captioner, features, examples, *, limit: int) -> dict[str, float]:
    """Greedy captions for the first `limit` examples scored with BLEU-4 and CIDEr (pure-Python
    tokenisation: fast, for monitoring; `captioner eval` gives the COCO-exact numbers)."""
    from .metrics import score_captions

    n = min(limit, len(examples))
    preds = []
    for start in range(0, n, 64):
        preds += [c[0] for c in captioner.caption_features(features[start:min(n, start + 64)],
                                                           DecodeConfig(strategy="greedy", max_new_tokens=30))]
    scores = score_captions({ex.image_id: p for ex, p in zip(examples, preds)},
                            {ex.image_id: ex.captions for ex in examples[:n]}, metrics=("BLEU", "CIDEr"),
                            use_java=False)
    return {"val_bleu4": scores.corpus["Bleu_4"], "val_cider": scores.corpus["CIDEr"]}


def train(config: TrainConfig, *, tokenizer=None, argv: list[str] | None = None) -> Path:
    """Train a captioner; returns the path of the best saved captioner."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=not torch.cuda.is_available())
    set_seed(config.seed)
    out = Path(config.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_json(config, out / "train_config.json")
        (out / "command.txt").write_text(" ".join(argv if argv is not None else sys.argv) + "\n")

    train_ex, _ = read_imagefolder(config.data, config.train_split)
    val_ex = read_imagefolder(config.data, config.val_split)[0] if config.val_split else []
    captioner = Captioner.from_config(config.model, tokenizer=tokenizer, device=accelerator.device)
    tok = captioner.tokenizer
    logger.info("training on %d images (%d captions), validating on %d images", len(train_ex),
                sum(len(e.captions) for e in train_ex), len(val_ex))
    train_feats = encode_examples(captioner, train_ex, batch_size=config.encode_batch_size,
                                  desc="encoding train images")
    val_feats = encode_examples(captioner, val_ex, batch_size=config.encode_batch_size,
                                desc="encoding val images") if val_ex else None

    if captioner.model.mapper.feature_norm is not None:
        captioner.model.mapper.feature_norm.fit(train_feats)
    collate = _Collate(train_feats, tok, max_tokens=config.max_caption_tokens, prompt=config.model.prompt)
    g = torch.Generator().manual_seed(config.seed)
    train_loader = DataLoader(caption_pairs(train_ex), batch_size=config.batch_size, shuffle=True,
                              collate_fn=collate, generator=g, drop_last=False)
    val_loader = None
    if val_ex:
        val_collate = _Collate(val_feats, tok, max_tokens=config.max_caption_tokens, prompt=config.model.prompt)
        val_loader = DataLoader(caption_pairs(val_ex), batch_size=config.batch_size, collate_fn=val_collate)

    model = captioner.model
    params = [p for p in model.parameters() if p.requires_grad]
    logger.info("trainable parameters: %s", f"{sum(p.numel() for p in params):,}")
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    total_steps = config.epochs * len(train_loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, warmup=config.warmup_steps, total=total_steps, schedule=config.schedule))
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    if val_loader is not None:
        val_loader = accelerator.prepare(val_loader)

    best, step = float("inf"), 0
    metrics_path = out / "metrics.jsonl"
    model.train()
    for epoch in range(config.epochs):
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{config.epochs}", disable=not accelerator.is_main_process)
        t0, seen = time.perf_counter(), 0
        for features, ids, mask in bar:
            loss = model(features, ids, mask).loss
            accelerator.backward(loss)
            if config.grad_clip > 0:
                accelerator.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            seen += ids.shape[0]
            rate = seen / (time.perf_counter() - t0)
            bar.set_postfix(loss=f"{loss.item():.3f}", caps_per_s=f"{rate:.0f}")
            if step % config.log_every == 0 and accelerator.is_main_process:
                _log(metrics_path, {"step": step, "epoch": epoch + 1, "loss": loss.item(),
                                    "lr": scheduler.get_last_lr()[0], "captions_per_s": rate})
        record = {"step": step, "epoch": epoch + 1, "train_loss": loss.item()}
        if val_loader is not None:
            record["val_loss"] = evaluate_loss(model, val_loader, accelerator)
        if accelerator.is_main_process:
            unwrapped = Captioner(accelerator.unwrap_model(model), tok, device=accelerator.device)
            if val_ex and config.val_images > 0:
                record.update(caption_metrics(unwrapped, val_feats, val_ex, limit=config.val_images))
            _log(metrics_path, record)
            logger.info("epoch %d: %s", epoch + 1,
                        ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
            unwrapped.save_pretrained(out / "last", step=step, epoch=epoch + 1)
            score = record.get("val_loss", record["train_loss"])
            if score < best:
                best = score
                unwrapped.save_pretrained(out / "best", step=step, epoch=epoch + 1)
        accelerator.wait_for_everyone()
    return out / "best"


def _log(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
