"""Exponential moving average of the weights (OFA's --ema-decay 0.9999 --ema-fp32 --ema-start-update, spec §7.2),
used for validation and evaluation.

    ema = EMA(engine.module, decay=cfg.train.ema_decay, start=cfg.train.ema_start)   # after deepspeed.initialize
    ...
    engine.step(); ema.update(step)            # after every optimizer step; `step` counts finished updates (1, 2, …)
    with ema.swapped():                        # collective under ZeRO-3: every rank enters it
        metrics = validate(model)              # the module now computes with the EMA weights
    state = ema.state_dict(); ema.load_state_dict(state)     # per rank, next to the rank's checkpoint state

What is averaged (as fairseq's EMA): every parameter that requires gradients, in fp32 whatever the training
precision, starting from the weights the EMA is built from (the pretrained/resumed model). Before update `start`
the average is reset to the current weights (fairseq sets the decay to 0 while `updates < ema_start_update`).
Frozen parameters and BatchNorm statistics are not averaged: fairseq copies them from the live model at every
update, which is exactly what `swapped()` leaves in place (the live buffers and the unchanged frozen weights).

Distribution: no rank ever holds more than its own share. Under ZeRO-3 each parameter's shadow is this rank's
partition (`param.ds_tensor`, DeepSpeed's flat padded slice) and `swapped()` writes the partitions; parameters
ZeRO-3 keeps gathered between steps (small "persistent" ones) are re-partitioned and gathered again through
DeepSpeed's own calls, which is why entering and leaving `swapped()` is collective. Under tensor parallelism each
rank averages its shard (`param.data`). Without ZeRO-3, `param.data` is the whole (TP-local) tensor.
The optimizer's fp32 master copies are never touched, so training continues from exactly the live weights.

The state (`state_dict`) is this rank's shadows: it resumes under the same layout; the trainer also writes a
layout-free EMA copy (finetune/ema_store.py). `gathered_value` gives one parameter's full EMA value (collective
under ZeRO-3); `full_ema_state_dict` collects them on one rank.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from ofa_scale.errors import UserError
from ofa_scale.parallel import collectives
from ofa_scale.parallel.zero3_params import is_partitioned

EMA_FORMAT = 1


def _local(p: torch.Tensor) -> torch.Tensor:
    """The tensor that holds this rank's values of p: its ZeRO-3 partition, or the parameter itself. Read fresh
    every time: DeepSpeed re-points ds_tensor at its flat buffers when the engine is built."""
    return p.ds_tensor if is_partitioned(p) else p.data


def _gathered(params: list[nn.Parameter]) -> list[nn.Parameter]:
    """ZeRO-3 parameters whose full data is currently materialised (persistent ones between steps)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return [p for p in params if is_partitioned(p) and p.ds_status == ZeroParamStatus.AVAILABLE]


class EMA:
    def __init__(self, module: nn.Module, decay: float, start: int = 0):
        if not 0.0 < decay < 1.0:
            raise UserError(f"train.ema_decay is {decay}; use a value in (0, 1) (OFA: 0.9999), or 0 to turn EMA off")
        self.decay = float(decay)
        self.start = int(start)
        self.module = module
        self.params: dict[str, nn.Parameter] = {n: p for n, p in module.named_parameters() if p.requires_grad}
        if not self.params:
            raise UserError("the EMA found no trainable parameter in the model")
        with torch.no_grad():
            self.shadow: dict[str, torch.Tensor] = {n: _local(p).detach().float().clone()
                                                    for n, p in self.params.items()}
        self.updates = 0

    # ---- training ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold the current weights in after optimizer step `step` (fairseq's num_updates after the update)."""
        decay = 0.0 if step < self.start else self.decay
        for name, p in self.params.items():
            shadow = self.shadow[name]
            local = _local(p)
            if decay == 0.0:
                shadow.copy_(local)
            else:
                shadow.mul_(decay).add_(local.to(shadow.dtype), alpha=1.0 - decay)
        self.updates = step

    # ---- validation ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _write(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Put `values` (per name, the shape of `_local`) into the module; return what was there."""
        params = list(self.params.values())
        gathered = _gathered(params)
        if gathered:  # their full data must follow the partitions: drop it now, gather it again below
            gathered[0].partition(gathered)
        previous = {}
        for name, p in self.params.items():
            local = _local(p)
            previous[name] = local.clone()
            local.copy_(values[name].to(local.dtype))
        if gathered:
            gathered[0].all_gather(gathered)
        return previous

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """The module computes with the EMA weights inside the block; the live weights come back after it (also on
        an exception). Collective under ZeRO-3."""
        live = self._write(self.shadow)
        try:
            yield
        finally:
            self._write(live)

    # ---- checkpoints ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"format": EMA_FORMAT, "decay": self.decay, "start": self.start, "updates": self.updates,
                "shadow": {n: t.detach().cpu().clone() for n, t in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != EMA_FORMAT:
            raise UserError("the checkpoint's EMA state has an unknown format; it was written by another version")
        shadow = state["shadow"]
        if set(shadow) != set(self.shadow):
            missing = sorted(set(self.shadow) ^ set(shadow))[:3]
            raise UserError(f"the checkpoint's EMA covers other parameters than this model trains ({missing}…); "
                            f"resume with the same train.freeze_* settings")
        with torch.no_grad():
            for name, value in shadow.items():
                if value.shape != self.shadow[name].shape:
                    raise UserError(f"the checkpoint's EMA of {name} has shape {tuple(value.shape)}, this rank's "
                                    f"share is {tuple(self.shadow[name].shape)}; resume under the same layout")
                self.shadow[name].copy_(value)
        self.updates = int(state.get("updates", 0))


@torch.no_grad()
def gathered_value(ema: EMA, name: str, p: nn.Parameter) -> torch.Tensor:
    """The full (tensor-parallel-local) fp32 value of parameter `name` as the EMA model has it: the average for a
    trainable parameter, the live value for a frozen one. Collective over p's ZeRO-3 partition group when p is
    partitioned (every data-parallel rank must call it for the same parameters in the same order)."""
    value = ema.shadow[name] if name in ema.shadow else _local(p).float()
    if is_partitioned(p):
        value = torch.cat(collectives.all_gather(value.contiguous(), p.ds_process_group))
        value = value[:p.ds_numel].view(p.ds_shape)
    return value


@torch.no_grad()
def full_ema_state_dict(ema: EMA, dst: int = 0) -> dict[str, torch.Tensor] | None:
    """Collective over the world: {name: fp32 tensor} of the module's parameters with the EMA in place of every
    trainable one (frozen ones as they are), on global rank `dst` (None elsewhere). One parameter at a time is
    gathered (`gathered_value`), so ranks other than `dst` never hold more than one full parameter. Under tensor
    parallelism the values are this rank's shards. Buffers (BatchNorm statistics) are the live ones: take them
    from `module.state_dict()`. The trainer's checkpoints store the layout-free EMA copy instead
    (finetune/ema_store.py)."""
    out: dict[str, torch.Tensor] = {}
    mine = collectives.rank() == dst
    for name, p in ema.module.named_parameters():
        value = gathered_value(ema, name, p)
        if mine:
            out[name] = value.detach().cpu().clone()
    return out if mine else None
