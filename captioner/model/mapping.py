"""Mapping networks: one modality's feature (B, F) -> a prefix of LM input embeddings (B, P, D).

Pure nn modules, no I/O. `MLPMapper` is ClipCap's MLP; `TransformerMapper` projects the feature into
`clip_length` tokens, appends `prefix_length` learned constant queries, runs a few transformer layers
and keeps the query outputs. ClipCap's released checkpoints map onto these two (model/clipcap.py).
"""

from __future__ import annotations

import torch
from torch import nn

from captioner.config import ModelConfig


class FeatureNorm(nn.Module):
    """Per-dimension standardisation of image features with statistics estimated on the training
    images (`fit`). Frozen random or small encoders give features whose variation across images is
    tiny next to their common offset; standardising makes that variation visible to the mapper.
    The statistics are buffers, saved with the mapper."""

    def __init__(self, feature_dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(feature_dim))
        self.register_buffer("std", torch.ones(feature_dim))

    @torch.no_grad()
    def fit(self, features: torch.Tensor) -> None:
        features = features.float()
        self.mean.copy_(features.mean(0))
        self.std.copy_(features.std(0, unbiased=False) if len(features) > 1 else torch.ones_like(self.std))

    def _apply(self, fn, recurse=True):
        # The statistics stay float32 when the model is cast to bf16/fp16: features of a frozen encoder can
        # vary by 1e-4 around an offset of 0.3, which a 16-bit mean would round away. Devices still move.
        mean, std = self.mean, self.std
        super()._apply(fn, recurse)
        if self.mean.dtype != mean.dtype:  # a cast, not only a move: keep the float32 values
            self.mean, self.std = mean.to(self.mean.device), std.to(self.std.device)
        return self

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return (features.float() - self.mean) / (self.std + 1e-6)  # (B, F), float32


class MLPMapper(nn.Module):
    def __init__(self, *, feature_dim: int, lm_dim: int, prefix_length: int, hidden: int | None = None):
        super().__init__()
        self.prefix_length, self.lm_dim = prefix_length, lm_dim
        hidden = hidden or (lm_dim * prefix_length) // 2
        self.net = nn.Sequential(
            nn.Linear(feature_dim, hidden), nn.Tanh(), nn.Linear(hidden, lm_dim * prefix_length)
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features).view(features.shape[0], self.prefix_length, self.lm_dim)  # (B, P, D)


class TransformerMapper(nn.Module):
    """`queries` is ClipCap's `prefix_const`. ClipCap's layers are these pre-LN layers with activation
    'relu' and qkv_bias=False: its to_queries / to_keys_values rows are our in_proj_weight (q, k, v)."""

    def __init__(self, *, feature_dim: int, lm_dim: int, prefix_length: int, clip_length: int,
                 num_layers: int, num_heads: int, activation: str = "gelu", qkv_bias: bool = True):
        super().__init__()
        if lm_dim % num_heads:
            raise ValueError(f"mapper_heads ({num_heads}) must divide the LM width ({lm_dim})")
        self.prefix_length, self.clip_length, self.lm_dim = prefix_length, clip_length, lm_dim
        self.project = nn.Linear(feature_dim, clip_length * lm_dim)
        self.queries = nn.Parameter(torch.randn(prefix_length, lm_dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            lm_dim, num_heads, dim_feedforward=2 * lm_dim, dropout=0.0, activation=activation,
            batch_first=True, norm_first=True,
        )
        self.layers = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        if not qkv_bias:
            for mod in self.layers.layers:
                # A zero, non-trainable, unsaved bias: attention computes exactly as without one, and the
                # state dict (and fine-tuning) has no such tensor, as in ClipCap.
                attn = mod.self_attn
                zeros = torch.zeros_like(attn.in_proj_bias.data)
                del attn.in_proj_bias
                attn.register_buffer("in_proj_bias", zeros, persistent=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        b = features.shape[0]
        x = self.project(features).view(b, self.clip_length, self.lm_dim)  # (B, C, D)
        q = self.queries.unsqueeze(0).expand(b, -1, -1)  # (B, P, D)
        out = self.layers(torch.cat([x, q], dim=1))  # (B, C + P, D)
        return out[:, self.clip_length:]  # (B, P, D)


class Mapper(nn.Module):
    """Optional feature standardisation followed by the configured mapping network."""

    def __init__(self, *, net: nn.Module, feature_norm: FeatureNorm | None, l2_normalize: bool = False):
        super().__init__()
        self.feature_norm = feature_norm
        self.net = net
        self.l2_normalize = l2_normalize

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.l2_normalize:
            features = features.float() / features.float().norm(dim=-1, keepdim=True)  # (B, F), unit length
        if self.feature_norm is not None:
            features = self.feature_norm(features)  # float32
        # (an int8-quantized MLP has no float parameters left: it takes float32)
        dtype = next((p.dtype for p in self.net.parameters()), torch.float32)
        return self.net(features.to(dtype))  # (B, P, D)


def build_mapper(config: ModelConfig, *, feature_dim: int, lm_dim: int, prefix_length: int | None = None) -> Mapper:
    """The configured mapper for one modality's features; prefix_length defaults to config.prefix_length."""
    prefix_length = prefix_length or config.prefix_length
    if config.mapper == "mlp":
        net = MLPMapper(feature_dim=feature_dim, lm_dim=lm_dim, prefix_length=prefix_length,
                        hidden=config.mlp_hidden)
    else:
        net = TransformerMapper(feature_dim=feature_dim, lm_dim=lm_dim, prefix_length=prefix_length,
                                clip_length=config.clip_length, num_layers=config.mapper_layers,
                                num_heads=config.mapper_heads, activation=config.mapper_activation,
                                qkv_bias=config.mapper_qkv_bias)
    return Mapper(net=net, feature_norm=FeatureNorm(feature_dim) if config.standardize_features else None,
                  l2_normalize=config.normalize_features)
