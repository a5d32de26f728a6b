"""OFA-OCR's ViT-B/16 image stem (spec-ext §10.2.4), the alternative to the ResNet (`model.image_stem: vit_b16`).

CLIP's vision transformer without its class token, `ln_post` and projection: conv1 (16×16/16, no bias) → add the
positional table's rows 1…196 (row 0, CLIP's class-token row, is stored but unused), bilinearly resized from 14×14
to (H/16, W/16) when the grid is not 14×14 → `ln_pre` → 9 pre-LN residual blocks (12-head attention, MLP
768→3072→768 with QuickGELU) → (B, 768, H/16, W/16), the same layout the ResNet hands to `image_proj`.

Module names are OFA's (`models/ofa/vit.py`): the state dict is `positional_embedding`, `conv1.weight`, `ln_pre.*`,
`transformer.resblocks.{i}.{attn.in_proj_*, attn.out_proj.*, ln_1.*, mlp.c_fc.*, mlp.c_proj.*, ln_2.*}`: 112
tensors, 64,533,504 parameters. Attention is `nn.MultiheadAttention` so those keys are its own. Plain torch:
replicated under tensor parallelism, like the ResNet.

One deliberate difference: OFA decides whether to resize the table from the image *height* alone (`!= 224`), so a
224-px-high non-square image would fail there; here the grid shape decides (identical for square images).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

WIDTH = 768
LAYERS = 9
HEADS = 12
PATCH = 16
TRAIN_GRID = 14  # 224 px / 16: the grid the positional table was trained for


class QuickGELU(nn.Module):
    """CLIP's GELU approximation x·σ(1.702x) (the checkpoint's MLPs were trained with it, not exact GELU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, 4 * width)), ("gelu", QuickGELU()),
                                              ("c_proj", nn.Linear(4 * width, width))]))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.resblocks = nn.Sequential(*(ResidualAttentionBlock(width, heads) for _ in range(layers)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resblocks(x)


class ViTStem(nn.Module):
    """images (B, 3, H, W), H and W multiples of 16 → features (B, 768, H/16, W/16)."""

    def __init__(self, width: int = WIDTH, layers: int = LAYERS, heads: int = HEADS, patch: int = PATCH,
                 train_grid: int = TRAIN_GRID):
        super().__init__()
        self.patch, self.train_grid = patch, train_grid
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        # CLIP's init scale; a loaded checkpoint or init.py's named initialisation overwrites it
        self.positional_embedding = nn.Parameter(width**-0.5 * torch.randn(train_grid * train_grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)

    @property
    def out_channels(self) -> int:
        return self.conv1.out_channels

    def grid_positions(self, height: int, width: int) -> torch.Tensor:
        """(height·width, C) positional rows for a height×width patch grid, row-major."""
        table = self.positional_embedding[1:]
        if (height, width) == (self.train_grid, self.train_grid):
            return table
        grid = table.reshape(1, self.train_grid, self.train_grid, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)
        return grid.permute(0, 2, 3, 1).reshape(height * width, -1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.conv1(images)
        b, c, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)  # (B, h·w, C)
        x = self.ln_pre(x + self.grid_positions(h, w).to(x.dtype))
        x = self.transformer(x)
        return x.transpose(1, 2).reshape(b, c, h, w)


def vit_param_count(width: int = WIDTH, layers: int = LAYERS, patch: int = PATCH,
                    train_grid: int = TRAIN_GRID) -> int:
    """Parameters of `ViTStem` by formula (the planner's parameter groups use it without building the model)."""
    block = (3 * width * width + 3 * width) + (width * width + width) + 2 * (2 * width) \
        + (4 * width * width + 4 * width) + (4 * width * width + width)
    return 3 * width * patch * patch + (train_grid * train_grid + 1) * width + 2 * width + layers * block


__all__ = ["ViTStem", "QuickGELU", "vit_param_count", "WIDTH", "PATCH"]
