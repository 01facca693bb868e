"""The Python API: `Captioner` = CaptionModel + tokenizer + input reading (images, sounds).

    cap = Captioner.from_pretrained("runs/demo/model")
    cap.caption(["a.jpg", "b.png"])                       # -> ["a red circle ...", ...]
    cap.caption("a.jpg", decode=DecodeConfig(strategy="sample", num_captions=3, seed=0))
    cap.caption("frame.jpg", audio="frame.wav")           # a captioner trained on image + audio
    cap.iter_captions(paths_or_dicts, num_workers=4)      # streaming, errors per item
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from captioner.model import checkpoint
from captioner.config import DecodeConfig, ModelConfig
from captioner.data import CaptionExample
from captioner.decoding.fast import PackedHead, StaticCacheStepper
from captioner.decoding.search import LMStepper, generate
from captioner.model.encoders import build_tokenizer
from captioner.inputs.audio import AudioError, load_audio
from captioner.inputs.image import MAX_PIXELS, ImageError, load_image
from captioner.inputs.jpeg import JpegPipeline, TensorPreprocess, prepare_image
from captioner.model.model import CaptionModel
from captioner.model.tokens import decode_ids, encode_prompt, pad_id

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


class _InputFiles(torch.utils.data.Dataset):
    """Item i -> (i, {modality: preprocessed input}, None), or (i, None, "PATH: reason") when a file cannot
    be read. Runs in DataLoader workers, so it holds only picklable preprocessing, not the model. With
    `jpegs`, plain JPEG files come back as `JpegBytes` instead of preprocessed tensors."""

    def __init__(self, items: list[dict], *, image_preprocess, audio_loader, max_pixels: int | None,
                 jpegs: bool = False):
        self.items, self.image_preprocess, self.audio_loader = items, image_preprocess, audio_loader
        self.max_pixels, self.jpegs = max_pixels, jpegs

    def _image(self, path):
        return prepare_image(path, name=os.fsdecode(path), preprocess=self.image_preprocess,
                             max_pixels=self.max_pixels, jpegs=self.jpegs)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        try:
            out = {}
            for m, path in self.items[i].items():
                out[m] = self._image(path) if m == "image" else self.audio_loader(path)
            return i, out, None
        except (ImageError, AudioError) as e:
            return i, None, str(e)


def _decode_jpegs(batch: list, pipeline: JpegPipeline) -> list:
    """A loader batch with its JPEGs decoded on the device in one call; a file that cannot be decoded
    becomes that item's error, as in the PIL path."""
    rows = [j for j, (_, tensors, _) in enumerate(batch) if tensors is not None and "image" in tensors]
    batch = list(batch)
    for j, image in zip(rows, pipeline.resolve([batch[j][1]["image"] for j in rows])):
        i, tensors, _ = batch[j]
        batch[j] = (i, None, str(image)) if isinstance(image, ImageError) else (i, {**tensors, "image": image}, None)
    return batch


def _is_one(images, audio) -> bool:
    """Whether caption() got a single input rather than lists."""
    one = (str, Path, Image.Image, np.ndarray)
    return (images is not None and isinstance(images, one)) or (images is None and isinstance(audio, one))


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Captioner:
    def __init__(self, model: CaptionModel, tokenizer, *, device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None):
        """dtype: run every part in this precision ("bfloat16" halves memory and is much faster on recent
        GPUs; logits are scored in float32). Default: as built (float32)."""
        self.model, self.tokenizer = model, tokenizer
        self.device = torch.device(device) if device is not None else default_device()
        self.model.to(self.device)
        if dtype is not None:
            self.model.to(DTYPES[dtype] if isinstance(dtype, str) else dtype)
        self._static_steppers: dict[tuple, StaticCacheStepper] = {}  # kept: they hold caches and compiled steps
        self._packed_head = PackedHead()  # kept: holds the packed copy of the LM head's weight

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_config(cls, config: ModelConfig, *, tokenizer=None, device=None, dtype=None) -> "Captioner":
        """A new (untrained mapper) captioner; pretrained parts are fetched by name."""
        tokenizer = tokenizer if tokenizer is not None else build_tokenizer(config)
        model = CaptionModel.from_config(config, prompt_ids=encode_prompt(tokenizer, config.prompt))
        return cls(model.eval(), tokenizer, device=device, dtype=dtype)

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, device=None, dtype=None) -> "Captioner":
        """Rebuild a captioner saved with `save_pretrained` (strict: mismatches raise CheckpointError)."""
        config, _ = checkpoint.read_config(directory)
        tokenizer = build_tokenizer(config, directory)
        model = CaptionModel.from_config(config, prompt_ids=encode_prompt(tokenizer, config.prompt),
                                         load_weights=False)
        checkpoint.load_weights(model, directory)
        model.eval()
        return cls(model, tokenizer, device=device, dtype=dtype)

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
    def encode_audio(self, clips: Sequence[str | Path | np.ndarray]) -> torch.Tensor:
        """Audio features (B, F) for files or mono float arrays already at the encoder's sample rate."""
        self.model.check_modalities(["audio"])
        encoder = self.model.encoders["audio"]
        samples = [c if isinstance(c, np.ndarray) else load_audio(c, sample_rate=encoder.sample_rate) for c in clips]
        return encoder(encoder.preprocess(samples))  # (B, F)

    def encode_inputs(self, items: Sequence[dict]) -> dict[str, torch.Tensor]:
        """Features per modality for items that all have the same inputs, e.g. [{"image": "a.jpg",
        "audio": "a.wav"}, ...]; images may be paths or PIL images, audio paths or mono arrays."""
        kinds = list(items[0])
        self.model.check_modalities(kinds)
        out = {}
        if "image" in kinds:
            out["image"] = self.encode([im if isinstance(im, Image.Image) else load_image(im)
                                        for im in (it["image"] for it in items)])
        if "audio" in kinds:
            out["audio"] = self.encode_audio([it["audio"] for it in items])
        return out

    @torch.no_grad()
    def caption_features(self, features: dict[str, torch.Tensor] | torch.Tensor, decode: DecodeConfig | None = None
                         ) -> list[list[str]]:
        """Captions for features {modality: (B, F)} (every row has every given modality; a bare (B, F)
        tensor is the model's only modality): a list of num_captions strings per row."""
        decode = decode or DecodeConfig()
        was_training = self.model.training
        self.model.eval()
        try:
            if isinstance(features, torch.Tensor):
                features = features.to(self.device)
            else:
                features = {m: f.to(self.device) for m, f in features.items()}
            embeds, _ = self.model.prefix_embeds(features)  # (B, Q, D); no absent segments
            # (not inside compiled steps: the compiler makes its own choices for the head)
            fast_head = decode.cpu_packed_head and not decode.compile
            packed = self._packed_head.applied(self.model.lm) if fast_head else contextlib.nullcontext()
            with packed:
                out = generate(self._stepper(decode), embeds, decode,
                               eos_id=self.tokenizer.eos_token_id, pad_id=pad_id(self.tokenizer))
        finally:
            self.model.train(was_training)
        return [[decode_ids(self.tokenizer, seq.tolist()) for seq in row] for row in out.tokens]

    def _stepper(self, decode: DecodeConfig):
        if not (decode.static_cache or decode.compile):
            return LMStepper(self.model.lm, use_cache=decode.use_cache)
        key = (decode.max_new_tokens, decode.compile)
        if key not in self._static_steppers:
            self._static_steppers[key] = StaticCacheStepper(self.model.lm, max_new_tokens=decode.max_new_tokens,
                                                            compile=decode.compile)
        return self._static_steppers[key]

    def caption_rows(self, features: dict[str, torch.Tensor], present: dict[str, torch.Tensor],
                     decode: DecodeConfig | None = None) -> list[list[str]]:
        """Captions for rows with different inputs: features {modality: (B, F)} with present {modality: (B,)
        bool}; rows are decoded in groups of the same inputs, so a row's caption never depends on its
        neighbours."""
        n = next(iter(features.values())).shape[0]
        groups: dict[tuple, list[int]] = {}
        for i in range(n):
            groups.setdefault(tuple(m for m in features if bool(present[m][i])), []).append(i)
        out: list[list[str]] = [[] for _ in range(n)]
        for kinds, rows in groups.items():
            index = torch.tensor(rows)
            for i, caps in zip(rows, self.caption_features({m: features[m][index] for m in kinds}, decode)):
                out[i] = caps
        return out

    def caption(self, images=None, *, audio=None, decode: DecodeConfig | None = None, batch_size: int = 32,
                **overrides):
        """Caption one input or a list: images (paths or PIL images), audio (paths or mono arrays at the
        encoder's rate), or both paired in order. Returns a string per input, or a list of strings per
        input when num_captions > 1. Decode options may be passed as keywords."""
        decode = dataclasses.replace(decode or DecodeConfig(), **overrides)
        single = _is_one(images, audio)
        columns = {m: ([v] if single else list(v)) for m, v in (("image", images), ("audio", audio)) if v is not None}
        self.model.check_modalities(list(columns))
        sizes = {m: len(v) for m, v in columns.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"images and audio are paired in order, so their counts must match: {sizes}")
        items = [dict(zip(columns, row)) for row in zip(*columns.values())]
        results = []
        for start in range(0, len(items), batch_size):
            results.extend(self.caption_features(self.encode_inputs(items[start:start + batch_size]), decode))
        results = [r[0] if decode.num_captions == 1 else r for r in results]
        return results[0] if single else results

    def iter_captions(self, items: Sequence[str | dict], *, decode: DecodeConfig | None = None, batch_size: int = 32,
                      max_pixels: int | None = MAX_PIXELS, num_workers: int = 0, jpeg_on_device: bool | None = None
                      ) -> Iterator[tuple[Any, list[str] | None, str | None]]:
        """Stream (item, captions, error) in input order over many inputs: image paths, or dicts
        {"image": path, "audio": path} with either or both. Files are read and preprocessed by
        `num_workers` DataLoader workers (0: in this process) while the model captions the previous
        batch. Unreadable files (and images over `max_pixels`) yield an error and the rest of the batch is
        still captioned. Memory does not grow with the number of inputs.

        jpeg_on_device: workers only read plain JPEG files and the batch is decoded and preprocessed on the
        captioner's device (nvjpeg on CUDA; see jpeg.py: pixels can differ from PIL's by a level or two).
        Default: on when the captioner runs on CUDA."""
        from torch.utils.data import DataLoader

        inputs = [{"image": it} if isinstance(it, (str, Path)) else it for it in items]
        if inputs:  # nothing to do is not an error (e.g. a resumed run that is already complete)
            self.model.check_modalities({m for it in inputs for m in it})
        encoders = self.model.encoders
        pipeline = self.jpeg_pipeline(jpeg_on_device)
        dataset = _InputFiles(inputs, image_preprocess=encoders["image"].preprocess if "image" in encoders else None,
                              audio_loader=encoders["audio"].loader() if "audio" in encoders else None,
                              max_pixels=max_pixels, jpegs=pipeline is not None)
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=list,
                            pin_memory=self.device.type == "cuda", prefetch_factor=4 if num_workers else None)
        for batch in loader:
            if pipeline is not None:
                batch = _decode_jpegs(batch, pipeline)
            groups: dict[tuple, list[int]] = {}
            for j, (_, tensors, error) in enumerate(batch):
                if error is None:
                    groups.setdefault(tuple(tensors), []).append(j)
            captions = {}
            for kinds, rows in groups.items():
                features = {m: self._encode_tensors(m, [batch[j][1][m] for j in rows]) for m in kinds}
                captions.update(zip(rows, self.caption_features(features, decode)))
            for j, (i, _, error) in enumerate(batch):
                yield items[i], captions.get(j), error

    def jpeg_pipeline(self, on_device: bool | None = None) -> JpegPipeline | None:
        """The device JPEG decoder for this captioner's image preprocessing (see jpeg.py), or None: when
        off (on_device None: on with CUDA), without an image encoder, or when the preprocessing has a step
        it does not mirror exactly."""
        if on_device is None:
            on_device = self.device.type == "cuda"
        if not on_device or "image" not in self.model.encoders:
            return None
        preprocess = TensorPreprocess.from_transform(self.model.encoders["image"].preprocess)
        if preprocess is None:
            logger.info("image preprocessing has steps the device JPEG path does not mirror: decoding with PIL")
            return None
        return JpegPipeline(preprocess, self.device)

    @torch.no_grad()
    def _encode_tensors(self, modality: str, inputs: list) -> torch.Tensor:
        """Features (B, F) of preprocessed inputs: image tensors (3, H, W), or audio input dicts."""
        encoder = self.model.encoders[modality]
        if modality == "image":  # (B, 3, H, W); images decoded on the device are there already
            return self.model.encode_images(torch.stack([x.to(self.device, non_blocking=True) for x in inputs]))
        return encoder({k: torch.stack([x[k] for x in inputs]) for k in inputs[0]})

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, examples: Sequence[CaptionExample], *, decode: DecodeConfig | None = None,
                 batch_size: int = 32, metrics: Sequence[str] = ("BLEU", "METEOR", "ROUGE_L", "CIDEr"),
                 clip_scorer=None, modalities: Sequence[str] | None = None, num_workers: int = 0) -> EvalResult:
        """Caption every example and score against its references (COCO caption metrics, SPIDEr when
        SPICE is computed, plus CLIPScore / RefCLIPScore for images when a `clipscore.CLIPScorer` is
        given; `metrics=()` only captions). `modalities` restricts which of an example's inputs are used (e.g. ["image"] to see what a
        two-modality captioner says from the image alone); default: every input the captioner takes.
        Unreadable inputs and examples with no usable input are left out of the scores and listed in
        `skipped`."""
        from captioner.scoring.metrics import CaptionScores, score_captions

        decode = decode or DecodeConfig()
        if modalities is not None:
            self.model.check_modalities(list(modalities))
        use = list(modalities) if modalities is not None else self.model.modalities
        by_input: dict[tuple, list[CaptionExample]] = {}
        skipped = []
        for ex in examples:
            inputs = tuple((m, p) for m, p in ex.inputs.items() if m in use)
            if inputs:
                by_input.setdefault(inputs, []).append(ex)
            else:
                skipped.append(f"{ex.image_id}: skipped: no {' or '.join(use)} input")
        predictions = {}
        items = [dict(k) for k in by_input]
        from tqdm.auto import tqdm

        with tqdm(total=len(items), unit="item", desc="captioning", disable=len(items) < 2 * batch_size) as bar:
            for item, captions, error in self.iter_captions(items, decode=decode, batch_size=batch_size,
                                                            num_workers=num_workers):
                bar.update(1)
                if error:
                    skipped.append(f"input skipped: {error}")
                    continue
                for ex in by_input[tuple(item.items())]:
                    predictions[ex.image_id] = captions[0]
        kept = [ex for ex in examples if ex.image_id in predictions]
        if not kept:
            raise ImageError("no input of the caption set could be used: " + "; ".join(skipped[:3]))
        if metrics:
            scores = score_captions(predictions, {ex.image_id: ex.captions for ex in kept}, metrics=metrics)
        else:  # captions only: the caller scores them its own way
            scores = CaptionScores(corpus={}, per_image={ex.image_id: {} for ex in kept}, coco_exact=False, skipped=[])
        corpus, per_image = dict(scores.corpus), {k: dict(v) for k, v in scores.per_image.items()}
        with_image = [ex for ex in kept if ex.image is not None]
        if clip_scorer is not None and with_image:
            sums: dict[str, float] = {}
            for start in range(0, len(with_image), batch_size):
                chunk = with_image[start:start + batch_size]
                out = clip_scorer.score([load_image(ex.image) for ex in chunk],
                                        [predictions[ex.image_id] for ex in chunk], [ex.captions for ex in chunk])
                for ex, row in zip(chunk, out["per_image"]):
                    per_image[ex.image_id].update(row)
                    for k, v in row.items():
                        sums[k] = sums.get(k, 0.0) + v
            corpus.update({k: v / len(with_image) for k, v in sums.items()})
        return EvalResult(corpus=corpus, per_image=per_image, predictions=predictions, examples=kept,
                          coco_exact=scores.coco_exact, skipped=[*scores.skipped, *skipped])
