"""Tiny offline parts: a small open_clip ResNet tower, a small GPT-2 and a byte-level BPE tokenizer
trained on the fly and tiny CLAP / Whisper audio configs. Used by the offline demo and the tests; nothing here touches the network.
"""

from __future__ import annotations

from typing import Iterable

from captioner.config import ModelConfig

EOS = "<|endoftext|>"

# A scaled-down open_clip ModifiedResNet (the RN50 family). Random conv features keep colour, shape
# and position linearly decodable, which a frozen random ViT of this size does not.
TINY_CLIP = {"embed_dim": 128, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 32,
                                               "head_width": 32}}


# The demo's working recipe, the one definition behind `run_demo` and `captioner train --preset tiny`:
# TrainConfig fields, and ModelConfig fields (the LM's vocabulary is sized to the tokenizer by
# `tiny_model_fields`). Measured on the shapes set: lr 2e-3 with 30 warm-up steps learns in 12 epochs.
TINY_TRAIN = {"batch_size": 64, "lr": 2e-3, "warmup_steps": 30, "weight_decay": 0.0}
TINY_TOKENIZER_VOCAB = 400


def tiny_gpt2(vocab_size: int, *, width: int = 128, layers: int = 2, heads: int = 4, positions: int = 128
              ) -> dict:
    return {"model_type": "gpt2", "vocab_size": vocab_size, "n_embd": width, "n_layer": layers,
            "n_head": heads, "n_positions": positions, "bos_token_id": 0, "eos_token_id": 0}


def train_tokenizer(texts: Iterable[str], *, vocab_size: int = TINY_TOKENIZER_VOCAB):
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


def tiny_model_fields(vocab_size: int | None = None) -> dict:
    """ModelConfig fields of a tiny captioner (random CLIP tower, GPT-2 from scratch, fine-tuned); without
    `vocab_size` the LM config is left out (it is sized to the tokenizer once that exists)."""
    kw = dict(clip_config=TINY_CLIP, clip_pretrained=None, finetune_lm=True, prefix_length=4, mapper_layers=2,
              mapper_heads=4, clip_length=4)
    return kw if vocab_size is None else {**kw, "lm_config": tiny_gpt2(vocab_size)}


def tiny_config(tokenizer, **overrides) -> ModelConfig:
    """ModelConfig of a tiny captioner (`tiny_model_fields` sized to `tokenizer`); with modalities
    including "audio", a random tiny CLAP audio encoder (16 kHz, 2 s windows)."""

    kw = tiny_model_fields(len(tokenizer))
    if "audio" in overrides.get("modalities", ()) and "audio_config" not in overrides:
        kw["audio_config"] = tiny_clap_config()
    kw.update(overrides)
    return ModelConfig(**kw)


def tiny_clap_config() -> dict:
    """A small random-init CLAP config (inline-config format of `build_audio_encoder`): 16 mel bins, 16 kHz,
    2 s windows, 32-d features. HTSAT constraints met: freq_ratio = spec_size // num_mel_bins = 4; the
    201 mel frames fit spec_size * freq_ratio = 256; 64 // patch_stride 4 = 16x16 patches, two stages
    (16 -> 8) with window 4; hidden_size = patch_embeds_hidden_size * 2 ** (stages - 1) = 32."""
    return {
        "audio_config": {
            "num_mel_bins": 16, "spec_size": 64, "window_size": 4, "patch_size": 4, "patch_stride": [4, 4],
            "patch_embeds_hidden_size": 16, "hidden_size": 32, "depths": [1, 1], "num_attention_heads": [2, 2],
            "num_hidden_layers": 2, "hidden_dropout_prob": 0.0,
        },
        "text_config": {
            "vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
            "intermediate_size": 32, "max_position_embeddings": 32,
        },
        "projection_dim": 32,
        "feature_extractor": {
            "feature_size": 16, "sampling_rate": 16000, "hop_length": 160, "max_length_s": 2,
            "fft_window_size": 400, "frequency_min": 50, "frequency_max": 8000,
            "truncation": "rand_trunc", "padding": "repeatpad",
        },
    }


def tiny_whisper_config() -> dict:
    """A small random-init Whisper config: 16 mel bins, 16 kHz, 2 s windows (200 mel frames ->
    max_source_positions 100 encoder frames), d_model 32, one encoder and one decoder layer."""
    return {
        "num_mel_bins": 16, "d_model": 32, "encoder_layers": 1, "encoder_attention_heads": 2,
        "encoder_ffn_dim": 64, "decoder_layers": 1, "decoder_attention_heads": 2, "decoder_ffn_dim": 64,
        "vocab_size": 64, "max_source_positions": 100, "max_target_positions": 16,
        "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 1,
        "feature_extractor": {"feature_size": 16, "sampling_rate": 16000, "hop_length": 160, "chunk_length": 2,
                              "n_fft": 400},
    }
