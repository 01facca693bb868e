"""Named training recipes (`captioner train --preset NAME`) and tokenizers trained on a caption set.

A preset is a set of TrainConfig and ModelConfig values applied under a config file and flags, so
anything given explicitly wins. `tiny` is the offline demo's recipe (demo/tiny.py, the one
definition): a random tiny CLIP tower, a tiny GPT-2 from scratch sized to a byte-level BPE tokenizer
trained on the training captions (or the one given as `tokenizer`), fine-tuned, with the demo's
learning rate, warm-up and prefix. Nothing here touches the network.
"""

from __future__ import annotations

import dataclasses
import logging

from captioner.config import ConfigError, TrainConfig

logger = logging.getLogger(__name__)

PRESETS = {"tiny": "the offline demo's recipe: random tiny CLIP tower, tiny GPT-2 sized to a tokenizer trained "
                   "on the training captions, fine-tuned"}


def preset_fields(name: str) -> tuple[dict, dict]:
    """(TrainConfig fields, ModelConfig fields) of a preset; the LM config is sized later (`apply_preset`)."""
    from captioner.demo.tiny import TINY_TRAIN, tiny_model_fields

    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return dict(TINY_TRAIN), tiny_model_fields()


def caption_set_tokenizer(data: str, split: str = "train", *, vocab_size: int | None = None, **read_kw):
    """A byte-level BPE tokenizer trained on the captions of one split of a caption set (`read_kw`: the
    column and folder arguments of `load_caption_set`)."""
    from captioner.data import load_caption_set
    from captioner.demo.tiny import TINY_TOKENIZER_VOCAB, train_tokenizer

    examples, _ = load_caption_set(data, split, **read_kw)
    captions = [c for ex in examples for c in ex.captions]
    if not captions:
        raise ConfigError(f"{data} ({split}): no captions to train a tokenizer on")
    tok = train_tokenizer(captions, vocab_size=vocab_size or TINY_TOKENIZER_VOCAB)
    logger.info("tokenizer trained on %d captions of %s (%s): %d tokens", len(captions), data, split, len(tok))
    return tok


def apply_preset(config: TrainConfig) -> tuple[TrainConfig, object]:
    """(config, tokenizer) for a preset run: the tokenizer named by config.model.tokenizer, else one trained
    on the training captions; an LM config not given explicitly is the tiny GPT-2 sized to it."""
    from captioner.demo.tiny import tiny_gpt2
    from captioner.model.encoders import build_tokenizer

    model = config.model
    if model.tokenizer:
        tok = build_tokenizer(model)
    else:
        tok = caption_set_tokenizer(config.data, config.train_split, strict=config.strict,
                                    image_root=config.image_root, image_column=config.image_column,
                                    caption_column=config.caption_column, audio_root=config.audio_root,
                                    audio_column=config.audio_column, allow_outside_paths=config.allow_outside_paths)
    if model.lm_config is None:
        model = dataclasses.replace(model, lm_config=tiny_gpt2(len(tok)))
    return dataclasses.replace(config, model=model), tok
