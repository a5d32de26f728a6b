"""taming's `Encoder` (spec §10.5.2): image (N, 3, H, W) → latent (N, z_channels, H/f, W/f), f = 2^(levels-1)."""

from __future__ import annotations

import torch
from torch import nn

from ofa_scale.vqgan.blocks import (AttnBlock, Downsample, ResnetBlock, middle, normalize, run_middle, run_stage,
                                    swish)
from ofa_scale.vqgan.config import DDConfig


class Encoder(nn.Module):
    def __init__(self, dd: DDConfig):
        super().__init__()
        g = dd.norm_groups
        self.conv_in = nn.Conv2d(dd.in_channels, dd.ch, 3, 1, 1)
        in_mult = (1,) + tuple(dd.ch_mult)
        # Attention placement follows the *configured* resolution, as in taming, not the input's size.
        res = dd.resolution
        self.down = nn.ModuleList()
        block_in = dd.ch
        for level, mult in enumerate(dd.ch_mult):
            stage = nn.Module()
            stage.block, stage.attn = nn.ModuleList(), nn.ModuleList()
            block_in, block_out = dd.ch * in_mult[level], dd.ch * mult
            for _ in range(dd.num_res_blocks):
                stage.block.append(ResnetBlock(block_in, block_out, dd.dropout, g))
                block_in = block_out
                if res in dd.attn_resolutions:
                    stage.attn.append(AttnBlock(block_in, g))
            if level != len(dd.ch_mult) - 1:
                stage.downsample = Downsample(block_in)
                res //= 2
            self.down.append(stage)
        self.mid = middle(block_in, dd.dropout, g)
        self.norm_out = normalize(block_in, g)
        self.conv_out = nn.Conv2d(block_in, dd.z_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            h = run_stage(stage, h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = run_middle(self.mid, h)
        return self.conv_out(swish(self.norm_out(h)))


__all__ = ["Encoder"]
