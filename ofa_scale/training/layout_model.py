"""This rank's model under any parallel layout, starting from the single-process model's initial weights.

Why a reference build: with tp > 1 the tensor-parallel layers draw their (split) initial values in a different
order than the plain layers, so the same seed would give different weights and a tp=2 run could never match
tp=1. Every layout therefore builds the plain model at the run's seed on the CPU, then copies its shard of every
parameter (and the BatchNorm statistics) into the layout's module with parallel/canonical.py's loader. The
single-process path (tp = pp = 1) builds directly, consuming the RNG exactly as before.

Memory: the reference model is held once per process while the layout's module is built. For models too large for
that, start from `model.pretrained` (loaded the same way, shard by shard).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn


def reference_state(model_config, seed: int) -> dict[str, torch.Tensor]:
    """Parameters and buffers of the plain (tp=1, unsplit) model built at `seed`; the global RNG is untouched."""
    from ofa_scale.model import OFAModel
    from ofa_scale.model.layers import LayerFactory

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = OFAModel(model_config, layers=LayerFactory())
    return {name: t.detach() for name, t in model.state_dict().items()}


def build_layout_model(ctx, workload, seed: int, pipeline_loss: Optional[Callable] = None) -> nn.Module:
    """An nn.Module (pp == 1) or a DeepSpeed PipelineModule (pp > 1) whose initial values equal the tp=1 model's.

    `pipeline_loss(logits, labels)` runs in the last pipeline stage (ignored when pp == 1)."""
    from ofa_scale.parallel.canonical import load_model_weights

    torch.manual_seed(seed)
    if ctx.tp_size == 1 and ctx.pp_size == 1:
        return ctx.build_model(workload.model_config)
    if ctx.pp_size == 1:
        model = ctx.build_model(workload.model_config)
    else:
        vl = workload.cfg.objectives.vl
        groups = workload.composition().group_sizes()
        # Stages are balanced for the image-text group's shapes; with two groups (vl, aux) the micro-batches differ
        # in shape, so every send carries its shape (DeepSpeed's dynamic_shape).
        model = ctx.build_model(workload.model_config, loss_fn=pipeline_loss, seed=seed, image_size=vl.image_size,
                                src_len=vl.source_length, tgt_len=vl.target_length, dynamic_shape=len(groups) > 1)
    load_model_weights(ctx, model, reference_state(workload.model_config, seed))
    return model
