"""CLIPScore and RefCLIPScore (Hessel et al., EMNLP 2021) with an open_clip model.

`CLIPScorer` scores candidate captions against their images (and, optionally, reference captions)
with a full open_clip CLIP model (image *and* text towers). Its constructor only receives modules;
`CLIPScorer.from_open_clip` is the edge where an open_clip model name / pretrained tag / local
checkpoint / inline architecture dict becomes a model, failing with `encoders.ModelLoadError`.

Definitions, as in the paper and the reference implementation (github.com/jmhessel/clipscore):

* ``CLIP-S(c, v) = w * max(cos(E_img(v), E_txt(prompt + c)), 0)`` with ``w = 2.5`` and
  ``prompt = "A photo depicts "``; embeddings are L2-normalised.
* ``RefCLIP-S(c, R, v) = H-Mean(CLIP-S(c, v), max(max_{r in R} cos(E_txt(prompt + c), E_txt(r')), 0))``
  with ``H-Mean(a, b) = 2ab / (a + b)``, taken as 0 when either term is 0 (no 0/0 NaN).
* Corpus scores are means over images of the per-image scores (the corpus RefCLIPScore is the mean
  of per-image harmonic means, as the reference implementation reports it).

Conventions worth knowing:

* References are encoded *with* the same prompt as the candidate (``r' = prompt + r``): the
  reference implementation runs both through the same ``extract_all_captions`` (whose dataset adds
  ``"A photo depicts "``). ``prompt_references=False`` encodes references verbatim instead.
* The paper clips the text-text term at 0; the reference code does not (a negative maximum there
  would make the harmonic mean meaningless), so here it is clipped, as the paper defines it.
* A prompt that does not end in whitespace gets a space appended, as the reference code does.
* The reference numbers were computed with ViT-B/32 (OpenAI) in float16 on GPU; float32 on CPU gives
  slightly different values.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Sequence
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from captioner.config import ConfigError, load_json
from captioner.model.encoders import ModelLoadError, create_open_clip

logger = logging.getLogger(__name__)

DEFAULT_WEIGHT = 2.5
DEFAULT_PROMPT = "A photo depicts "

SCORER_OFFLINE_HINT = (
    "Offline, pass a local open_clip checkpoint file as pretrained (clip_score_pretrained) with a built-in "
    "model name or an inline clip_config, or load the model once on a machine with internet so it is in "
    "the Hugging Face cache."
)


class CLIPScorer:
    """CLIPScore / RefCLIPScore with an open_clip CLIP model.

    model: has ``encode_image((B, 3, H, W)) -> (B, D)`` and ``encode_text((B, L) long) -> (B, D)``;
    preprocess: PIL.Image -> (3, H, W) float tensor; tokenizer: list[str] -> (N, L) LongTensor.
    The model is moved to `device` and run in eval mode without gradients.
    """

    def __init__(self, *, model: nn.Module, preprocess: Callable, tokenizer: Callable, device="cpu",
                 batch_size: int = 64, weight: float = DEFAULT_WEIGHT, prompt: str = DEFAULT_PROMPT,
                 prompt_references: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self.weight = float(weight)
        self.prompt = prompt + " " if prompt and not prompt[-1].isspace() else prompt
        self.prompt_references = prompt_references
        # Inputs follow the model's floating dtype (an fp16 open_clip model needs fp16 pixels).
        self._dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_open_clip(cls, model_name: str, pretrained: str | None, *, clip_config: dict | None = None,
                       device="cpu", **kw) -> "CLIPScorer":
        """Build the full open_clip model (both towers), its eval transform and tokenizer.

        model_name: a built-in open_clip architecture ("ViT-B-32"), an "hf-hub:org/repo" id, or a
        path to a JSON architecture file; pretrained: a tag ("openai") or a local checkpoint file
        (None: random weights, meaningless scores). clip_config: an inline open_clip architecture dict
        ({"embed_dim", "vision_cfg", "text_cfg", optional "quick_gelu", "custom_text",
        "preprocess_cfg"}); model_name is then only a label, and pretrained must be a local file.
        Other keyword arguments go to the constructor (batch_size, weight, prompt, ...).
        """
        if clip_config is None and str(model_name).endswith(".json"):
            clip_config = load_json(model_name)
        if clip_config is not None:
            model, preprocess, tokenizer = _build_inline(model_name, clip_config, pretrained)
        else:
            model, preprocess, tokenizer = _build_named(model_name, pretrained)
        if not pretrained:
            logger.warning("CLIPScorer %r has random weights (no pretrained given): its scores are meaningless",
                           model_name)
        return cls(model=model, preprocess=preprocess, tokenizer=tokenizer, device=device, **kw)

    # ------------------------------------------------------------------ embeddings

    @torch.no_grad()
    def image_embeddings(self, images: Sequence) -> torch.Tensor:
        """L2-normalised image embeddings (N, D), float32 on the CPU, computed in batches."""
        self.model.eval()
        out = []
        for start in range(0, len(images), self.batch_size):
            pixels = torch.stack([self.preprocess(im) for im in images[start:start + self.batch_size]])  # (B, 3, H, W)
            feats = self.model.encode_image(pixels.to(self.device, self._dtype))  # (B, D)
            out.append(F.normalize(feats.float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.empty(0, 0)

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings (N, D) of `texts` as given (no prompt added), float32 on the
        CPU, computed in batches."""
        self.model.eval()
        out = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(list(texts[start:start + self.batch_size]))  # (B, L)
            feats = self.model.encode_text(tokens.to(self.device))  # (B, D)
            out.append(F.normalize(feats.float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.empty(0, 0)

    # ------------------------------------------------------------------ scores

    def score(self, images: Sequence, candidates: Sequence[str],
              references: Sequence[Sequence[str]] | None = None) -> dict:
        """CLIPScore (and RefCLIPScore when references are given) of one candidate per image.

        Returns {"corpus": {"CLIPScore": float, "RefCLIPScore": float}, "per_image": [{...}, ...]},
        RefCLIPScore only with references; per_image follows the order of `images`.
        """
        if isinstance(candidates, str):
            raise TypeError("candidates must be a sequence of captions, one per image, not a string")
        if len(images) != len(candidates):
            raise ValueError(f"{len(images)} images but {len(candidates)} candidate captions; need one per image")
        if not images:
            raise ValueError("no images to score")
        if references is not None:
            if len(references) != len(images):
                raise ValueError(f"{len(images)} images but {len(references)} reference lists; need one per image")
            for i, refs in enumerate(references):
                if isinstance(refs, str) or not refs:
                    raise ValueError(f"references[{i}] must be a non-empty list of captions, got {refs!r}")

        cand_texts = [self.prompt + c for c in candidates]
        ref_prompt = self.prompt if self.prompt_references else ""
        ref_texts = [[ref_prompt + r for r in refs] for refs in references] if references is not None else []
        # Every distinct text (candidates and references together) is encoded once.
        index: dict[str, int] = {}
        for t in [*cand_texts, *(t for refs in ref_texts for t in refs)]:
            index.setdefault(t, len(index))
        text_emb = self.text_embeddings(list(index))  # (T, D)
        image_emb = self.image_embeddings(images)  # (N, D)
        if image_emb.shape[-1] != text_emb.shape[-1]:
            raise ValueError(f"image embeddings have {image_emb.shape[-1]} dims but text embeddings "
                             f"{text_emb.shape[-1]}; the model's towers do not share an embedding space")

        cand_emb = text_emb[[index[t] for t in cand_texts]]  # (N, D)
        clip_s = self.weight * (image_emb * cand_emb).sum(-1).clamp(min=0)  # (N,)
        per_image = [{"CLIPScore": float(s)} for s in clip_s]
        corpus = {"CLIPScore": float(clip_s.mean())}
        if references is not None:
            text_sim = torch.stack([
                (text_emb[[index[t] for t in refs]] @ cand_emb[i]).max()  # (R,) -> ()
                for i, refs in enumerate(ref_texts)
            ]).clamp(min=0)  # (N,)
            denom = clip_s + text_sim
            ref_s = torch.where(denom > 0, 2 * clip_s * text_sim / denom.clamp(min=1e-12),
                                torch.zeros_like(denom))  # (N,)
            for row, s in zip(per_image, ref_s):
                row["RefCLIPScore"] = float(s)
            corpus["RefCLIPScore"] = float(ref_s.mean())
        return {"corpus": corpus, "per_image": per_image}


# ---------------------------------------------------------------------- builders


def _build_named(model_name: str, pretrained: str | None):
    """A built-in (or hf-hub:) open_clip model with its eval transform and tokenizer."""
    import open_clip

    is_hub_id = model_name.startswith("hf-hub:")
    cfg = None if is_hub_id else open_clip.get_model_config(model_name.replace("/", "-"))
    if cfg is None and not is_hub_id:
        examples = ", ".join(sorted(open_clip.list_models())[:8])
        raise ModelLoadError(
            f"unknown open_clip model {model_name!r}: not a built-in architecture (e.g. {examples}, ...; "
            f"see open_clip.list_models()), an 'hf-hub:' id or a .json architecture file"
        )
    text_cfg = (cfg or {}).get("text_cfg", {})
    needs_hub = (is_hub_id or (bool(pretrained) and not os.path.exists(pretrained))
                 or "hf_model_name" in text_cfg or "hf_tokenizer_name" in text_cfg)
    model, preprocess = create_open_clip(model_name, pretrained, needs_hub=needs_hub, hint=SCORER_OFFLINE_HINT,
                                         purpose=" for CLIPScore")
    tokenizer = open_clip.get_tokenizer(model_name)
    return model, preprocess, tokenizer


def _build_inline(label: str, clip_config: dict, pretrained: str | None):
    """A CLIP model from an inline open_clip architecture dict; no hub access."""
    import open_clip
    from open_clip.model import CLIP, CustomTextCLIP
    from open_clip.tokenizer import SimpleTokenizer

    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in clip_config]
    if missing:
        raise ConfigError(f"clip_config for CLIPScore needs {missing} (open_clip model config format; "
                          "the text tower is needed too)")
    cfg = copy.deepcopy(dict(clip_config))
    pre = cfg.pop("preprocess_cfg", None) or {}
    custom_text = cfg.pop("custom_text", False)
    text_cfg = cfg["text_cfg"]
    if "hf_model_name" in text_cfg or "hf_tokenizer_name" in text_cfg or "multimodal_cfg" in cfg:
        raise ConfigError("clip_config for CLIPScore must use open_clip's own text transformer and tokenizer "
                          "(no hf_model_name / hf_tokenizer_name / multimodal_cfg); use a model name instead")
    try:
        model = (CustomTextCLIP if custom_text else CLIP)(**cfg)
    except (TypeError, ValueError, KeyError, AssertionError, RuntimeError) as e:
        raise ConfigError(f"clip_config {label!r} is not a valid open_clip CLIP config: {type(e).__name__}: {e}") from None

    if pretrained:
        if not os.path.isfile(pretrained):
            raise ModelLoadError(f"pretrained {pretrained!r} is not a file; with clip_config it must be a local "
                                 f"open_clip checkpoint. {SCORER_OFFLINE_HINT}")
        try:
            open_clip.load_checkpoint(model, pretrained, strict=True)
        except Exception as e:
            raise ModelLoadError(f"could not load checkpoint {pretrained!r} into clip_config {label!r}: "
                                 f"{type(e).__name__}: {e}") from None

    tokenizer = SimpleTokenizer(context_length=text_cfg.get("context_length", 77),
                                **text_cfg.get("tokenizer_kwargs", {}))  # BPE vocab ships with open_clip
    vocab_size = text_cfg.get("vocab_size", 49408)
    if vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"clip_config text_cfg.vocab_size is {vocab_size} but open_clip's tokenizer has "
                          f"{tokenizer.vocab_size} tokens; token ids would be out of range")
    image_size = cfg["vision_cfg"].get("image_size", 224)
    preprocess = open_clip.image_transform(
        image_size, is_train=False, mean=pre.get("mean"), std=pre.get("std"),
        resize_mode=pre.get("resize_mode"), interpolation=pre.get("interpolation"),
    )
    return model, preprocess, tokenizer
