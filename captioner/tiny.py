"""Tiny offline parts: a small open_clip ResNet tower, a small GPT-2 and a byte-level BPE tokenizer
trained on the fly (the tiny CLAP / Whisper audio configs are in audio.py). Used by the offline demo and the tests; nothing here touches the network.
"""

from __future__ import annotations

from typing import Iterable

from .config import ModelConfig

EOS = "<|endoftext|>"

# A scaled-down open_clip ModifiedResNet (the RN50 family). Random conv features keep colour, shape
# and position linearly decodable, which a frozen random ViT of this size does not.
TINY_CLIP = {"embed_dim": 128, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 32,
                                               "head_width": 32}}


def tiny_gpt2(vocab_size: int, *, width: int = 128, layers: int = 2, heads: int = 4, positions: int = 128
              ) -> dict:
    return {"model_type": "gpt2", "vocab_size": vocab_size, "n_embd": width, "n_layer": layers,
            "n_head": heads, "n_positions": positions, "bos_token_id": 0, "eos_token_id": 0}


def train_tokenizer(texts: Iterable[str], *, vocab_size: int = 400):
    """A GPT-2-style byte-level BPE tokenizer trained on `texts`; EOS (id 0) doubles as pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS)


def tiny_config(tokenizer, **overrides) -> ModelConfig:
    """ModelConfig of a tiny captioner (random CLIP tower, GPT-2 from scratch, fine-tuned); with
    modalities including "audio", a random tiny CLAP audio encoder (16 kHz, 2 s windows)."""
    from .audio import tiny_clap_config

    kw = dict(clip_config=TINY_CLIP, clip_pretrained=None, lm_config=tiny_gpt2(len(tokenizer)),
              finetune_lm=True, prefix_length=4, mapper_layers=2, mapper_heads=4, clip_length=4)
    if "audio" in overrides.get("modalities", ()) and "audio_config" not in overrides:
        kw["audio_config"] = tiny_clap_config()
    kw.update(overrides)
    return ModelConfig(**kw)
