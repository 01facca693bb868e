"""The captioning model: frozen encoders (image: open_clip; audio: CLAP/Whisper) -> one mapper per
modality -> prefix -> causal LM; caption tokenisation; save/load of captioner directories.

encoders.py (image tower, LM, tokenizer), audio_encoder.py, mapping.py, model.py (CaptionModel),
tokens.py, checkpoint.py, quantize.py (int8 CPU path). Constructors do no I/O; hub names are resolved in encoders.py via captioner.hub.
"""
