"""captioner: frozen CLIP (+ CLAP/Whisper audio) encoders -> trainable prefix mappers -> causal LM (GPT-2)
image and audio captioning."""

from captioner.api import Captioner
from captioner.config import DecodeConfig, ModelConfig
from captioner.errors import CaptionerError

__version__ = "0.1.0"
__all__ = ["Captioner", "CaptionerError", "DecodeConfig", "ModelConfig", "evaluate", "__version__"]


def __getattr__(name: str):
    # Scoring imports pycocoevalcap (100 MB with its Java jars): loaded on first use, so captioning and
    # training run where only they are installed (e.g. a GPU box with the model's own dependencies).
    if name == "evaluate":
        from captioner.scoring.metrics import evaluate

        return evaluate
    raise AttributeError(f"module 'captioner' has no attribute {name!r}")
