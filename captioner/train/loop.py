"""The one training loop (accelerate): cached image/audio features -> mappers (+ LM) -> caption loss.

The encoders are frozen, so each unique image and sound is encoded once before training (optionally
into a persistent feature cache, see features.py), never once per caption. Items may have an image, a
sound or both; with `modality_dropout` a two-input item sometimes loses one of them for a step, so a
model trained on pairs also captions either input alone. Batches are length-bucketed and
sharded across processes by `CaptionBatchSampler`, which gives every process the same number of
batches and every (image, caption) pair to exactly one process once per epoch. The run directory
holds the resolved config, the command line, `metrics.jsonl` (and TensorBoard logs when installed),
`last/` and `best/` captioners, and `state/` (model, optimizer, scheduler, RNG, data position) for
`--resume`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from captioner.api import Captioner
from captioner.config import ConfigError, DecodeConfig, TrainConfig, save_json
from captioner.data import CaptionExample, load_caption_set, load_image
from captioner.model.tokens import pad_id

logger = logging.getLogger(__name__)


def lr_lambda(step: int, *, warmup: int, total: int, schedule: str) -> float:
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress


# ------------------------------------------------------------------ data


class CaptionBatchSampler:
    """Batches of pair indices for one process.

    Each epoch the pairs are shuffled with (seed, epoch); with bucketing, chunks of 50 global batches
    are sorted by caption length before being cut, and the batch order is shuffled again. Each global
    batch is split round-robin across processes; a final global batch smaller than the number of
    processes is merged into the previous one, so every process runs the same number of batches and
    every pair is used exactly once per epoch.
    """

    def __init__(self, lengths: list[int], *, batch_size: int, seed: int, bucket: bool, shuffle: bool = True,
                 rank: int = 0, world: int = 1):
        if len(lengths) < world:
            raise ConfigError(f"{len(lengths)} training captions cannot be split across {world} processes")
        self.lengths, self.batch_size, self.seed, self.bucket, self.shuffle = lengths, batch_size, seed, bucket, shuffle
        self.rank, self.world = rank, world
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's order; skip its first `start` batches (resuming mid-epoch)."""
        self.epoch, self.start = epoch, start

    def global_batches(self) -> list[list[int]]:
        n = len(self.lengths)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(n, generator=g).tolist() if self.shuffle else list(range(n))
        if self.bucket:
            chunk = self.batch_size * 50
            order = [i for s in range(0, n, chunk)
                     for i in sorted(order[s:s + chunk], key=lambda i: self.lengths[i])]
        batches = [order[s:s + self.batch_size] for s in range(0, n, self.batch_size)]
        if len(batches) > 1 and len(batches[-1]) < self.world:
            batches[-2].extend(batches.pop())
        if self.bucket and self.shuffle:
            perm = torch.randperm(len(batches), generator=g).tolist()
            batches = [batches[i] for i in perm]
        return batches

    def __iter__(self):
        for batch in self.global_batches()[self.start:]:
            yield batch[self.rank::self.world]

    def __len__(self) -> int:
        return len(self.global_batches()) - self.start


class _Pairs(torch.utils.data.Dataset):
    """(feature row, caption token ids) pairs; ids are tokenised once, up front."""

    def __init__(self, rows: list[int], ids: list[list[int]]):
        self.rows, self.ids = rows, ids

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i], self.ids[i]


@dataclass
class ItemFeatures:
    """Features of a caption set's items: {modality: (N, F_m)}, rows without that input are zeros and
    marked False in present {modality: (N,) bool}."""

    features: dict[str, torch.Tensor]
    present: dict[str, torch.Tensor]

    def rows(self, index: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        return ({m: f[index] for m, f in self.features.items()}, {m: p[index] for m, p in self.present.items()})


class _Collate:
    def __init__(self, features: ItemFeatures, pad: int):
        self.features, self.pad = features, pad

    def __call__(self, items):
        width = max(len(ids) for _, ids in items)
        ids = torch.full((len(items), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for i, (_, row) in enumerate(items):
            ids[i, :len(row)] = torch.tensor(row)
            mask[i, :len(row)] = 1
        feats, present = self.features.rows(torch.tensor([r for r, _ in items]))  # {m: (B, F_m)}, {m: (B,)}
        return feats, present, ids, mask  # ..., (B, T), (B, T)


def drop_modalities(present: dict[str, torch.Tensor], p: float, generator: torch.Generator
                    ) -> dict[str, torch.Tensor]:
    """Modality dropout: each row holding two or more inputs loses one of them (chosen evenly) with
    probability p; a row never loses its last input."""
    if p <= 0 or len(present) < 2:
        return present
    kinds = list(present)
    held = torch.stack([present[m] for m in kinds], dim=1)  # (B, M)
    eligible = held.sum(1) >= 2
    drop = (torch.rand(held.shape[0], generator=generator) < p) & eligible  # (B,)
    # Which input to drop: uniform among the held ones (random scores, held only, argmax).
    which = torch.where(held, torch.rand(held.shape, generator=generator), -1.0).argmax(1)  # (B,)
    lose = torch.nn.functional.one_hot(which, len(kinds)).bool() & drop[:, None]
    return {m: held[:, j] & ~lose[:, j] for j, m in enumerate(kinds)}


def usable_examples(examples: list[CaptionExample], modalities: list[str], source: str) -> list[CaptionExample]:
    """The examples with at least one input the model takes; the others are counted and skipped."""
    kept = [ex for ex in examples if any(m in ex.inputs for m in modalities)]
    if len(kept) < len(examples):
        logger.warning("%s: %d of %d items have no %s input and are skipped", source, len(examples) - len(kept),
                       len(examples), " or ".join(modalities))
    if not kept:
        raise ConfigError(f"{source}: no item has a {' or '.join(modalities)} input (the model's modalities); "
                          "set --modalities to the inputs the caption set has")
    return kept


def tokenize_pairs(tokenizer, examples: list[CaptionExample], *, max_tokens: int, prompt: str
                   ) -> tuple[list[int], list[list[int]]]:
    """(example row, ids with EOS) for every reference caption."""
    from captioner.model.tokens import caption_text

    texts = [(i, caption_text(c, prompt)) for i, ex in enumerate(examples) for c in ex.captions]
    encoded = tokenizer([t for _, t in texts], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return [i for i, _ in texts], [ids[:max_tokens - 1] + [eos] for ids in encoded]


def make_loader(features, rows, ids, tokenizer, sampler) -> torch.utils.data.DataLoader:
    # Its own generator: creating an iterator must not draw from the global RNG, or a resumed run's
    # dropout masks would differ from an uninterrupted run's.
    return torch.utils.data.DataLoader(_Pairs(rows, ids), batch_sampler=sampler, pin_memory=torch.cuda.is_available(),
                                       collate_fn=_Collate(features, pad_id(tokenizer)),
                                       generator=torch.Generator().manual_seed(0))


def encode_examples(captioner: Captioner, examples: list[CaptionExample], config: TrainConfig, *,
                    desc: str) -> ItemFeatures:
    """Features of every input the examples have and the model takes: from the feature cache, or
    encoded into memory."""
    model = captioner.model
    features, present = {}, {}
    for m in model.modalities:
        rows = [i for i, ex in enumerate(examples) if m in ex.inputs]
        present[m] = torch.zeros(len(examples), dtype=torch.bool)
        present[m][rows] = True
        enc = model.encoders[m]
        features[m] = torch.zeros(len(examples), enc.output_dim)
        if rows:
            paths = [examples[i].inputs[m] for i in rows]
            features[m][rows] = _encode_paths(captioner, m, paths, config, desc=f"{desc} ({m})")
    return ItemFeatures(features, present)


def _encode_paths(captioner: Captioner, modality: str, paths: list[str], config: TrainConfig, *, desc: str
                  ) -> torch.Tensor:
    """Features (N, F) of image or audio files."""
    enc = captioner.model.encoders[modality]
    if config.feature_cache:
        from captioner.train.features import FeatureCache, audio_encoder_key, encoder_key

        if modality == "image":
            key, encode, preprocess, load = (encoder_key(captioner.config, enc.preprocess), captioner.model.encode_images,
                                             enc.preprocess, None)
        else:
            load = enc.loader()
            key, encode, preprocess = audio_encoder_key(captioner.config, load.preprocess.feature_extractor), enc, None
        cache = FeatureCache(config.feature_cache, key, enc.output_dim)
        return cache.get(paths, encode, preprocess, load=load, batch_size=config.encode_batch_size,
                         num_workers=config.num_workers, device=captioner.device, desc=desc)
    feats = []
    with torch.no_grad():
        for start in tqdm(range(0, len(paths), config.encode_batch_size), desc=desc, unit="batch", leave=False):
            chunk = paths[start:start + config.encode_batch_size]
            feats.append((captioner.encode([load_image(p) for p in chunk]) if modality == "image"
                          else captioner.encode_audio(chunk)).cpu())
    return torch.cat(feats)


# ------------------------------------------------------------------ evaluation during training


def evaluate_loss(model, loader, accelerator) -> float:
    """Token-weighted mean validation loss over all processes."""
    model.eval()
    total = torch.zeros(2, device=accelerator.device)
    with torch.no_grad():
        for features, present, ids, mask in loader:
            features, present = _to(features, accelerator.device), _to(present, accelerator.device)
            ids, mask = ids.to(accelerator.device), mask.to(accelerator.device)
            n = mask.sum()
            total += torch.stack([model(features, ids, mask, present).loss.float() * n, n.float()])
    model.train()
    total = accelerator.reduce(total, reduction="sum")
    return (total[0] / total[1].clamp_min(1)).item()


def _to(tensors: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in tensors.items()}


def caption_metrics(captioner: Captioner, features: ItemFeatures, examples, *, limit: int) -> dict[str, float]:
    """Greedy captions for the first `limit` examples scored with BLEU-4 and CIDEr (pure-Python
    tokenisation: fast, for monitoring; `captioner eval` gives the COCO-exact numbers)."""
    from captioner.scoring.metrics import score_captions

    n = min(limit, len(examples))
    preds = []
    for start in range(0, n, 64):
        feats, present = features.rows(torch.arange(start, min(n, start + 64)))
        preds += [c[0] for c in captioner.caption_rows(feats, present, DecodeConfig(strategy="greedy",
                                                                                     max_new_tokens=30))]
    scores = score_captions({ex.image_id: p for ex, p in zip(examples, preds)},
                            {ex.image_id: ex.captions for ex in examples[:n]}, metrics=("BLEU", "CIDEr"),
                            use_java=False)
    return {"val_bleu4": scores.corpus["Bleu_4"], "val_cider": scores.corpus["CIDEr"]}


# ------------------------------------------------------------------ the loop


class _Logger:
    def __init__(self, out: Path, enabled: bool):
        self.path, self.enabled, self.tb = out / "metrics.jsonl", enabled, None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"))
            except ImportError:  # tensorboard not installed: JSONL only
                pass

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, float) and k not in ("step", "epoch"):
                    self.tb.add_scalar(k, v, record["step"])
            self.tb.flush()


def _latest_state(out: Path) -> Path | None:
    """The newest complete saved state: state/, or state.old/ if a kill fell between the two renames."""
    for name in ("state", "state.old"):
        if (out / name / "progress.json").exists():
            return out / name
    return None


def _save_state(accelerator, out: Path, progress: dict) -> None:
    """Resumable state, swapped in atomically: a kill mid-save leaves the previous state intact."""
    tmp, final, old = out / "state.tmp", out / "state", out / "state.old"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    # accelerate warns on every save that the tied GPT-2 lm_head is stored once; tying restores it on load.
    logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        (tmp / "progress.json").write_text(json.dumps(progress))
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)  # a leftover of an earlier kill; final is complete
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def train(config: TrainConfig, *, tokenizer=None, argv: list[str] | None = None) -> Path:
    """Train a captioner; returns the path of the best saved captioner."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed

    # accelerate keeps one global state; a second train() in the same process (another precision) must
    # not inherit the first one's. The process group (PartialState) is kept.
    AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=not torch.cuda.is_available())
    set_seed(config.seed)
    out = Path(config.output_dir)
    main_proc = accelerator.is_main_process
    state_dir = _latest_state(out)
    resuming = config.resume and state_dir is not None
    if config.resume and not resuming:
        logger.info("--resume: no state in %s, starting from scratch", out)
    if main_proc:
        out.mkdir(parents=True, exist_ok=True)
        save_json(config, out / "train_config.json")
        with open(out / "command.txt", "a") as f:
            f.write(" ".join(argv if argv is not None else sys.argv) + "\n")

    def read(split):
        examples = load_caption_set(config.data, split, strict=config.strict, image_root=config.image_root,
                                    image_column=config.image_column, caption_column=config.caption_column,
                                    audio_root=config.audio_root, audio_column=config.audio_column,
                                    allow_outside_paths=config.allow_outside_paths)[0]
        return usable_examples(examples, config.model.modalities, f"{config.data} ({split})")

    train_ex = read(config.train_split)
    val_ex = read(config.val_split) if config.val_split else []
    if val_ex and {tuple(ex.inputs.items()) for ex in val_ex} == {tuple(ex.inputs.items()) for ex in train_ex}:
        logger.warning("%s has no separate %r split (COCO files and tables are one split each): validation "
                       "would repeat the training images, so it is skipped; pass --val-split none to silence this",
                       config.data, config.val_split)
        val_ex = []
    captioner = Captioner.from_config(config.model, tokenizer=tokenizer, device=accelerator.device)
    tok = captioner.tokenizer
    rows, ids = tokenize_pairs(tok, train_ex, max_tokens=config.max_caption_tokens, prompt=config.model.prompt)
    logger.info("training on %d items (%d captions), validating on %d items", len(train_ex), len(rows), len(val_ex))
    with accelerator.main_process_first():  # the main process fills the feature cache, the others read it
        train_feats = encode_examples(captioner, train_ex, config, desc="encoding train")
        val_feats = encode_examples(captioner, val_ex, config, desc="encoding val") if val_ex else None

    world, rank = accelerator.num_processes, accelerator.process_index
    sampler = CaptionBatchSampler([len(x) for x in ids], batch_size=config.batch_size, seed=config.seed,
                                  bucket=config.bucket_by_length, rank=rank, world=world)
    train_loader = make_loader(train_feats, rows, ids, tok, sampler)
    val_loader = None
    if val_ex:
        vrows, vids = tokenize_pairs(tok, val_ex, max_tokens=config.max_caption_tokens, prompt=config.model.prompt)
        vsampler = CaptionBatchSampler([len(x) for x in vids], batch_size=config.batch_size, seed=0, bucket=False,
                                       shuffle=False, rank=rank, world=world)
        val_loader = make_loader(val_feats, vrows, vids, tok, vsampler)

    model = captioner.model
    for m, mapper in model.mappers.items():
        if mapper.feature_norm is not None and not resuming:  # on resume the statistics come back with the state
            mapper.feature_norm.fit(train_feats.features[m][train_feats.present[m]])
    params = [p for p in model.parameters() if p.requires_grad]
    if main_proc:
        logger.info("trainable parameters: %s; %d processes x %d batches per epoch", f"{sum(p.numel() for p in params):,}",
                    world, len(sampler))
    # Batches are already sharded by our sampler, so the data loader is not passed to accelerate.
    fused = {"fused": True} if accelerator.device.type == "cuda" else {}
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, **fused)
    steps_per_epoch = math.ceil(len(sampler) / config.grad_accum_steps)
    total_steps = config.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, warmup=config.warmup_steps, total=total_steps, schedule=config.schedule))
    # The scheduler is stepped once per optimiser step by us (not prepared: accelerate would step it
    # once per process), but saved with the state.
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)

    progress = {"step": 0, "epoch": 0, "batch": 0, "best": float("inf")}
    if resuming:
        accelerator.load_state(str(state_dir))
        progress = json.loads((state_dir / "progress.json").read_text())
        logger.info("resumed from %s at step %d (epoch %d, batch %d)", state_dir, progress["step"],
                    progress["epoch"] + 1, progress["batch"])
    log = _Logger(out, main_proc)
    step = progress["step"]
    unwrapped = accelerator.unwrap_model(model)

    def validate_and_save(epoch_no: int, train_loss: float) -> None:
        """Validation loss (+ greedy BLEU-4/CIDEr), a metrics record, last/, and best/ when the validation
        loss (else the training loss) is the lowest so far."""
        record = {"step": step, "epoch": epoch_no, "train_loss": train_loss}
        if val_loader is not None:
            record["val_loss"] = evaluate_loss(model, val_loader, accelerator)
        score = record.get("val_loss", record["train_loss"])
        if main_proc:
            cap = Captioner(unwrapped, tok, device=accelerator.device)
            if val_ex and config.val_images > 0:
                record.update(caption_metrics(cap, val_feats, val_ex, limit=config.val_images))
            log.log(record)
            logger.info("epoch %d: %s", epoch_no,
                        ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
            cap.save_pretrained(out / "last", step=step, epoch=epoch_no)
            if score < progress["best"]:
                cap.save_pretrained(out / "best", step=step, epoch=epoch_no)
        if score < progress["best"]:
            progress["best"] = score

    model.train()
    stop = False
    for epoch in range(progress["epoch"], config.epochs):
        start = progress["batch"] if epoch == progress["epoch"] else 0
        sampler.set_epoch(epoch, start)
        n_batches = start + len(sampler)
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{config.epochs}", disable=not main_proc)
        t0, seen, loss, done_batches = time.perf_counter(), 0, None, start
        for i, (features, present, ids_b, mask) in enumerate(bar, start=start):
            # Seeded by position, not by a running RNG, so a resumed run drops the same inputs.
            present = drop_modalities(present, config.modality_dropout,
                                      torch.Generator().manual_seed(config.seed * 1_000_003 + epoch * 100_003 + i))
            features, present = _to(features, accelerator.device), _to(present, accelerator.device)
            ids_b, mask = ids_b.to(accelerator.device, non_blocking=True), mask.to(accelerator.device, non_blocking=True)
            # Gradients are synchronised across processes only on the pass that ends an optimiser step.
            last_micro = (i + 1) % config.grad_accum_steps == 0 or i + 1 == n_batches
            with contextlib.nullcontext() if last_micro else accelerator.no_sync(model):
                loss = model(features, ids_b, mask, present).loss
                accelerator.backward(loss / config.grad_accum_steps)
            seen += ids_b.shape[0] * world
            if not last_micro:
                continue
            if config.grad_clip > 0:
                accelerator.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            # Reading the loss waits for the GPU: only every log_every steps, so the CPU can queue ahead.
            if step % config.log_every == 0 or step == 1:
                rate, value = seen / (time.perf_counter() - t0), loss.item()
                bar.set_postfix(loss=f"{value:.3f}", caps_per_s=f"{rate:.0f}")
                if step % config.log_every == 0:
                    log.log({"step": step, "epoch": epoch + 1, "loss": value, "lr": scheduler.get_last_lr()[0],
                             "captions_per_s": rate, "captions": seen, "time": time.time()})
            done_batches = i + 1
            if config.val_every and step % config.val_every == 0 and done_batches < n_batches:
                validate_and_save(epoch + 1, loss.item())  # the epoch's end validates anyway
            if config.save_every and step % config.save_every == 0 and done_batches < n_batches:
                _save_state(accelerator, out, {**progress, "step": step, "epoch": epoch, "batch": done_batches})
            if config.max_steps is not None and step >= config.max_steps:
                stop = True
                break
        if stop:
            if not (config.save_every and step % config.save_every == 0):
                _save_state(accelerator, out, {**progress, "step": step, "epoch": epoch, "batch": done_batches})
            logger.info("stopped at max_steps=%d; continue with --resume", config.max_steps)
            break
        validate_and_save(epoch + 1, loss.item() if loss is not None else float("nan"))
        progress = {**progress, "step": step, "epoch": epoch + 1, "batch": 0}
        _save_state(accelerator, out, progress)
    accelerator.wait_for_everyone()
    return out / "best"
