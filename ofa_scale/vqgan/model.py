"""`VQGAN`: taming's encoder → quant_conv → quantizer and codes → post_quant_conv → decoder (spec §10.5.2).

Public use (see `load_vqgan`):
    codes = model.encode(images)            # LongTensor (N, H/8, W/8) on the CPU
    images = model.decode(codes)            # uint8 (N, H, W, 3) on the CPU
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from ofa_scale.errors import UserError
from ofa_scale.vqgan.config import VQGANConfig
from ofa_scale.vqgan.decoder import Decoder
from ofa_scale.vqgan.encoder import Encoder
from ofa_scale.vqgan.images import to_pixels, to_uint8
from ofa_scale.vqgan.quantize import GumbelQuantize, VectorQuantizer


class VQGAN(nn.Module):
    def __init__(self, config: VQGANConfig):
        super().__init__()
        self.config = config
        dd = config.ddconfig
        self.encoder = Encoder(dd)
        self.decoder = Decoder(dd)
        if config.quantizer == "gumbel":
            self.quantize: nn.Module = GumbelQuantize(dd.z_channels, config.embed_dim, config.n_embed)
        else:
            self.quantize = VectorQuantizer(config.n_embed, config.embed_dim, config.beta)
        self.quant_conv = nn.Conv2d(dd.z_channels, config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, dd.z_channels, 1)

    @property
    def device(self) -> torch.device:
        return self.quant_conv.weight.device

    @property
    def n_embed(self) -> int:
        return self.config.n_embed

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    # ------------------------------------------------------------------------------------------ codes
    def latent(self, pixels: torch.Tensor) -> torch.Tensor:
        """encoder → quant_conv: the quantizer's input, (N, embed_dim, H/f, W/f)."""
        return self.quant_conv(self.encoder(pixels))

    @torch.no_grad()
    def encode(self, images, *, sample: bool = False, seeds: int | Sequence[int] = 0) -> torch.Tensor:
        """Codes (N, H/f, W/f), int64 on the CPU, row-major. `images`: PIL images of one size, uint8 (N, H, W, 3)
        or float (N, 3, H, W) in [−1, 1]. Deterministic (argmax / nearest code) unless `sample`, which draws OFA's
        Gumbel codes with image i seeded by `seeds` (an int: seed + i; or one seed per image)."""
        pixels = to_pixels(images, self.device)
        f = self.downsample_factor
        if pixels.shape[-1] % f or pixels.shape[-2] % f:
            raise UserError(f"image size {tuple(pixels.shape[-2:])} is not a multiple of the VQGAN's factor {f}")
        n = pixels.shape[0]
        per_image = [int(seeds) + i for i in range(n)] if isinstance(seeds, int) else [int(s) for s in seeds]
        if sample and len(per_image) != n:
            raise UserError(f"{len(per_image)} seeds for {n} images")
        return self.quantize.codes(self.latent(pixels), sample=sample, seeds=per_image).cpu()

    def _code_grid(self, codes) -> torch.Tensor:
        codes = torch.as_tensor(codes, dtype=torch.long, device=self.device)
        if codes.ndim == 2:  # (N, L) flat raster codes, e.g. 1024 per image from the generator
            side = math.isqrt(codes.shape[1])
            if side * side != codes.shape[1]:
                raise UserError(f"{codes.shape[1]} codes per image is not a square grid; pass (N, h, w) codes")
            codes = codes.reshape(codes.shape[0], side, side)
        if codes.ndim != 3:
            raise UserError(f"codes must be (N, h, w) or (N, h*w), got shape {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.n_embed):
            raise UserError(f"codes must lie in [0, {self.n_embed - 1}] (got {int(codes.min())}..{int(codes.max())}); "
                            "subtract the dictionary offset (50265) from token ids first")
        return codes

    def decode_latent(self, z_q: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z_q))

    @torch.no_grad()
    def decode_pixels(self, codes) -> torch.Tensor:
        """Codes → float (N, 3, h·f, w·f) on the model's device, unclamped (≈ [−1, 1])."""
        return self.decode_latent(self.quantize.embed_codes(self._code_grid(codes)))

    @torch.no_grad()
    def decode(self, codes) -> torch.Tensor:
        """Codes (N, h, w) or (N, h·w) → uint8 images (N, h·f, w·f, 3) on the CPU (OFA's rendering)."""
        return to_uint8(self.decode_pixels(codes))


__all__ = ["VQGAN"]
