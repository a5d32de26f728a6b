"""One optimizer step: forward every micro-batch of this rank, normalise the loss, backward, engine.step().

Normalisation (why the loss is identical at any data-parallel size): before the first forward of a step, each rank
counts the target tokens of all its micro-batches, and one all-reduce over the data-parallel group gives the step's
global count N (per batch group with `per_group`). Each micro-batch then contributes (token-loss sum) / N. Summed
over every micro-batch of every rank that is exactly the single-process loss of the whole global batch. DeepSpeed
divides each backward by gradient_accumulation_steps and averages gradients over data-parallel ranks, so the
value handed to `engine.backward` is multiplied back by both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ofa_scale.training.metrics import TaskAccumulator

MicroBatch = dict[str, dict[str, Any]]  # group name -> GroupBatch (docs/interfaces.md §4)


class GroupsForward(nn.Module):
    """Runs the model once per batch group inside one module call.

    DeepSpeed expects one forward per backward; wrapping the per-group passes lets ZeRO-3 gather parameters and
    reduce gradients once per micro-batch however many groups (vl, aux) it holds.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, groups: dict[str, dict[str, Any]]) -> dict[str, torch.Tensor]:
        return {name: self.model(**inputs) for name, inputs in groups.items()}


@dataclass
class LossSettings:
    epsilon: float  # label smoothing
    pad: int
    per_group: bool  # OFA-style: each group normalised by its own token count; else one global count


def count_targets(micro_batches: Sequence[MicroBatch], groups: Sequence[str], pad: int) -> torch.Tensor:
    """Target tokens per group over this rank's micro-batches (float64, so the all-reduce is exact)."""
    counts = torch.zeros(len(groups), dtype=torch.float64)
    for mb in micro_batches:
        for i, g in enumerate(groups):
            if g in mb:
                counts[i] += float((mb[g]["target"] != pad).sum())
    return counts


def global_denominators(local_counts: torch.Tensor, per_group: bool, dp_group) -> torch.Tensor:
    counts = local_counts.clone()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts, group=dp_group)
    if not per_group:
        counts = counts.sum().expand_as(counts).clone()
    return counts.clamp(min=1.0)


def run_step(engine, ctx, micro_batches: Sequence[MicroBatch], groups: Sequence[str],
             to_inputs: Callable[[str, dict, int], dict], loss: LossSettings, acc: TaskAccumulator) -> None:
    """Forward/backward every micro-batch of this rank for one optimizer step; the last engine.step() updates."""
    dp = ctx.dp_size
    gas = len(micro_batches)
    denom = global_denominators(count_targets(micro_batches, groups, loss.pad), loss.per_group, ctx.dp_group)
    for m, mb in enumerate(micro_batches):
        present = [g for g in groups if g in mb]
        inputs = {g: to_inputs(g, mb[g], m) for g in present}
        logits = engine(inputs)
        total = None
        for g in present:
            gb = mb[g]
            device = logits[g].device
            target = gb["target"].to(device)
            conf = gb.get("conf")
            cmask = gb.get("constraint_masks")
            tl = ctx.token_losses(logits[g], target, epsilon=loss.epsilon, ignore_index=loss.pad,
                                  conf=None if conf is None else conf.to(device, logits[g].dtype),
                                  constraint_masks=None if cmask is None else cmask.to(device))
            part = tl.loss.float().sum() / denom[groups.index(g)].to(device, torch.float32)
            total = part if total is None else total + part
            acc.add(gb["task_ids"], tl.loss, tl.valid, tl.correct, rows=int((gb["task_ids"] >= 0).sum()),
                    input_tokens=int((gb["src_tokens"] != loss.pad).sum()
                                     + (gb["prev_output_tokens"] != loss.pad).sum()))
        acc.add_objective(float(total.detach()))
        engine.backward(total * (gas * dp))
        engine.step()
