"""One optimizer step on DeepSpeed's pipeline engine (parallel.pp > 1): `engine.train_batch` over the step's groups.

Shapes: every pipeline micro-batch must have one static shape per send, but a loader micro-batch holds up to two
groups ("vl", "aux") with different batch sizes, text lengths and image sizes. Each group of each loader
micro-batch is therefore one *pipeline* micro-batch (gradient_accumulation_steps = loader micro-batches × groups,
see `pipeline_micro_batches`), and the pipeline module is built with DeepSpeed's dynamic_shape so the two shapes
can alternate. The step still sees exactly the same examples, in the same forward calls per group, as pp = 1.

Loss: the same normalisation and TokenLoss as step.py. The per-group (or global) target-token denominators are
computed before the step and all-reduced over data-parallel ranks (objectives/loss.py); the last stage's loss
function (objectives/step.py `group_loss`) divides each group's token-loss sum by its denominator and multiplies
by (pipeline micro-batches × dp), which DeepSpeed's backward divides out again (it scales by
1/gradient_accumulation_steps and averages gradients over data-parallel ranks).

Metrics: only the last stage sees logits. Its tensor-parallel rank 0 records per-task sums in the step's
TaskAccumulator; the other ranks record nothing, so one all-reduce over the whole world (`reduce_metrics`) gives
every rank, rank 0 included, the data-parallel totals.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Optional, Sequence

import torch

from ofa_scale.objectives.step import group_loss
from ofa_scale.objectives.token_loss import make_token_loss
from ofa_scale.training.metrics import TaskAccumulator
from ofa_scale.training.step import LossSettings, MicroBatch, record_group, step_denominators


def pipeline_micro_batches(grad_accum: int, groups_per_micro_batch: int) -> int:
    """Pipeline micro-batches per rank per step: one per group of each loader micro-batch."""
    return grad_accum * groups_per_micro_batch


def pipeline_ds_overrides(ds_config: dict, dp: int, pipe_micro_batches: int) -> dict:
    """The trainer's DeepSpeed config adapted to the pipeline engine's schedule length (returns a new dict).

    DeepSpeed checks train_batch_size = micro × accumulation × dp; with one pipeline micro-batch per group the
    "batch size" it sees counts group-batches, not image-text rows (the samples it never looks at itself)."""
    from ofa_scale.parallel.pipeline import pipeline_ds_config

    out = dict(ds_config)
    micro = out["train_micro_batch_size_per_gpu"]
    out["gradient_accumulation_steps"] = pipe_micro_batches
    out["train_batch_size"] = micro * pipe_micro_batches * dp
    for key, value in pipeline_ds_config().items():
        out[key] = {**out.get(key, {}), **value}
    return out


class PipelineLoss:
    """The last stage's `loss_fn(logits, target)`: the group's normalised loss, and its per-task metrics.

    DeepSpeed hands the loss function only the logits and the labels; what else the loss needs (confidence
    weights, constraint masks, task ids, the denominator) is queued per pipeline micro-batch by
    `run_pipeline_step` in the order train_batch consumes them (forward passes run in micro-batch order)."""

    def __init__(self, ctx, settings: LossSettings):
        self.ctx = ctx
        self.settings = settings
        self.token_loss = make_token_loss(ctx, settings.epsilon, settings.pad, log_end=settings.log_end)
        self.pending: deque = deque()
        self.acc: Optional[TaskAccumulator] = None
        self.record = ctx.tp_rank == 0  # tp peers compute the same numbers; count them once

    def start_step(self, acc: TaskAccumulator) -> None:
        self.pending.clear()  # non-last stages never call the loss; drop the previous step's entries
        self.acc = acc

    def expect(self, group_batch: dict, denominator: float, scale: float) -> None:
        self.pending.append((group_batch, denominator, scale))

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        gb, denom, scale = self.pending.popleft()
        part, tl = group_loss(self.token_loss, logits, gb, denom, target=target)
        if self.record and self.acc is not None:
            record_group(self.acc, gb, tl, self.settings.pad)
            self.acc.add_objective(float(part.detach()))
        return part * scale


def pipeline_item(inputs: dict[str, Any], target: torch.Tensor) -> tuple[tuple, torch.Tensor]:
    """(first-stage inputs, last-stage labels); the inputs are parallel/pipeline_layers.pipeline_inputs: masks as
    int64 (DeepSpeed sends no gradient for them) and patch sampling as an int64 [sample_patch_num, seed] tensor
    (the embed stage rebuilds this micro-batch's patch generator from the seed, so pp > 1 samples what pp = 1 does)."""
    from ofa_scale.parallel.pipeline_layers import pipeline_inputs

    return (pipeline_inputs(inputs["src_tokens"], inputs["patch_images"], inputs["patch_masks"],
                            inputs["prev_output_tokens"], inputs["code_masks"], inputs.get("sample_patch_num"),
                            inputs.get("patch_generator")), target)


def run_pipeline_step(engine, ctx, micro_batches: Sequence[MicroBatch], groups: Sequence[str],
                      to_inputs: Callable[[str, dict, int], dict], settings: LossSettings, acc: TaskAccumulator,
                      loss_fn: PipelineLoss) -> None:
    """One optimizer step: queue every (micro-batch, group) as a pipeline micro-batch, then engine.train_batch."""
    denom = step_denominators(ctx, micro_batches, groups, settings)
    items = [(g, m, mb[g]) for m, mb in enumerate(micro_batches) for g in groups if g in mb]
    n = engine.gradient_accumulation_steps()
    if len(items) != n:
        # the collate step gives every micro-batch every configured group (fixed shapes), so this is a bug
        raise RuntimeError(f"step has {len(items)} group batches but the pipeline schedule expects {n}")
    scale = float(n * ctx.dp_size)
    loss_fn.start_step(acc)
    data = []
    for g, m, gb in items:
        data.append(pipeline_item(to_inputs(g, gb, m), gb["target"]))
        loss_fn.expect(gb, denom[g], scale)
    engine.train_batch(data_iter=iter(data))


def reduce_metrics(acc: TaskAccumulator) -> None:
    """Sum the last stage's records over the world (the only non-zero contributors: last stage, tp rank 0); a
    no-op without a process group."""
    acc.all_reduce(group=None)
