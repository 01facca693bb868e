"""The one training loop (accelerate): cached image/audio features -> mappers (+ LM) -> caption loss.

The encoders are frozen, so each unique image and sound is encoded once before training (optionally
into a persistent feature cache, see features.py), never once per caption. Items may have an image, a
sound or both; with `modality_dropout` a two-input item sometimes loses one of them for a step, so a
model trained on pairs also captions either input alone. Batches are length-bucketed and
sharded across processes by `CaptionBatchSampler` (batching.py), which gives every process the same
number of batches and every (image, caption) pair to exactly one process once per epoch. A step whose
loss or gradient is not finite is skipped; `max_nonfinite_steps` of them in a row stop the run with a
TrainingError. The run directory holds the resolved config, the command line, `metrics.jsonl` (and
TensorBoard logs when installed), `last/` and `best/` captioners, and `state/` for resuming (state.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from captioner.api import Captioner
from captioner.config import DecodeConfig, TrainConfig, save_json
from captioner.data import CaptionExample, load_caption_set
from captioner.errors import ConfigError, InputError, TrainingError
from captioner.train.batching import (CaptionBatchSampler, ItemFeatures, drop_modalities, make_loader,  # noqa: F401
                                      tokenize_pairs, usable_examples)
from captioner.train.state import check_resume_config, latest_state, load_state, save_state

logger = logging.getLogger(__name__)


def lr_lambda(step: int, *, warmup: int, total: int, schedule: str) -> float:
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress


def encode_examples(captioner: Captioner, examples: list[CaptionExample], config: TrainConfig, *,
                    desc: str) -> tuple[list[CaptionExample], ItemFeatures]:
    """The examples whose inputs could all be read, and the features of every input they have and the
    model takes: from the feature cache, or encoded into memory. An unreadable input is an error with
    `config.strict`; else the examples that have one are dropped, reported in one warning line."""
    model = captioner.model
    errors: dict[str, str] | None = None if config.strict else {}
    features, present = {}, {}
    for m in model.modalities:
        rows = [i for i, ex in enumerate(examples) if m in ex.inputs]
        present[m] = torch.zeros(len(examples), dtype=torch.bool)
        present[m][rows] = True
        features[m] = torch.zeros(len(examples), model.encoders[m].output_dim)
        if rows:
            paths = [examples[i].inputs[m] for i in rows]
            features[m][rows] = _encode_paths(captioner, m, paths, config, desc=f"{desc} ({m})", errors=errors)
    if errors:
        keep = [i for i, ex in enumerate(examples) if not any(ex.inputs.get(m) in errors for m in model.modalities)]
        logger.warning("%s: %d unreadable input(s) skipped, %d of %d items dropped (e.g. %s)", desc, len(errors),
                       len(examples) - len(keep), len(examples), "; ".join(list(errors.values())[:3]))
        if not keep:
            raise InputError(f"{desc}: no input could be read, e.g. {next(iter(errors.values()))}")
        index = torch.tensor(keep)
        examples = [examples[i] for i in keep]
        features, present = {m: f[index] for m, f in features.items()}, {m: p[index] for m, p in present.items()}
    return examples, ItemFeatures(features, present)


def _encode_paths(captioner: Captioner, modality: str, paths: list[str], config: TrainConfig, *, desc: str,
                  errors: dict[str, str] | None = None) -> torch.Tensor:
    """Features (N, F) of image or audio files, read by the one input loader. An unreadable file raises its
    InputError, or, with `errors`, is recorded there (path -> message) and its row is zeros."""
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
                         num_workers=config.num_workers, device=captioner.device, desc=desc, errors=errors)
    from captioner.inputs.loader import InputDataset

    feats = torch.zeros(len(paths), enc.output_dim)
    dataset = InputDataset([{modality: p} for p in paths], captioner.input_reader())
    with tqdm(total=len(paths), desc=desc, unit="file", leave=False) as bar:
        for batch, groups in captioner.feature_batches(dataset, batch_size=config.encode_batch_size,
                                                       num_workers=config.num_workers):
            for i, _, error in batch:
                if error is not None:
                    if errors is None:
                        raise error
                    errors[paths[i]] = str(error)
            for rows, features in groups:
                feats[[batch[j][0] for j in rows]] = features[modality].float().cpu()
            bar.update(len(batch))
    return feats


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


def validation_decoding(config: TrainConfig) -> DecodeConfig:
    """How the validation captions are decoded: the run's val_strategy / val_num_beams."""
    return DecodeConfig(strategy=config.val_strategy, num_beams=config.val_num_beams, max_new_tokens=30)


def caption_metrics(captioner: Captioner, features: ItemFeatures, examples, *, limit: int,
                    decode: DecodeConfig | None = None) -> dict[str, float]:
    """Captions (`decode`, default greedy) for the first `limit` examples scored with BLEU-4 and CIDEr
    (pure-Python tokenisation: fast, for monitoring; `captioner eval` gives the COCO-exact numbers)."""
    decode = decode or DecodeConfig(strategy="greedy", max_new_tokens=30)
    from captioner.scoring.metrics import score_captions

    n = min(limit, len(examples))
    preds = []
    for start in range(0, n, 64):
        feats, present = features.rows(torch.arange(start, min(n, start + 64)))
        preds += [c[0] for c in captioner.caption_rows(feats, present, decode)]
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



@contextlib.contextmanager
def _own_accelerator_state():
    """accelerate keeps process-wide singletons: each train() starts from fresh ones (a second run in the
    same process, e.g. at another precision, must not inherit the first one's) and gives the caller's back
    when it ends. The process group (PartialState) is shared and kept."""
    from accelerate.state import AcceleratorState, GradientState

    saved = [(cls, dict(cls._shared_state)) for cls in (AcceleratorState, GradientState)]
    for cls, _ in saved:
        cls._shared_state.clear()
    try:
        yield
    finally:
        for cls, state in saved:
            cls._shared_state.clear()
            cls._shared_state.update(state)


# What a training run writes into its output directory (another run's files are never touched).
RUN_FILES = ("train_config.json", "command.txt", "metrics.jsonl", "tensorboard", "state", "last", "best",
             "ciderd_df.json")


def earlier_run(out: Path) -> list[str]:
    """The files of an earlier training run in `out` (folders with a trailing /)."""
    return [name + ("/" if (out / name).is_dir() else "") for name in RUN_FILES
            if (out / name).exists() or (out / name).is_symlink()]


def check_vocabulary(tokenizer, lm) -> None:
    """Every token id must have a row in the LM's embedding (else training fails deep in the model or, for
    ids that fit by chance, learns nothing); one line naming both sizes."""
    ids = max(len(tokenizer), max(tokenizer.get_vocab().values(), default=-1) + 1)
    rows = lm.get_input_embeddings().num_embeddings
    if ids > rows:
        raise ConfigError(f"the tokenizer has {ids} token ids but the LM's vocabulary holds {rows}: size the LM to "
                          f"the tokenizer (vocab_size {ids} in lm_config) or use the LM's own tokenizer")


def _saved_text(out: Path, saved: dict[str, int]) -> str:
    if not saved:
        return f"nothing was saved in {out}"
    return f"saved in {out}: " + ", ".join(f"{name}/ (step {step})" for name, step in saved.items())


def train(config: TrainConfig, *, tokenizer=None, argv: list[str] | None = None) -> Path:
    """Train a captioner; returns the path of the best saved captioner (`last/` when no validation score was
    finite). Raises TrainingError when the loss is not finite for `max_nonfinite_steps` steps in a row."""
    out = Path(config.output_dir)
    if config.init_from:  # the saved captioner's architecture (its weights are loaded in _train)
        from captioner.model.checkpoint import read_config

        if config.overwrite and out.resolve() in Path(config.init_from).resolve().parents:
            raise ConfigError(f"init_from {config.init_from} is inside {out}, which overwrite would remove first")
        config = dataclasses.replace(config, model=read_config(config.init_from)[0])
    if config.model.lm_config is not None and not config.model.finetune_lm:
        raise ConfigError("lm_config builds a randomly initialised LM, and a frozen one never learns the language: "
                          "fine-tune it (finetune_lm) or load a pretrained LM (lm) instead")
    state_dir = latest_state(out)
    resuming = config.resume and state_dir is not None
    if resuming:  # before anything in the run directory changes
        check_resume_config(config, state_dir)
    with _own_accelerator_state():
        return _train(config, out, state_dir if resuming else None, tokenizer=tokenizer, argv=argv)


def _train(config: TrainConfig, out: Path, state_dir: Path | None, *, tokenizer, argv) -> Path:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=not torch.cuda.is_available())
    set_seed(config.seed)
    main_proc, resuming = accelerator.is_main_process, state_dir is not None
    earlier = earlier_run(out)
    accelerator.wait_for_everyone()  # every process looked before the main one writes anything
    if earlier and not (config.resume or config.overwrite):
        raise ConfigError(f"{out} holds an earlier run ({', '.join(earlier)}): continue it with resume or start "
                          "afresh with overwrite (or choose another output directory)")
    if earlier and config.overwrite and main_proc:
        logger.info("overwrite: removing the earlier run in %s (%s)", out, ", ".join(earlier))
        for name in earlier:
            path = out / name.rstrip("/")
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    accelerator.wait_for_everyone()
    if config.resume and not resuming:
        logger.info("resume: no state in %s, starting from scratch", out)
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
    captioner = (Captioner.from_pretrained(config.init_from, device=accelerator.device) if config.init_from else
                 Captioner.from_config(config.model, tokenizer=tokenizer, device=accelerator.device))
    tok = captioner.tokenizer
    check_vocabulary(tok, captioner.model.lm)
    with accelerator.main_process_first():  # the main process fills the feature cache, the others read it
        train_ex, train_feats = encode_examples(captioner, train_ex, config, desc="encoding train")
        val_ex, val_feats = encode_examples(captioner, val_ex, config, desc="encoding val") if val_ex else ([], None)
    rows, ids = tokenize_pairs(tok, train_ex, max_tokens=config.max_caption_tokens, prompt=config.model.prompt)
    logger.info("training on %d items (%d captions), validating on %d items", len(train_ex), len(rows), len(val_ex))

    world, rank = accelerator.num_processes, accelerator.process_index
    sampler = CaptionBatchSampler([len(x) for x in ids], batch_size=config.batch_size, seed=config.seed,
                                  bucket=config.bucket_by_length, rank=rank, world=world)
    train_loader = make_loader(train_feats, rows, ids, tok, sampler)
    scst = None
    if config.scst:  # batches of images, a reward instead of cross-entropy (train/scst.py)
        from captioner.train.scst import ScstStage

        scst = ScstStage(config, captioner, train_ex, out, accelerator=accelerator, resuming=resuming)
        sampler, train_loader = scst.loader(train_feats, rank=rank, world=world)
    val_loader = None
    if val_ex:
        vrows, vids = tokenize_pairs(tok, val_ex, max_tokens=config.max_caption_tokens, prompt=config.model.prompt)
        vsampler = CaptionBatchSampler([len(x) for x in vids], batch_size=config.batch_size, seed=0, bucket=False,
                                       shuffle=False, rank=rank, world=world)
        val_loader = make_loader(val_feats, vrows, vids, tok, vsampler)

    model = captioner.model
    for m, mapper in model.mappers.items():
        if mapper.feature_norm is not None and not resuming and not config.init_from:  # else they come with the weights
            mapper.feature_norm.fit(train_feats.features[m][train_feats.present[m]])
    params = [p for p in model.parameters() if p.requires_grad]
    if main_proc:
        logger.info("trainable parameters: %s; %d processes x %d batches per epoch", f"{sum(p.numel() for p in params):,}",
                    world, len(sampler))
    # Batches are already sharded by our sampler, so the data loader is not passed to accelerate.
    # Fused AdamW (one kernel for all parameters), on CPU too (torch >= 2.4): there torch's default is a
    # per-parameter loop, 0.77 s against 0.15 s per step for a tiny GPT-2's 16M parameters (measured here).
    fused = {"fused": True} if accelerator.device.type in ("cuda", "cpu") else {}
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, **fused)
    steps_per_epoch = math.ceil(len(sampler) / config.grad_accum_steps)
    total_steps = config.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, warmup=config.warmup_steps, total=total_steps, schedule=config.schedule))
    # The scheduler is stepped once per optimiser step by us (not prepared: accelerate would step it
    # once per process); it is saved with the state.
    model, optimizer = accelerator.prepare(model, optimizer)

    progress = {"step": 0, "epoch": 0, "batch": 0, "best": float("inf"), "saved": {}}
    if resuming:
        progress = load_state(accelerator, state_dir, model=model, optimizer=optimizer, scheduler=scheduler)
        logger.info("resumed from %s at step %d (epoch %d, batch %d)", state_dir, progress["step"],
                    progress["epoch"] + 1, progress["batch"])
    log = _Logger(out, main_proc)
    step, saved = progress["step"], dict(progress.get("saved", {}))
    unwrapped = accelerator.unwrap_model(model)

    val_decode = validation_decoding(config)
    val_decoding_name = "greedy" if val_decode.strategy == "greedy" else f"beam{val_decode.num_beams}"
    if main_proc and val_ex and config.val_images > 0:
        logger.info("validation captions: %s decoding of up to %d items", val_decoding_name, config.val_images)

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
                record.update(caption_metrics(cap, val_feats, val_ex, limit=config.val_images, decode=val_decode))
                record["val_decoding"] = val_decoding_name
        if scst is not None:  # SCST: the validation CIDEr (else the reward) decides best/
            score = scst.selection_score(record)
        if main_proc:
            log.log(record)
            logger.info("epoch %d: %s", epoch_no,
                        ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
            cap.save_pretrained(out / "last", step=step, epoch=epoch_no)
            if score < progress["best"]:
                cap.save_pretrained(out / "best", step=step, epoch=epoch_no)
        saved["last"] = step
        if score < progress["best"]:  # a NaN score is never the best
            progress["best"], saved["best"] = score, step

    def checkpoint(epoch: int, batch: int) -> None:
        saved["state"] = step
        save_state(accelerator, out, model=model, optimizer=optimizer, scheduler=scheduler, config=config,
                   progress={**progress, "step": step, "epoch": epoch, "batch": batch, "saved": saved})

    model.train()
    stop, bad_run = None, 0  # stop: None, "max_steps" or "nonfinite"; bad_run: non-finite steps in a row
    if config.max_steps is not None and step >= config.max_steps:
        logger.info("already at max_steps=%d: nothing to train", config.max_steps)
        stop = "max_steps"
    for epoch in range(progress["epoch"], config.epochs if stop is None else 0):
        start = progress["batch"] if epoch == progress["epoch"] else 0
        sampler.set_epoch(epoch, start)
        n_batches = start + len(sampler)
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{config.epochs}", disable=not main_proc)
        t0, seen, loss, done_batches = time.perf_counter(), 0, None, start
        bad = torch.zeros((), dtype=torch.bool, device=accelerator.device)  # this step met a non-finite value
        for i, (features, present, ids_b, mask) in enumerate(bar, start=start):
            # Seeded by position, not by a running RNG, so a resumed run drops the same inputs.
            present = drop_modalities(present, config.modality_dropout,
                                      torch.Generator().manual_seed(config.seed * 1_000_003 + epoch * 100_003 + i))
            features, present = _to(features, accelerator.device), _to(present, accelerator.device)
            ids_b, mask = ids_b.to(accelerator.device, non_blocking=True), mask.to(accelerator.device, non_blocking=True)
            # Gradients are synchronised across processes only on the pass that ends an optimiser step.
            last_micro = (i + 1) % config.grad_accum_steps == 0 or i + 1 == n_batches
            with contextlib.nullcontext() if last_micro else accelerator.no_sync(model):
                loss = (scst.loss(model, features, present, ids_b, seed=config.seed * 1_000_003 + epoch * 100_003 + i)
                        if scst else model(features, ids_b, mask, present).loss)
                accelerator.backward(loss / config.grad_accum_steps)
            bad |= ~torch.isfinite(loss.detach())
            seen += ids_b.shape[0] * world
            if not last_micro:
                continue
            done_batches = i + 1
            if config.grad_clip > 0:
                norm = accelerator.clip_grad_norm_(params, config.grad_clip)
                if config.mixed_precision != "fp16":  # fp16: the gradient scaler skips inf gradients itself
                    bad |= ~torch.isfinite(norm)
            if world > 1:  # every process takes the same decision
                bad = accelerator.reduce(bad.float(), reduction="sum") > 0
            # One wait for the device per step (as a GradScaler does): a non-finite step must not reach the weights.
            if bad.item():
                optimizer.zero_grad(set_to_none=True)
                bad, bad_run = torch.zeros_like(bad), bad_run + 1
                logger.warning("epoch %d, batch %d: the loss or its gradient is not finite; step skipped",
                               epoch + 1, i + 1)
                if bad_run >= config.max_nonfinite_steps:
                    stop = "nonfinite"
                    break
                continue
            bad_run = 0
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
                             "captions_per_s": rate, "captions": seen, "time": time.time(),
                             **(scst.log_fields() if scst else {})})
            if config.val_every and step % config.val_every == 0 and done_batches < n_batches:
                validate_and_save(epoch + 1, loss.item())  # the epoch's end validates anyway
            if config.save_every and step % config.save_every == 0 and done_batches < n_batches:
                checkpoint(epoch, done_batches)
            if config.max_steps is not None and step >= config.max_steps:
                stop = "max_steps"
                break
        train_loss = loss.item() if loss is not None else float("nan")
        if stop == "nonfinite":
            # Skipped steps leave the weights as they were, unless a finite step made them non-finite (a
            # learning rate far too large): then nothing more is saved and the last good saves stay.
            if all(torch.isfinite(p).all() for p in params):
                validate_and_save(epoch + 1, train_loss)
                checkpoint(epoch, done_batches)
            accelerator.wait_for_everyone()
            raise TrainingError(f"the training loss was not finite for {bad_run} optimiser steps in a row (epoch "
                                f"{epoch + 1}, batch {done_batches}, after step {step}); training stopped; "
                                f"{_saved_text(out, saved)}")
        if stop and done_batches < n_batches:  # max_steps mid-epoch: the final model and a state to resume
            if saved.get("last") != step:
                validate_and_save(epoch + 1, train_loss)
            if saved.get("state") != step:
                checkpoint(epoch, done_batches)
            logger.info("stopped at max_steps=%d; resume to continue", config.max_steps)
            break
        validate_and_save(epoch + 1, train_loss)
        progress = {**progress, "step": step, "epoch": epoch + 1, "batch": 0}
        checkpoint(epoch + 1, 0)
        if stop:
            break
    accelerator.wait_for_everyone()
    logger.info("%s", _saved_text(out, saved))
    return out / ("best" if "best" in saved else "last")
