"""The Python API: `Captioner` = CaptionModel + tokenizer + image preprocessing.

    cap = Captioner.from_pretrained("runs/demo/model")
    cap.caption(["a.jpg", "b.png"])                       # -> ["a red circle ...", ...]
    cap.caption("a.jpg", decode=DecodeConfig(strategy="sample", num_captions=3, seed=0))
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Iterator, Sequence

import torch
from PIL import Image

from . import checkpoint
from .config import DecodeConfig, ModelConfig
from .data import CaptionExample
from .decoding import LMStepper, generate
from .encoders import build_tokenizer
from .images import MAX_PIXELS, ImageError, load_image
from .model import CaptionModel
from .tokens import decode_ids, encode_prompt, pad_id

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class EvalResult:
    """Corpus and per-image scores of a captioner on a caption set, with its predictions."""

    corpus: dict[str, float]
    per_image: dict[str, dict[str, float]]
    predictions: dict[str, str]
    examples: list[CaptionExample]
    coco_exact: bool
    skipped: list[str]  # metrics not computed, and why; images that could not be read


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Captioner:
    def __init__(self, model: CaptionModel, tokenizer, *, device: str | torch.device | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.device = torch.device(device) if device is not None else default_device()
        self.model.to(self.device)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_config(cls, config: ModelConfig, *, tokenizer=None, device=None) -> "Captioner":
        """A new (untrained mapper) captioner; pretrained parts are fetched by name."""
        tokenizer = tokenizer if tokenizer is not None else build_tokenizer(config)
        model = CaptionModel.from_config(config, prompt_ids=encode_prompt(tokenizer, config.prompt))
        return cls(model.eval(), tokenizer, device=device)

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, device=None) -> "Captioner":
        """Rebuild a captioner saved with `save_pretrained` (strict: mismatches raise CheckpointError)."""
        config, _ = checkpoint.read_config(directory)
        tokenizer = build_tokenizer(config, directory)
        model = CaptionModel.from_config(config, prompt_ids=encode_prompt(tokenizer, config.prompt),
                                         load_weights=False)
        checkpoint.load_weights(model, directory)
        model.eval()
        return cls(model, tokenizer, device=device)

    def save_pretrained(self, directory: str | Path, **extra) -> Path:
        return checkpoint.save_pretrained(self.model, self.tokenizer, directory, extra=extra or None)

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    # ------------------------------------------------------------------ captioning

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return torch.stack([self.model.image_encoder.preprocess(im) for im in images])  # (B, 3, H, W)

    @torch.no_grad()
    def encode(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.model.encode_images(self.preprocess(images).to(self.device))  # (B, F)

    @torch.no_grad()
    def caption_features(self, features: torch.Tensor, decode: DecodeConfig | None = None) -> list[list[str]]:
        """Captions for image features (B, F): a list of num_captions strings per image."""
        decode = decode or DecodeConfig()
        was_training = self.model.training
        self.model.eval()
        try:
            embeds = self.model.prefix_embeds(features.to(self.device))  # (B, Q, D)
            out = generate(LMStepper(self.model.lm, use_cache=decode.use_cache), embeds, decode,
                           eos_id=self.tokenizer.eos_token_id, pad_id=pad_id(self.tokenizer))
        finally:
            self.model.train(was_training)
        return [[decode_ids(self.tokenizer, seq.tolist()) for seq in row] for row in out.tokens]

    def caption(self, images, *, decode: DecodeConfig | None = None, batch_size: int = 32, **overrides):
        """Caption one image or a list (paths or PIL images). Returns a string per image, or a list of
        strings per image when num_captions > 1. Decode options may be passed as keywords."""
        decode = dataclasses.replace(decode or DecodeConfig(), **overrides)
        single = isinstance(images, (str, Path, Image.Image))
        items = [images] if single else list(images)
        results = []
        for start in range(0, len(items), batch_size):
            batch = [im if isinstance(im, Image.Image) else load_image(im) for im in items[start:start + batch_size]]
            results.extend(self.caption_features(self.encode(batch), decode))
        results = [r[0] if decode.num_captions == 1 else r for r in results]
        return results[0] if single else results

    def iter_captions(self, paths: Sequence[str], *, decode: DecodeConfig | None = None, batch_size: int = 32,
                      max_pixels: int | None = MAX_PIXELS) -> Iterator[tuple[str, list[str] | None, str | None]]:
        """Stream (path, captions, error) over many files; unreadable files (and images over `max_pixels`)
        yield an error and the rest of the batch is still captioned. Memory does not grow with the
        number of images."""
        for start in range(0, len(paths), batch_size):
            chunk = paths[start:start + batch_size]
            loaded, failed = [], {}
            for p in chunk:
                try:
                    loaded.append((p, load_image(p, max_pixels=max_pixels)))
                except ImageError as e:
                    failed[p] = str(e)
            captions = dict(zip([p for p, _ in loaded],
                                self.caption_features(self.encode([im for _, im in loaded]), decode)
                                if loaded else []))
            for p in chunk:
                yield (p, None, failed[p]) if p in failed else (p, captions[p], None)

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, examples: Sequence[CaptionExample], *, decode: DecodeConfig | None = None,
                 batch_size: int = 32, metrics: Sequence[str] = ("BLEU", "METEOR", "ROUGE_L", "CIDEr"),
                 clip_scorer=None) -> EvalResult:
        """Caption every example's image and score against its references (COCO caption metrics, plus
        CLIPScore / RefCLIPScore when a `clipscore.CLIPScorer` is given). Unreadable images are left
        out of the scores and listed in `skipped`."""
        from .metrics import score_captions

        decode = decode or DecodeConfig()
        by_path = {}
        for ex in examples:
            by_path.setdefault(ex.image, []).append(ex)
        predictions, skipped = {}, []
        paths = list(by_path)
        from tqdm.auto import tqdm

        with tqdm(total=len(paths), unit="img", desc="captioning", disable=len(paths) < 2 * batch_size) as bar:
            for path, captions, error in self.iter_captions(paths, decode=decode, batch_size=batch_size):
                bar.update(1)
                if error:
                    skipped.append(f"image skipped: {error}")
                    continue
                for ex in by_path[path]:
                    predictions[ex.image_id] = captions[0]
        kept = [ex for ex in examples if ex.image_id in predictions]
        if not kept:
            raise ImageError("no image of the caption set could be read: " + "; ".join(skipped[:3]))
        scores = score_captions(predictions, {ex.image_id: ex.captions for ex in kept}, metrics=metrics)
        corpus, per_image = dict(scores.corpus), {k: dict(v) for k, v in scores.per_image.items()}
        if clip_scorer is not None:
            sums: dict[str, float] = {}
            for start in range(0, len(kept), batch_size):
                chunk = kept[start:start + batch_size]
                out = clip_scorer.score([load_image(ex.image) for ex in chunk],
                                        [predictions[ex.image_id] for ex in chunk], [ex.captions for ex in chunk])
                for ex, row in zip(chunk, out["per_image"]):
                    per_image[ex.image_id].update(row)
                    for k, v in row.items():
                        sums[k] = sums.get(k, 0.0) + v
            corpus.update({k: v / len(kept) for k, v in sums.items()})
        return EvalResult(corpus=corpus, per_image=per_image, predictions=predictions, examples=kept,
                          coco_exact=scores.coco_exact, skipped=[*scores.skipped, *skipped])
