"""MuE's training loss (spec ext §10.7.3, MuE `MuE_Task_Loss`): the token loss summed over every decoder layer.

With `model.mue` the model returns one logits tensor per decoder layer, output_projection(layer_norm(h_l))
(`OFAModel(..., all_layers=True)`), and the micro-batch loss is

    Σ_l  Σ_groups  Σ(token losses of layer l) / D_g

where each layer's token losses are the ordinary ones — label smoothing, constraint masks and range, drop-worst,
conf — from the same loss stack the trainer calls for one layer (objectives/step.py `micro_batch_loss`, i.e.
objectives/token_loss.py). Layers are summed, not averaged, as MuE does. The denominators D_g are the step's
usual target-token counts (objectives/loss.py); they depend on the targets only, so every layer shares them and
they are MuE's `ntokens` of the last layer. Drop-worst ranks each layer's tokens by that layer's own losses (MuE
runs its criterion per layer). The token losses reported for metrics (accuracy, nll) are the last layer's, the
model's actual output.

No exits during training (MuE's `is_train`); the trainer's validation, which generates with the last layer,
neither. Pipeline parallelism is refused by the config (training/config.py): its stages build their own layer
loop, without the decomposed encoder or the per-layer outputs.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from ofa_scale.objectives.step import micro_batch_loss
from ofa_scale.objectives.token_loss import TokenLoss, TokenLosses


def all_layer_inputs(to_inputs: Callable[[str, dict, int], dict]) -> Callable[[str, dict, int], dict]:
    """The trainer's model-input builder, asking the model for every decoder layer's logits."""
    return lambda group, group_batch, m: {**to_inputs(group, group_batch, m), "all_layers": True}


def all_layer_loss(token_loss: TokenLoss, logits: Mapping[str, Sequence[torch.Tensor]],
                   micro_batch: Mapping[str, Any], denominators: Mapping[str, float], *,
                   drop_worst_ratio: float = 0.0, constraint_range: Optional[tuple[int, int]] = None
                   ) -> tuple[torch.Tensor, dict[str, TokenLosses]]:
    """`micro_batch_loss` with each group's logits given per decoder layer ({group: (L tensors (B, T, V))}) ->
    (the sum over layers of each layer's micro-batch loss, the last layer's token losses per group)."""
    depths = {len(per_layer) for per_layer in logits.values()}
    if len(depths) != 1:
        raise ValueError("every group needs the logits of the same decoder layers")
    total = None
    last: dict[str, TokenLosses] = {}
    for layer in range(depths.pop()):
        part, last = micro_batch_loss(token_loss, {g: per_layer[layer] for g, per_layer in logits.items()},
                                      micro_batch, denominators, drop_worst_ratio=drop_worst_ratio,
                                      constraint_range=constraint_range)
        total = part if total is None else total + part
    if total is None:
        raise ValueError("all-layer logits hold no decoder layer")
    return total, last
