"""captioner: frozen CLIP (+ CLAP/Whisper audio) encoders -> trainable prefix mappers -> causal LM (GPT-2)
image and audio captioning."""

from captioner.config import DecodeConfig, ModelConfig
from captioner.errors import CaptionerError

__version__ = "0.1.0"
__all__ = ["Captioner", "CaptionerError", "DecodeConfig", "ModelConfig", "evaluate", "__version__"]


def __getattr__(name: str):
    # Captioner imports torch, transformers and open_clip (seconds): loaded on first use, so `captioner --help`
    # and the light modules (config, errors, files) do not pay for them.
    if name == "Captioner":
        from captioner.api import Captioner

        return Captioner
    # Scoring imports pycocoevalcap (100 MB with its Java jars): loaded on first use, so captioning and
    # training run where only they are installed (e.g. a GPU box with the model's own dependencies).
    if name == "evaluate":
        from captioner.scoring.metrics import evaluate

        return evaluate
    raise AttributeError(f"module 'captioner' has no attribute {name!r}")
