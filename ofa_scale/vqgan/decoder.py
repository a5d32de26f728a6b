"""taming's `Decoder` (spec §10.5.2): latent (N, z_channels, h, w) → image (N, out_ch, h·f, w·f), no output
activation (values ≈ [−1, 1]; callers clamp)."""

from __future__ import annotations

import torch
from torch import nn

from ofa_scale.vqgan.blocks import (AttnBlock, ResnetBlock, Upsample, middle, normalize, run_middle, run_stage,
                                    swish)
from ofa_scale.vqgan.config import DDConfig


class Decoder(nn.Module):
    def __init__(self, dd: DDConfig):
        super().__init__()
        g = dd.norm_groups
        levels = len(dd.ch_mult)
        block_in = dd.ch * dd.ch_mult[-1]
        res = dd.resolution // 2 ** (levels - 1)
        self.tanh_out = dd.tanh_out
        self.conv_in = nn.Conv2d(dd.z_channels, block_in, 3, 1, 1)
        self.mid = middle(block_in, dd.dropout, g)
        stages: list[nn.Module] = []
        for level in reversed(range(levels)):
            stage = nn.Module()
            stage.block, stage.attn = nn.ModuleList(), nn.ModuleList()
            block_out = dd.ch * dd.ch_mult[level]
            for _ in range(dd.num_res_blocks + 1):
                stage.block.append(ResnetBlock(block_in, block_out, dd.dropout, g))
                block_in = block_out
                if res in dd.attn_resolutions:
                    stage.attn.append(AttnBlock(block_in, g))
            if level != 0:
                stage.upsample = Upsample(block_in)
                res *= 2
            stages.insert(0, stage)
        self.up = nn.ModuleList(stages)  # indexed by level, like taming's `up.{level}.…` keys
        self.norm_out = normalize(block_in, g)
        self.conv_out = nn.Conv2d(block_in, dd.out_ch, 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = run_middle(self.mid, self.conv_in(z))
        for stage in reversed(self.up):
            h = run_stage(stage, h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        h = self.conv_out(swish(self.norm_out(h)))
        return torch.tanh(h) if self.tanh_out else h


__all__ = ["Decoder"]
