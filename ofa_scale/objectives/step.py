"""One micro-batch through the model and the loss: the glue the trainer calls for every group of a batch."""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

from ofa_scale.objectives.batching import group_names, loss_inputs, to_model_inputs
from ofa_scale.objectives.config import ObjectivesConfig
from ofa_scale.objectives.loss import (LossOutput, combine_group_losses, count_loss_tokens,
                                       label_smoothed_cross_entropy, loss_denominators)


def group_losses(model: Any, batch: Mapping[str, Any], cfg: ObjectivesConfig, device: torch.device | str,
                 dtype: torch.dtype = torch.float32, update_num: int = 0) -> dict[str, LossOutput]:
    """Run every group of a collated micro-batch through `model` (docs/interfaces.md §5) and the loss.

    Groups run as separate forward passes (their image sizes differ), as OFA runs its v1/v2 sub-batches.
    """
    out: dict[str, LossOutput] = {}
    for g in group_names(batch):
        logits = model(**to_model_inputs(batch[g], device, dtype))
        li = loss_inputs(batch[g], device)
        out[g] = label_smoothed_cross_entropy(
            logits, li["target"], epsilon=cfg.label_smoothing, conf=li["conf"],
            constraint_masks=li.get("constraint_masks"), task_ids=li["task_ids"],
            drop_worst_ratio=cfg.drop_worst_ratio_at(update_num))
    return out


def micro_batch_loss(model: Any, batch: Mapping[str, Any], cfg: ObjectivesConfig, denominators: Mapping[str, float],
                     device: torch.device | str, dtype: torch.dtype = torch.float32,
                     update_num: int = 0) -> tuple[torch.Tensor, dict[str, LossOutput]]:
    """(this micro-batch's share of the step loss, per-group sums). `denominators` come from
    `loss_denominators(global token counts, cfg.loss_normalization)`; summing the first value over every
    micro-batch of every rank gives the step loss."""
    outs = group_losses(model, batch, cfg, device, dtype, update_num)
    return combine_group_losses(outs, denominators), outs


def default_denominators(batch: Mapping[str, Any], cfg: ObjectivesConfig, update_num: int = 0,
                         extra_counts: Optional[Mapping[str, int]] = None) -> dict[str, float]:
    """Denominators when the global batch is this one micro-batch (plus `extra_counts` from the others)."""
    counts = count_loss_tokens(batch, cfg.drop_worst_ratio_at(update_num))
    for g, n in (extra_counts or {}).items():
        counts[g] = counts.get(g, 0) + int(n)
    return loss_denominators(counts, cfg.loss_normalization)
