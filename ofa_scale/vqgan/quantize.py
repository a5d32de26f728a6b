"""The two taming quantizers: OFA's `GumbelQuantize` and the nearest-code `VectorQuantizer` (taming's
`VectorQuantizer2`). Both map a latent (N, D, h, w) to codes (N, h, w) and codes back to embeddings.

Codes are deterministic by default: argmax of the Gumbel logits, or the nearest codebook vector. OFA's
`generate_code.py` instead *samples* Gumbel codes (eval-mode `GumbelQuantize` still adds Gumbel noise, τ = 1;
spec §10.5.4); `sample=True` reproduces that, with one seeded generator per image so a row's codes do not depend on
the batch it was encoded in.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ofa_scale.errors import UserError


def gumbel_noise(shape: Sequence[int], seeds: Sequence[int], device: torch.device) -> torch.Tensor:
    """Standard Gumbel noise −log(−log U), one generator per leading index, seeded with `seeds[i]`."""
    out = torch.empty(tuple(shape), device=device)
    for i, seed in enumerate(seeds):
        gen = torch.Generator(device=device)
        gen.manual_seed(int(seed))
        u = torch.rand(tuple(shape[1:]), generator=gen, device=device)
        # clamp: U = 0 or 1 would give ±inf (torch's gumbel_softmax draws from an exponential for the same reason)
        out[i] = -torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-7)))
    return out


class GumbelQuantize(nn.Module):
    """`proj` (1×1 conv, D → n_embed logits) and `embed` (n_embed × D), as taming names them."""

    def __init__(self, num_hiddens: int, embedding_dim: int, n_embed: int):
        super().__init__()
        self.n_embed = n_embed
        self.proj = nn.Conv2d(num_hiddens, n_embed, 1)
        self.embed = nn.Embedding(n_embed, embedding_dim)

    def codes(self, z: torch.Tensor, sample: bool = False, seeds: Sequence[int] | None = None) -> torch.Tensor:
        logits = self.proj(z).float()
        if sample:
            # argmax of hard gumbel_softmax(logits, τ=1) = argmax(logits + Gumbel noise)
            logits = logits + gumbel_noise(logits.shape, seeds, logits.device)
        return logits.argmax(dim=1)

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return self.embed(codes).permute(0, 3, 1, 2)


class VectorQuantizer(nn.Module):
    """taming's `VectorQuantizer2` (key `embedding.weight`): the code is the nearest codebook vector (L2)."""

    def __init__(self, n_embed: int, embedding_dim: int, beta: float = 0.25):
        super().__init__()
        self.n_embed, self.beta = n_embed, beta
        self.embedding = nn.Embedding(n_embed, embedding_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_embed, 1.0 / n_embed)

    def codes(self, z: torch.Tensor, sample: bool = False, seeds: Sequence[int] | None = None) -> torch.Tensor:
        if sample:
            raise UserError("sampled codes exist only for a Gumbel VQGAN (GumbelVQ); this one is a nearest-code "
                            "VQModel, whose codes are deterministic: drop the sampling option")
        n, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d).float()
        e = self.embedding.weight.float()
        dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ e.t() + e.pow(2).sum(1)[None]
        return dist.argmin(dim=1).reshape(n, h, w)

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return self.embedding(codes).permute(0, 3, 1, 2)


__all__ = ["GumbelQuantize", "VectorQuantizer", "gumbel_noise"]
