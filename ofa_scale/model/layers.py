"""The layer factory: the one place where the transformer's Linear/Embedding/FFN-LayerNorm layers are created.

Parallelism enters the model only through this object (docs/interfaces.md §5). The plain-torch `LayerFactory`
here builds ordinary modules at tp_size=1; `ofa_scale.parallel` provides a tensor-parallel factory with the same
methods (megatron-core Column/RowParallelLinear behind thin wrappers that return plain tensors):

* `column_linear(in, out, bias)`: output features split over TP ranks (q/k/v, fc1, pos_q/pos_k linears).
* `row_linear(in, out, bias)`: input features split, output all-reduced (out_proj, fc2).
* `linear(in, out, bias)`: replicated (image_proj).
* `vocab_embedding(num, dim, padding_idx)`: rows split under TP.
* `output_logits(x, embedding)`: projection tied to `embedding.weight`; logits vocab-split under TP.
* `ffn_layernorm(dim)`: OFA normalises over the *full* FFN width; under TP each rank holds dim/tp of it, so the
  TP factory must return a distributed LayerNorm (statistics all-reduced over the TP group).

Attention heads are a first-class dimension: a module with H heads holds H/tp_size heads locally; the model
computes local heads as `heads // tp_size` and slices per-head tables by `tp_rank`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ofa_scale.model.kernels import make_layer_norm


class LayerFactory:
    """Plain torch layers (tensor-parallel size 1)."""

    tp_size: int = 1
    tp_rank: int = 0

    def column_linear(self, in_features: int, out_features: int, bias: bool = True) -> nn.Module:
        return nn.Linear(in_features, out_features, bias=bias)

    def row_linear(self, in_features: int, out_features: int, bias: bool = True) -> nn.Module:
        return nn.Linear(in_features, out_features, bias=bias)

    def linear(self, in_features: int, out_features: int, bias: bool = True) -> nn.Module:
        return nn.Linear(in_features, out_features, bias=bias)

    def vocab_embedding(self, num_embeddings: int, dim: int, padding_idx: int | None) -> nn.Module:
        return nn.Embedding(num_embeddings, dim, padding_idx=padding_idx)

    def output_logits(self, x: torch.Tensor, embedding: nn.Module) -> torch.Tensor:
        return F.linear(x, embedding.weight)

    def ffn_layernorm(self, dim: int, eps: float = 1e-5) -> nn.Module:
        return make_layer_norm(dim, eps)
