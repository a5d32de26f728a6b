"""One optimizer step: forward every micro-batch of this rank, normalise the loss, backward, engine.step().

Normalisation (why the loss is identical at any data-parallel size): before the first forward of a step, each rank
counts the target tokens of all its micro-batches, and one all-reduce over the data-parallel group gives the step's
global count N (per batch group with `per_group`): objectives/loss.py. Each micro-batch then contributes
(token-loss sum) / N (objectives/step.py, with the TokenLoss of objectives/token_loss.py). Summed over every
micro-batch of every rank that is exactly the single-process loss of the whole global batch. DeepSpeed
divides each backward by gradient_accumulation_steps and averages gradients over data-parallel ranks, so the
value handed to `engine.backward` is multiplied back by both.

Drop-worst (caption stage 1, spec §6.1 step 5): with `drop_worst_ratio` r > 0 each group of each micro-batch keeps
its floor((1 − r)·N) smallest token losses (TokenLosses.drop_worst), and the denominators count exactly those kept
tokens, so the loss stays independent of the data-parallel size. The trainer passes
`cfg.objectives.drop_worst_ratio_at(step − 1)` (fairseq's update_num counts the updates finished before this one),
which is 0 until OFA's `drop_worst_after`.

MuE (`LossSettings.all_layers`, set from model.overrides.mue): the model returns every decoder layer's logits and
the micro-batch loss is summed over them (objectives/mue_loss.py); the denominators are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from ofa_scale.objectives.loss import Normalization, global_loss_denominators
from ofa_scale.objectives.step import micro_batch_loss
from ofa_scale.objectives.token_loss import TokenLosses, make_token_loss
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
    log_end: Optional[float] = None  # objectives.loss=encouraging: the Encouraging Loss' log_end; None = CE
    # MuE (model.overrides.mue; objectives/mue_loss.py): the loss summed over every decoder layer's logits
    all_layers: bool = False

    @property
    def normalization(self) -> Normalization:
        return "per_group" if self.per_group else "global_tokens"


def step_denominators(ctx, micro_batches: Sequence[MicroBatch], groups: Sequence[str],
                      settings: LossSettings, drop_worst_ratio: float = 0.0) -> dict[str, float]:
    """{group: denominator} for this step, the same on every rank (objectives/loss.py); with drop-worst, the
    global count of kept tokens."""
    return global_loss_denominators(micro_batches, groups, settings.normalization, settings.pad, ctx.dp_group,
                                    drop_worst_ratio=drop_worst_ratio)


def record_group(acc: TaskAccumulator, group_batch: dict, tl: TokenLosses, pad: int) -> None:
    """Add one group batch's token losses to the step's per-task sums and counters."""
    acc.add(group_batch["task_ids"], tl.loss, tl.valid, tl.correct, rows=int((group_batch["task_ids"] >= 0).sum()),
            input_tokens=int((group_batch["src_tokens"] != pad).sum()
                             + (group_batch["prev_output_tokens"] != pad).sum()))


def run_step(engine, ctx, micro_batches: Sequence[MicroBatch], groups: Sequence[str],
             to_inputs: Callable[[str, dict, int], dict], loss: LossSettings, acc: TaskAccumulator,
             drop_worst_ratio: float = 0.0) -> None:
    """Forward/backward every micro-batch of this rank for one optimizer step; the last engine.step() updates.
    `drop_worst_ratio`: this update's drop-worst ratio (module docstring; 0 = keep every token)."""
    dp = ctx.dp_size
    gas = len(micro_batches)
    token_loss = make_token_loss(ctx, loss.epsilon, loss.pad, log_end=loss.log_end)
    denom = step_denominators(ctx, micro_batches, groups, loss, drop_worst_ratio)
    loss_fn = micro_batch_loss
    if loss.all_layers:  # --- MuE: every decoder layer's logits, the loss summed over them
        from ofa_scale.objectives.mue_loss import all_layer_inputs, all_layer_loss

        to_inputs, loss_fn = all_layer_inputs(to_inputs), all_layer_loss
    for m, mb in enumerate(micro_batches):
        present = [g for g in groups if g in mb]
        logits = engine({g: to_inputs(g, mb[g], m) for g in present})
        total, token_losses = loss_fn(token_loss, logits, mb, denom, drop_worst_ratio=drop_worst_ratio)
        for g, tl in token_losses.items():
            record_group(acc, mb[g], tl, loss.pad)
        acc.add_objective(float(total.detach()))
        engine.backward(total * (gas * dp))
        engine.step()
