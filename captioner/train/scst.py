"""Self-critical sequence training (SCST, Rennie et al. 2017), as a stage of the one training loop (loop.py).

Instead of the cross-entropy of reference captions, a step samples `scst_samples` captions per image with
the model's own sampler (temperature 1, no top-k/top-p, without gradients), rewards each with CIDEr-D
against the image's references (scoring/ciderd.py; document frequencies of the training references,
computed once and cached as `ciderd_df.json` in the run directory), optionally plus a weighted CLIPScore,
and minimises -(reward - baseline) x (sum of the sample's token log-probabilities, EOS included, padding
masked). The log-probabilities come from one teacher-forced forward pass over the samples (the usual
fast way: sampling keeps no graph). Baseline: the mean reward of the image's other samples ("new SCST",
the default) or the reward of its greedy caption.

The loop keeps its data readers, accelerate, mixed precision, resume, validation and saves; this module
gives it batches of images instead of (image, caption) pairs (`ScstStage.loader`), the loss of a batch
(`ScstStage.loss`), the mean reward to log, and the score that decides best/ (validation CIDEr).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from captioner.config import ConfigError, DecodeConfig, TrainConfig
from captioner.decoding.search import LMStepper, generate
from captioner.model.tokens import decode_ids, pad_id
from captioner.scoring.ciderd import CiderD, DocumentFrequency
from captioner.scoring.metrics import simple_tokenize
from captioner.train.batching import CaptionBatchSampler, ItemFeatures

logger = logging.getLogger(__name__)

DF_FILE = "ciderd_df.json"  # beside the run's config
# Under a config file and flags on the command line (what is given explicitly wins): the literature's
# values for fine-tuning a cross-entropy model with SCST.
SCST_DEFAULTS = {"lr": 1e-5, "epochs": 3}


class _Images(torch.utils.data.Dataset):
    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i


class _ImageCollate:
    """A batch of image rows in the loop's (features, present, ids, mask) shape: the rows (B,) stand in for the
    caption ids, and the mask is ones (SCST has no reference tokens to mask)."""

    def __init__(self, features: ItemFeatures):
        self.features = features

    def __call__(self, rows):
        rows = torch.tensor(rows)
        feats, present = self.features.rows(rows)
        return feats, present, rows, torch.ones_like(rows)


class ScstStage:
    """Rewards, baseline and loss of SCST for the training examples (rows of the training features)."""

    def __init__(self, config: TrainConfig, captioner, examples, out: Path, *, accelerator, resuming: bool = False,
                 clip_scorer=None):
        self.config, self.accelerator, self.n = config, accelerator, config.scst_samples
        self.tokenizer, self.stops = captioner.tokenizer, captioner.config.stop_tokens
        self.refs = [[simple_tokenize(c) for c in ex.captions] for ex in examples]
        path = Path(out) / DF_FILE
        if resuming and path.exists():
            df = DocumentFrequency.load(path)
        else:
            df = DocumentFrequency.from_references(self.refs)
            if accelerator.is_main_process:
                df.save(path)
        logger.info("SCST: CIDEr-D document frequencies of %d training items (%d n-grams) in %s", df.num_docs,
                    len(df.df), path)
        self.scorer = CiderD(df)
        self.sample_decode = DecodeConfig(strategy="sample", num_captions=self.n, temperature=1.0, top_p=1.0,
                                          top_k=0, max_new_tokens=config.scst_max_tokens)
        self.greedy_decode = DecodeConfig(strategy="greedy", max_new_tokens=config.scst_max_tokens)
        self.clip = None
        if config.clip_reward_weight > 0:
            self.clip = clip_scorer if clip_scorer is not None else _clip_scorer(captioner)
        self.rewards_seen: list[float] = []  # mean reward of each step since the last log
        self.since_validation: list[float] = []  # ... since the last validation

    # ------------------------------------------------------------------ batches

    def loader(self, features: ItemFeatures, *, rank: int, world: int):
        """(sampler, loader) of image batches: batch_size sampled captions per step, so batch_size /
        scst_samples images (at least one)."""
        images = max(1, self.config.batch_size // self.n)
        sampler = CaptionBatchSampler([1] * len(self.refs), batch_size=images, seed=self.config.seed, bucket=False,
                                      rank=rank, world=world)
        loader = torch.utils.data.DataLoader(_Images(len(self.refs)), batch_sampler=sampler,
                                             collate_fn=_ImageCollate(features),
                                             generator=torch.Generator().manual_seed(0))
        return sampler, loader

    # ------------------------------------------------------------------ the loss of a batch

    @torch.no_grad()
    def _decode(self, model, features, present, decode: DecodeConfig) -> torch.Tensor:
        """Token ids (B * N, T) of N captions per row; rows with the same inputs are decoded together, so a
        row's captions never depend on its neighbours (as Captioner.caption_rows does)."""
        b = next(iter(features.values())).shape[0]
        groups: dict[tuple, list[int]] = {}
        for i, kinds in enumerate(zip(*(present[m].tolist() for m in features))):
            groups.setdefault(tuple(m for m, has in zip(features, kinds) if has), []).append(i)
        per_row: list[torch.Tensor | None] = [None] * b
        for kinds, rows in groups.items():
            index = torch.tensor(rows, device=present[kinds[0]].device)
            embeds, _ = model.prefix_embeds({m: features[m][index] for m in kinds})  # (b_g, Q, D)
            out = generate(LMStepper(model.lm), embeds, decode, eos_id=self.tokenizer.eos_token_id,
                           pad_id=pad_id(self.tokenizer), stop_ids=self.stops).tokens  # (b_g, N, T)
            for j, row in enumerate(rows):
                per_row[row] = out[j]
        width = max(t.shape[-1] for t in per_row)
        return torch.cat([F.pad(t, (0, width - t.shape[-1]), value=pad_id(self.tokenizer)) for t in per_row])

    def rewards(self, tokens: torch.Tensor, rows: list[int], image_features: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Reward (R,) of each caption (token ids (R, T)) of training item rows[i]: CIDEr-D against its
        references (+ clip_reward_weight x CLIPScore against image_features (R, F))."""
        texts = [decode_ids(self.tokenizer, seq, self.stops) for seq in tokens.tolist()]
        reward = torch.tensor(self.scorer.score([simple_tokenize(t) for t in texts], self.refs, ref_index=rows))
        if self.clip is not None:
            text = self.clip.text_embeddings([self.clip.prompt + t for t in texts])  # (R, D), normalised
            image = F.normalize(image_features.float().to(text.device), dim=-1)
            if image.shape[-1] != text.shape[-1]:
                raise ConfigError(f"the CLIP reward compares image features of {image.shape[-1]} values with text "
                                  f"embeddings of {text.shape[-1]}: the scorer must be the captioner's CLIP")
            clip = self.clip.weight * (image * text).sum(-1).clamp_min(0)  # CLIPScore, on the scorer's device
            reward = reward + self.config.clip_reward_weight * clip.float().cpu()
        return reward

    def loss(self, model, features, present, rows: torch.Tensor, *, seed: int) -> torch.Tensor:
        """-(reward - baseline) x sum of token log-probs, averaged over the batch's samples. `model` is the
        (prepared) model in training mode; `seed` makes the samples reproducible (and a resumed run's too)."""
        n, device = self.n, rows.device
        unwrapped = self.accelerator.unwrap_model(model)
        unwrapped.eval()  # samples come from the model without dropout
        try:
            with self.accelerator.autocast():
                decode = dataclasses.replace(self.sample_decode, seed=seed)
                tokens = self._decode(unwrapped, features, present, decode)  # (B * N, T)
                greedy = (self._decode(unwrapped, features, present, self.greedy_decode)
                          if self.config.scst_baseline == "greedy" else None)  # (B, T')
        finally:
            unwrapped.train()
        row_list = rows.tolist()
        image = features.get("image")
        sampled_rows = [r for r in row_list for _ in range(n)]
        reward = self.rewards(tokens, sampled_rows, None if image is None else image.repeat_interleave(n, 0))
        reward = reward.view(-1, n)  # (B, N)
        greedy_reward = None if greedy is None else self.rewards(greedy, row_list, image)  # (B,)
        advantage = advantages(reward, greedy_reward).view(-1).to(device)  # (B * N,)
        self.rewards_seen.append(reward.mean().item())
        self.since_validation.append(self.rewards_seen[-1])

        return -(advantage * self.sequence_logprobs(model, features, present, tokens)).mean()

    def sequence_logprobs(self, model, features, present, tokens: torch.Tensor) -> torch.Tensor:
        """(B * N,) sum of each sample's token log-probabilities (up to and including its first end token),
        from one teacher-forced pass of `model` over tokens (B * N, T) sampled for the B rows of features."""
        n = tokens.shape[0] // next(iter(features.values())).shape[0]
        ends = torch.isin(tokens, torch.tensor([self.tokenizer.eos_token_id, *self.stops], device=tokens.device))
        mask = (ends.cumsum(1) - ends.long()) == 0  # (B * N, T): up to and including the first end token
        feats_n = {m: f.repeat_interleave(n, 0) for m, f in features.items()}
        present_n = {m: p.repeat_interleave(n, 0) for m, p in present.items()}
        logits = model(feats_n, tokens, mask.long(), present_n).logits  # (B * N, T, V)
        logp = -F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten(), reduction="none").view(tokens.shape)
        return (logp * mask).sum(1)

    # ------------------------------------------------------------------ logging and best/

    def log_fields(self) -> dict[str, float]:
        """The mean reward of the steps since the last call (for metrics.jsonl)."""
        seen, self.rewards_seen = self.rewards_seen, []
        return {"reward": sum(seen) / len(seen)} if seen else {}

    def selection_score(self, record: dict) -> float:
        """Lower is better, as the loop's validation loss: minus the validation CIDEr (computed on the main
        process, shared with all), else minus the mean reward since the last validation."""
        value = record.get("val_cider")
        if value is None and self.since_validation:
            value = sum(self.since_validation) / len(self.since_validation)
        self.since_validation = []
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            value = broadcast_object_list([value])[0]
        return -value if value is not None and math.isfinite(value) else float("nan")


def advantages(reward: torch.Tensor, greedy: torch.Tensor | None = None) -> torch.Tensor:
    """reward (B, N) of N samples per image minus the baseline: the mean reward of the image's other N - 1
    samples, or the reward of its greedy caption, greedy (B,)."""
    if greedy is not None:
        return reward - greedy[:, None]
    n = reward.shape[1]
    return reward - (reward.sum(1, keepdim=True) - reward) / (n - 1)


def _clip_scorer(captioner):
    """CLIPScorer of the captioner's own CLIP (both towers, on its device), so the cached image features are
    its image embeddings. A random tower is refused: its text and image embeddings are unrelated."""
    from captioner.scoring.evaluate import clip_scorer_for

    if "image" not in captioner.config.modalities:
        raise ConfigError("the CLIP reward needs an image captioner")
    scorer, _ = clip_scorer_for(captioner)
    if scorer is None:
        raise ConfigError("the CLIP reward needs the captioner's CLIP to be a named pretrained one (clip_pretrained, "
                          "no clip_config): a random tower's text and image embeddings are unrelated")
    return scorer
