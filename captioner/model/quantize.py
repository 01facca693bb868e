"""int8 CPU path: dynamic quantization of the LM's and the mappers' linear layers.

`quantize_int8(model)` converts GPT-2's `Conv1D` layers (a linear layer whose weight is stored
transposed, (in, out)) into `nn.Linear` (`conv1d_to_linear`), then runs torch's dynamic quantization on
every `nn.Linear` of the LM (the vocabulary head included) and of the mappers (but the layers of the
transformer mapper's `nn.TransformerEncoderLayer`s, see below): weights are stored as int8
(per output channel), activations are quantized on the fly per batch, and the matrix multiplies run in
int8 (fbgemm / oneDNN). The frozen encoders stay float32: they run once per image, not once per token.

torch marks `torch.ao.quantization` as deprecated in favour of torchao, which is not a dependency here;
the eager API still works in torch 2.x and is what runs offline on CPU, so it is used with its
deprecation warnings silenced.
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

from captioner.errors import ConfigError

logger = logging.getLogger(__name__)

QUANTIZE_CHOICES = ("int8",)


def conv1d_to_linear(module: nn.Module) -> int:
    """Replace every transformers `Conv1D` under `module` (in place) by an `nn.Linear` computing the same
    function (weight transposed); returns how many were replaced."""
    from transformers.pytorch_utils import Conv1D

    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, Conv1D):
            linear = nn.Linear(child.nx, child.nf, device=child.weight.device, dtype=child.weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(child.weight.t())  # Conv1D: (in, out); Linear: (out, in)
                linear.bias.copy_(child.bias)
            linear.requires_grad_(child.weight.requires_grad)
            setattr(module, name, linear)
            count += 1
        else:
            count += conv1d_to_linear(child)
    return count


def check_quantize(quantize: str | None, device: torch.device) -> None:
    """ConfigError unless `quantize` is None or a known kind and the device is the CPU."""
    if quantize is None:
        return
    if quantize not in QUANTIZE_CHOICES:
        raise ConfigError(f"quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {quantize!r}")
    if torch.device(device).type != "cpu":
        raise ConfigError(f"int8 quantization runs on the CPU only (torch dynamic quantization), not on "
                          f"{torch.device(device)}")


def quantize_int8(model: nn.Module) -> nn.Module:
    """Quantize a float32 `CaptionModel` on the CPU in place (see the module docstring) and return it.
    The result is for inference only: it cannot be trained or saved as a checkpoint."""
    params = list(model.parameters())
    if any(p.device.type != "cpu" for p in params):
        raise ConfigError("int8 quantization runs on the CPU only: move the captioner to the CPU first")
    if any(p.is_floating_point() and p.dtype != torch.float32 for p in [*model.lm.parameters(),
                                                                          *model.mappers.parameters()]):
        raise ConfigError("int8 quantization starts from float32 weights (not bfloat16 / float16)")
    engine = torch.backends.quantized.engine
    if engine == "none" or not torch.backends.quantized.supported_engines:
        raise ConfigError("this torch build has no quantized CPU engine (fbgemm / onednn / qnnpack)")
    converted = conv1d_to_linear(model.lm)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
        warnings.filterwarnings("ignore", message=".*quantize_per_channel.*")
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        # Per output channel: GPT-2's projections have rows of very different scales (one scale per
        # tensor costs more agreement with float32 for no speed).
        spec = {nn.Linear: per_channel_dynamic_qconfig}
        model.lm = quantize_dynamic(model.lm, spec, dtype=torch.qint8, inplace=True)
        # nn.TransformerEncoderLayer's fast path reads linear1.weight as a tensor, which a quantized layer
        # does not have: the transformer mapper's layers stay float32 (the mapper runs once per image,
        # the LM once per token, so that is where the time is).
        inside = {f"{name}.{sub}" for name, m in model.mappers.named_modules()
                  if isinstance(m, nn.TransformerEncoderLayer) for sub, _ in m.named_modules() if sub}
        names = {name: per_channel_dynamic_qconfig for name, m in model.mappers.named_modules()
                 if type(m) is nn.Linear and name not in inside}
        model.mappers = quantize_dynamic(model.mappers, names, dtype=torch.qint8, inplace=True)
    count = sum(is_quantized(m) for m in model.modules())
    logger.info("int8: %d linear layers quantized (%d GPT-2 Conv1D converted first)", count, converted)
    model.quantized = "int8"
    return model


def is_quantized(module: nn.Module) -> bool:
    """Whether `module` is a dynamically quantized linear layer."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    return isinstance(module, DynamicLinear)
