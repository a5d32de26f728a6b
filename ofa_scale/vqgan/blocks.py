"""The convolutional building blocks of taming-transformers' `Encoder`/`Decoder` (spec §10.5.2).

Parameter names (`norm1`, `conv1`, `nin_shortcut`, `q`, `k`, `v`, `proj_out`, `conv`) are taming's, because the
state dict of a taming checkpoint must load into these modules key for key.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def normalize(channels: int, groups: int = 32) -> nn.GroupNorm:
    """taming's `Normalize`: GroupNorm with 32 groups, eps 1e-6. `groups` exists only so tiny test/sample
    models can have fewer than 32 channels; real checkpoints always use 32."""
    return nn.GroupNorm(num_groups=min(groups, channels), num_channels=channels, eps=1e-6, affine=True)


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    """norm1 → swish → conv3×3 → norm2 → swish → dropout → conv3×3, plus a 1×1 shortcut when channels change."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0, groups: int = 32):
        super().__init__()
        self.norm1 = normalize(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.norm2 = normalize(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions, with 1×1 q/k/v/proj_out convs and a residual."""

    def __init__(self, channels: int, groups: int = 32):
        super().__init__()
        self.norm = normalize(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        b, c, hh, ww = h.shape
        q, k, v = (m(h).reshape(b, 1, c, hh * ww).transpose(2, 3) for m in (self.q, self.k, self.v))
        # softmax(q kᵀ / √c) v, exactly taming's bmm formulation (scale c^-0.5), in one fused call
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(out.transpose(2, 3).reshape(b, c, hh, ww))


class Downsample(nn.Module):
    """Asymmetric zero pad (right, bottom) then a stride-2 3×3 conv: halves H and W exactly."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour ×2 then a 3×3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def middle(channels: int, dropout: float, groups: int) -> nn.Module:
    """The `mid` stage both coders have: block_1 → attn_1 → block_2 at the lowest resolution."""
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, dropout, groups)
    mid.attn_1 = AttnBlock(channels, groups)
    mid.block_2 = ResnetBlock(channels, channels, dropout, groups)
    return mid


def run_middle(mid: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return mid.block_2(mid.attn_1(mid.block_1(h)))


def run_stage(stage: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """One resolution level: its blocks, each followed by its attention where the level has attention."""
    for i, block in enumerate(stage.block):
        h = block(h)
        if len(stage.attn):
            h = stage.attn[i](h)
    return h


__all__ = ["middle", "run_middle", "run_stage", "normalize", "swish", "ResnetBlock", "AttnBlock", "Downsample",
           "Upsample"]
