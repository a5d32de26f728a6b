"""Loss normalisation: how the per-token losses of `TokenLoss` (token_loss.py) become the step loss.

Each group g of every micro-batch contributes Σ(token losses) / D_g, where D_g comes from target-token counts over
the whole global batch (all micro-batches of all data-parallel ranks), known before any forward pass:
- `per_group`: D_g = N_g, the global count of group g's target tokens (OFA's loss_v1/ntok_v1 + loss_v2/ntok_v2);
- `global_tokens`: D_g = Σ_g N_g for every group (the mean over all target tokens of the step).
Summed over every micro-batch of every rank that is the single-process loss of the whole global batch, however
the batch is split. `global_loss_denominators` is the one place that counts, all-reduces and divides;
objectives/step.py applies the denominators.
"""

from __future__ import annotations

from typing import Any, Literal, Mapping, Sequence

import torch

from ofa_scale.objectives.token_loss import kept_tokens
from ofa_scale.parallel import collectives

Normalization = Literal["global_tokens", "per_group"]
NORMALIZATIONS = ("per_group", "global_tokens")


def count_loss_tokens(micro_batches: Sequence[Mapping[str, Any]], groups: Sequence[str], pad: int,
                      drop_worst_ratio: float = 0.0) -> torch.Tensor:
    """(len(groups),) float64 on the CPU: target tokens per group over these micro-batches, after drop-worst
    (which applies per group of each micro-batch). Float64 on the CPU so the all-reduce is exact and cheap."""
    counts = torch.zeros(len(groups), dtype=torch.float64)
    for mb in micro_batches:
        for i, g in enumerate(groups):
            if g in mb:
                counts[i] += kept_tokens(int((mb[g]["target"] != pad).sum()), drop_worst_ratio)
    return counts


def loss_denominators(global_counts: torch.Tensor, mode: Normalization = "per_group") -> torch.Tensor:
    """Divisor of each group's loss sum from the global token counts (an empty group divides by 1: its sum is 0)."""
    if mode == "global_tokens":
        return global_counts.sum().expand_as(global_counts).clamp(min=1.0)
    if mode == "per_group":
        return global_counts.clamp(min=1.0)
    raise ValueError(f"unknown loss normalisation {mode!r}; use one of {', '.join(NORMALIZATIONS)}")


def global_loss_denominators(micro_batches: Sequence[Mapping[str, Any]], groups: Sequence[str], mode: Normalization,
                             pad: int, dp_group: Any = None, drop_worst_ratio: float = 0.0) -> dict[str, float]:
    """{group: D_g} for one optimizer step: this rank's counts, summed over the data-parallel group (a no-op
    without a process group), then `loss_denominators`."""
    counts = collectives.all_reduce(count_loss_tokens(micro_batches, groups, pad, drop_worst_ratio), "sum", dp_group)
    return {g: float(d) for g, d in zip(groups, loss_denominators(counts, mode))}
