"""The Python API: `Captioner` = CaptionModel + tokenizer, reading inputs through the one loader
(inputs/loader.py: paths, bytes, PIL images, arrays; images and sounds).

    cap = Captioner.from_pretrained("runs/demo/model")
    cap.caption(["a.jpg", "b.png"])                       # -> ["a red circle ...", ...]
    cap.caption("a.jpg", decode=DecodeConfig(strategy="sample", num_captions=3, seed=0))
    cap.caption("frame.jpg", audio="frame.wav")           # a captioner trained on image + audio
    cap.iter_captions(paths_or_dicts)                     # streaming, errors per item (caption() wraps it)
    Captioner.from_pretrained(path, quantize="int8")      # CPU: int8 LM and mapper (model/quantize.py)
    cap.caption("a.jpg", rerank="clip")                   # beams reranked by CLIPScore (decoding/rerank.py)
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from captioner.model import checkpoint
from captioner.config import DecodeConfig, ModelConfig
from captioner.data import CaptionExample
from captioner.decoding.fast import PackedHead, StaticCacheStepper
from captioner.decoding.search import LMStepper, generate
from captioner.model.encoders import build_tokenizer
from captioner.inputs.image import MAX_PIXELS, ImageError, load_image
from captioner.inputs.jpeg import JpegPipeline, TensorPreprocess
from captioner.inputs.loader import (InputDataset, InputReader, as_item, group_rows, is_single, load_batches,
                                     stack_inputs)
from captioner.errors import ConfigError
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


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Captioner:
    def __init__(self, model: CaptionModel, tokenizer, *, device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None, quantize: str | None = None):
        """dtype: run every part in this precision ("bfloat16" halves memory and is much faster on recent
        GPUs; logits are scored in float32). Default: as built (float32). quantize: "int8" quantizes the LM's
        and mappers' linear layers (model/quantize.py; CPU only, the default device then)."""
        from captioner.model.quantize import check_quantize, quantize_int8

        self.model, self.tokenizer = model, tokenizer
        self.device = torch.device(device) if device is not None else (
            torch.device("cpu") if quantize else default_device())
        check_quantize(quantize, self.device)
        self.model.to(self.device)
        if dtype is not None:
            self.model.to(DTYPES[dtype] if isinstance(dtype, str) else dtype)
        if quantize:
            quantize_int8(self.model)  # marks model.quantized
        # decoding/rerank.py: what DecodeConfig.rerank scores with (a CandidateScorer or a CLIPScorer);
        # None: the captioner's own CLIP, built on first use when it has a pretrained text tower.
        self.rerank_scorer = None
        self._static_steppers: dict[tuple, StaticCacheStepper] = {}  # kept: they hold caches and compiled steps
        self._packed_head = PackedHead()  # kept: holds the packed copy of the LM head's weight

    # ------------------------------------------------------------------ construction

    @property
    def quantize(self) -> str | None:
        """"int8" when the model's layers are quantized (model/quantize.py), else None."""
        return getattr(self.model, "quantized", None)

    @classmethod
    def from_config(cls, config: ModelConfig, *, tokenizer=None, device=None, dtype=None, quantize=None
                    ) -> "Captioner":
        """A new (untrained mapper) captioner; pretrained parts are fetched by name."""
        tokenizer = tokenizer if tokenizer is not None else build_tokenizer(config)
        model = CaptionModel.from_config(config, prompt_ids=encode_prompt(tokenizer, config.prompt))
        return cls(model.eval(), tokenizer, device=device, dtype=dtype, quantize=quantize)

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, device=None, dtype=None, quantize=None) -> "Captioner":
        """Rebuild a captioner saved with `save_pretrained` (strict: mismatches raise CheckpointError).
        `directory` may also be a known name ("clipcap-coco", "clipcap-conceptual": ClipCap's released
        weights, downloaded and converted once) or a Hub id "user/repo[@revision]" (see hub.resolve_model);
        a local directory of the same spelling wins."""
        from captioner.hub import resolve_model

        directory = resolve_model(directory)
        config, _ = checkpoint.read_config(directory)
        tokenizer = build_tokenizer(config, directory)
        model = CaptionModel.from_config(config, prompt_ids=encode_prompt(tokenizer, config.prompt),
                                         load_weights=False)
        checkpoint.load_weights(model, directory)
        model.eval()
        return cls(model, tokenizer, device=device, dtype=dtype, quantize=quantize)

    @classmethod
    def from_clipcap(cls, path: str | Path, output_dir: str | Path | None = None, *, device=None, dtype=None,
                     **kwargs) -> "Captioner":
        """Convert a ClipCap .pt (model/clipcap.py; kwargs go to convert_clipcap) into output_dir, or a
        temporary directory, and load it."""
        import tempfile

        from captioner.model.clipcap import convert_clipcap

        if output_dir is not None:
            return cls.from_pretrained(convert_clipcap(path, output_dir, **kwargs), device=device, dtype=dtype)
        with tempfile.TemporaryDirectory(prefix="clipcap-") as tmp:
            return cls.from_pretrained(convert_clipcap(path, tmp, **kwargs), device=device, dtype=dtype)

    def save_pretrained(self, directory: str | Path, **extra) -> Path:
        if self.quantize:
            raise ConfigError(f"a {self.quantize}-quantized captioner is not saved: save the float32 one and "
                              "quantize it when loading")
        return checkpoint.save_pretrained(self.model, self.tokenizer, directory, extra=extra or None)

    def push_to_hub(self, repo_id: str, *, private: bool = False, revision: str | None = None, scores=None,
                    train_config=None, token: str | None = None, commit_message: str | None = None) -> str:
        """Save this captioner and upload it with a model card to Hub repo `repo_id` (branch `revision`);
        scores: a scores.json of `captioner eval` (path or dict) whose corpus scores go in the card. Returns the
        commit URL (see hub.push_to_hub)."""
        import tempfile

        from captioner.hub import push_to_hub

        with tempfile.TemporaryDirectory() as tmp:  # saved one level down: no stray run files found beside it
            model_dir = self.save_pretrained(Path(tmp) / "captioner")
            return push_to_hub(model_dir, repo_id, private=private, revision=revision, scores=scores,
                               train_config=train_config, token=token, commit_message=commit_message)

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    # ------------------------------------------------------------------ captioning

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return torch.stack([self.model.image_encoder.preprocess(im) for im in images])  # (B, 3, H, W)

    @torch.no_grad()
    def encode(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.model.encode_images(self.preprocess(images).to(self.device))  # (B, F)

    def encode_audio(self, clips: Sequence[str | Path | np.ndarray]) -> torch.Tensor:
        """Audio features (B, F) for files or mono float arrays already at the encoder's sample rate."""
        return self.encode_inputs([{"audio": c} for c in clips])["audio"]

    def encode_inputs(self, items: Sequence[dict], *, batch_size: int = 32, max_pixels: int | None = MAX_PIXELS
                      ) -> dict[str, torch.Tensor]:
        """Features per modality for items that all have the same inputs, e.g. [{"image": "a.jpg",
        "audio": "a.wav"}, ...] (inputs as `inputs/loader.py` takes them); raises the first unreadable
        input's InputError."""
        items = [as_item(it) for it in items]
        kinds = {frozenset(it) for it in items}
        if len(kinds) > 1:
            raise ValueError(f"encode_inputs needs items with the same inputs, got {sorted(map(sorted, kinds))}")
        self.model.check_modalities(next(iter(kinds), ()))
        out: dict[str, list[torch.Tensor]] = {}
        dataset = InputDataset(items, self.input_reader(max_pixels=max_pixels))
        for batch, groups in self.feature_batches(dataset, batch_size=batch_size):
            for _, _, error in batch:
                if error is not None:
                    raise error
            for _, features in groups:
                for m, f in features.items():
                    out.setdefault(m, []).append(f)
        return {m: torch.cat(f) for m, f in out.items()}

    def input_reader(self, *, max_pixels: int | None = MAX_PIXELS, jpegs: bool = False) -> InputReader:
        """This captioner's input reader (picklable, for loader workers): items -> model inputs."""
        encoders = self.model.encoders
        return InputReader(image_preprocess=encoders["image"].preprocess if "image" in encoders else None,
                           audio_loader=encoders["audio"].loader() if "audio" in encoders else None,
                           max_pixels=max_pixels, jpegs=jpegs)

    @torch.no_grad()
    def feature_batches(self, dataset: Dataset, *, batch_size: int, num_workers: int | None = 0,
                        pipeline: JpegPipeline | None = None) -> Iterator[tuple[list, list[tuple[list[int], dict]]]]:
        """(batch, groups) for each loader batch of `dataset` (an `InputDataset` or `InputStream`): the batch's
        rows (key, inputs | None, error | None), and per group of rows with the same inputs (their positions
        in the batch, {modality: features (b, F)})."""
        for batch in load_batches(dataset, batch_size=batch_size, num_workers=num_workers, pipeline=pipeline,
                                  pin_memory=self.device.type == "cuda"):
            groups = [(rows, {m: self._encode_tensors(m, [batch[j][1][m] for j in rows]) for m in kinds})
                      for kinds, rows in group_rows(batch).items()]
            yield batch, groups

    @torch.no_grad()
    def caption_features(self, features: dict[str, torch.Tensor] | torch.Tensor, decode: DecodeConfig | None = None,
                         images: Sequence[Image.Image] | None = None) -> list[list[str]]:
        """Captions for features {modality: (B, F)} (every row has every given modality; a bare (B, F)
        tensor is the model's only modality): a list of num_captions strings per row. images: the rows'
        images (PIL), which reranking (decode.rerank) scores the candidates against."""
        decode, wanted = decode or DecodeConfig(), None
        if decode.rerank:
            from captioner.decoding import rerank

            if images is None:
                raise ConfigError("reranking scores the candidates against their images: caption images, not "
                                  "bare features")
            wanted, decode, scorer = decode, rerank.candidate_decode(decode), self.reranker()  # refused before decoding
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
                               eos_id=self.tokenizer.eos_token_id, pad_id=pad_id(self.tokenizer),
                               stop_ids=self.config.stop_tokens)
        finally:
            self.model.train(was_training)
        stops = self.config.stop_tokens
        texts = [[decode_ids(self.tokenizer, seq.tolist(), stops) for seq in row] for row in out.tokens]
        if wanted is None:
            return texts
        lm = rerank.lm_scores(out.tokens, out.scores, strategy=decode.strategy, length_penalty=decode.length_penalty,
                              end_ids=[self.tokenizer.eos_token_id, *stops])
        return rerank.rerank(texts, lm, scorer.candidate_scores(images, texts), weight=wanted.rerank_weight,
                             keep=wanted.num_captions)

    def reranker(self):
        """The scorer of reranking (decoding/rerank.py): `rerank_scorer`, or the captioner's own CLIP."""
        from captioner.decoding.rerank import as_candidate_scorer

        if self.rerank_scorer is None:
            from captioner.scoring.evaluate import clip_scorer_for

            scorer, _ = clip_scorer_for(self)
            if scorer is None:
                raise ConfigError("reranking with CLIP needs a CLIP text tower: this captioner's image encoder has "
                                  "no pretrained one; give a CLIPScore model (Captioner.rerank_scorer)")
            self.rerank_scorer = scorer
        return as_candidate_scorer(self.rerank_scorer)

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
                max_pixels: int | None = MAX_PIXELS, jpeg_on_device: bool | None = None, **overrides):
        """Caption one input or a list: images (paths, bytes, PIL images or arrays), audio (paths, bytes or
        mono arrays at the encoder's rate), or both paired in order. Returns a string per input, or a list of
        strings per input when num_captions > 1. Decode options may be passed as keywords. The same path as
        `iter_captions`; an unreadable input raises its InputError, with the message iter_captions gives."""
        decode = dataclasses.replace(decode or DecodeConfig(), **overrides)
        single = is_single(images) if images is not None else is_single(audio)
        columns = {m: ([v] if single else list(v)) for m, v in (("image", images), ("audio", audio)) if v is not None}
        self.model.check_modalities(list(columns))
        sizes = {m: len(v) for m, v in columns.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"images and audio are paired in order, so their counts must match: {sizes}")
        items = [dict(zip(columns, row)) for row in zip(*columns.values())]
        results = []
        for _, captions, error in self._captions(items, decode=decode, batch_size=batch_size, max_pixels=max_pixels,
                                                 num_workers=0, jpeg_on_device=jpeg_on_device):
            if error is not None:
                raise error
            results.append(captions[0] if decode.num_captions == 1 else captions)
        return results[0] if single else results

    def iter_captions(self, items: Sequence[str | dict], *, decode: DecodeConfig | None = None, batch_size: int = 32,
                      max_pixels: int | None = MAX_PIXELS, num_workers: int | None = None,
                      jpeg_on_device: bool | None = None) -> Iterator[tuple[Any, list[str] | None, str | None]]:
        """Stream (item, captions, error) in input order over many inputs: images (paths, bytes, PIL images,
        arrays), or dicts {"image": ..., "audio": ...} with either or both. Inputs are read and preprocessed
        by `num_workers` DataLoader workers (0: in this process; None: from the CPUs this process may use,
        `loader.default_workers`) while the model captions the previous batch. Unreadable inputs (and images over `max_pixels`) yield an error and the rest of the batch is
        still captioned. Memory does not grow with the number of inputs.

        jpeg_on_device: workers only read plain JPEG files and the batch is decoded and preprocessed on the
        captioner's device (nvjpeg on CUDA; see jpeg.py: pixels can differ from PIL's by a level or two).
        Default: on when the captioner runs on CUDA."""
        for i, captions, error in self._captions(items, decode=decode, batch_size=batch_size, max_pixels=max_pixels,
                                                 num_workers=num_workers, jpeg_on_device=jpeg_on_device):
            yield items[i], captions, None if error is None else str(error)

    def _captions(self, items, *, decode, batch_size, max_pixels, num_workers, jpeg_on_device):
        """(index, captions | None, InputError | None) per item, in order: the one captioning path."""
        inputs = [as_item(it) for it in items]
        if inputs:  # nothing to do is not an error (e.g. a resumed run that is already complete)
            self.model.check_modalities({m for it in inputs for m in it})
        pipeline = self.jpeg_pipeline(jpeg_on_device)
        dataset = InputDataset(inputs, self.input_reader(max_pixels=max_pixels, jpegs=pipeline is not None))
        for batch, groups in self.feature_batches(dataset, batch_size=batch_size, num_workers=num_workers,
                                                  pipeline=pipeline):
            captions = self.caption_groups(groups, decode,
                                           lambda j: self._pil(inputs[batch[j][0]]["image"], max_pixels))
            for j, (i, _, error) in enumerate(batch):
                yield i, captions.get(j), error

    def caption_groups(self, groups, decode: DecodeConfig | None, image_of=None) -> dict[int, list[str]]:
        """Captions of one batch from `feature_batches`: {row: captions} over its (rows, features) groups.
        With reranking, `image_of(row)` gives the PIL image the candidates are scored against; a group
        without images keeps the LM's own order."""
        captions = {}
        for rows, features in groups:
            images, how = None, decode
            if decode is not None and decode.rerank:  # candidates are scored against the images as given
                if "image" not in features:  # nothing to score against: the LM's own order
                    how = dataclasses.replace(decode, rerank=None)
                else:
                    images = [image_of(j) for j in rows]
            captions.update(zip(rows, self.caption_features(features, how, images)))
        return captions

    @staticmethod
    def _pil(value, max_pixels) -> Image.Image:
        """An image input (path, bytes, PIL image, array) as a PIL image, read as the loader reads it."""
        return InputReader(image_preprocess=lambda im: im, max_pixels=max_pixels).image(value, "image")

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
        if modality == "image":  # (B, 3, H, W); images decoded on the device are there already
            return self.model.encode_images(stack_inputs("image", inputs, self.device))
        return self.model.encoders[modality](stack_inputs(modality, inputs))

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, examples: Sequence[CaptionExample], *, decode: DecodeConfig | None = None,
                 batch_size: int = 32, metrics: Sequence[str] = ("BLEU", "METEOR", "ROUGE_L", "CIDEr"),
                 clip_scorer=None, modalities: Sequence[str] | None = None, num_workers: int | None = None
                 ) -> EvalResult:
        """Caption every example and score against its references (COCO caption metrics, SPIDEr when
        SPICE is computed, plus CLIPScore / RefCLIPScore for images when a `clipscore.CLIPScorer` is
        given; `metrics=()` only captions). `modalities` restricts which of an example's inputs are used (e.g. ["image"] to see what a
        two-modality captioner says from the image alone); default: every input the captioner takes.
        Unreadable inputs and examples with no usable input are left out of the scores and listed in
        `skipped`. num_workers: as in `iter_captions` (None: from the CPUs this process may use)."""
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
