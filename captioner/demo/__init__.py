"""Offline demos and tiny parts: generated datasets (shapes.py: images; sounds.py: sounds and image +
sound scenes), tiny.py (tiny CLIP, GPT-2, CLAP/Whisper configs and an on-the-fly tokenizer), runs.py
(the demo runs: train, caption, score against a trivial baseline).
"""
