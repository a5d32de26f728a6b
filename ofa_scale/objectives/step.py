"""One micro-batch's share of the step loss: each group's token losses over its denominator, summed over groups.

The trainer (training/step.py) calls `micro_batch_loss` after one forward of all groups; the pipeline's last stage
(training/pipeline_step.py), which sees one group per pipeline micro-batch, calls `group_loss`. The denominators
come from `loss.global_loss_denominators`.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

from ofa_scale.objectives.token_loss import TokenLoss, TokenLosses


def group_loss(token_loss: TokenLoss, logits: torch.Tensor, group_batch: Mapping[str, Any], denominator: float, *,
               target: Optional[torch.Tensor] = None, drop_worst_ratio: float = 0.0,
               constraint_range: Optional[tuple[int, int]] = None) -> tuple[torch.Tensor, TokenLosses]:
    """(Σ token losses / denominator, the token losses) for one group batch (docs/interfaces.md §4) and its logits.

    `target`: the labels when they arrive apart from the batch (the pipeline hands them to its loss function);
    default `group_batch["target"]`. The loss's per-row inputs move to the logits' device; `conf` stays fp32
    whatever the logits' precision."""
    device = logits.device
    target = group_batch["target"] if target is None else target
    conf = group_batch.get("conf")
    masks = group_batch.get("constraint_masks")
    tl = token_loss(logits, target.to(device), conf=None if conf is None else conf.to(device, torch.float32),
                    constraint_masks=None if masks is None else masks.to(device), constraint_range=constraint_range)
    tl = tl.drop_worst(drop_worst_ratio)
    return tl.loss.float().sum() / denominator, tl


def micro_batch_loss(token_loss: TokenLoss, logits: Mapping[str, torch.Tensor], micro_batch: Mapping[str, Any],
                     denominators: Mapping[str, float], *, drop_worst_ratio: float = 0.0,
                     constraint_range: Optional[tuple[int, int]] = None
                     ) -> tuple[torch.Tensor, dict[str, TokenLosses]]:
    """(this micro-batch's share of the step loss, token losses per group) for the groups in `logits`. Summing the
    first value over every micro-batch of every data-parallel rank gives the step loss."""
    total = None
    out: dict[str, TokenLosses] = {}
    for g, group_logits in logits.items():
        part, out[g] = group_loss(token_loss, group_logits, micro_batch[g], denominators[g],
                                  drop_worst_ratio=drop_worst_ratio, constraint_range=constraint_range)
        total = part if total is None else total + part
    if total is None:
        raise ValueError("a micro-batch without any group has no loss")
    return total, out
