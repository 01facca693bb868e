"""captioner: frozen CLIP encoder -> trainable prefix mapper -> causal LM (GPT-2) image captioning."""

from .api import Captioner
from .config import DecodeConfig, ModelConfig
from .metrics import evaluate

__version__ = "0.1.0"
__all__ = ["Captioner", "DecodeConfig", "ModelConfig", "evaluate", "__version__"]
