"""captioner: frozen CLIP (+ CLAP/Whisper audio) encoders -> trainable prefix mappers -> causal LM (GPT-2)
image and audio captioning."""

from .api import Captioner
from .config import DecodeConfig, ModelConfig
from .metrics import evaluate

__version__ = "0.1.0"
__all__ = ["Captioner", "DecodeConfig", "ModelConfig", "evaluate", "__version__"]
