"""Resuming under a different parallel layout, through the layout-free checkpoint written next to DeepSpeed's.

DeepSpeed's own files (ZeRO partitions, pipeline layer files, per-rank RNG) only load into the layout that wrote
them. Every trainer checkpoint therefore also holds `<tag>/canonical/` (parallel/canonical.py: fp32 weights,
BatchNorm statistics and Adam moments under OFA names, each rank writing its own slices, plus the optimizer step
and the learning-rate schedule position in the index). `--resume` under the same layout loads DeepSpeed's files
(bit-exact, RNG included; pipelines too, since the shared embedding is an ordinary tied layer that DeepSpeed
saves on both end stages). Under another layout (tp, pp, dp, ZeRO stage or world size differ) every rank reads
only its slices: the weights into the freshly built module before deepspeed.initialize and the moments into the
engine afterwards. What does not carry over: the per-rank RNG streams (dropout draws after the resume differ from
an uninterrupted run; losses match exactly only without dropout) and fp16 loss-scaler state.

A trainer with `trained_only` (prompt tuning) writes a trained-only copy: the parameters that train and their
moments, nothing frozen (index extra `trained_only`); reading it, the frozen rest comes from the trainer's base first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from ofa_scale.errors import UserError

CANONICAL_DIR = "canonical"
LAYOUT_KEYS = ("tp", "pp", "dp", "zero_stage")


def same_layout(saved_layout: Optional[dict], saved_world: Optional[int], layout, world_size: int) -> bool:
    """Whether DeepSpeed's per-process files can be loaded as they are."""
    if saved_world is not None and saved_world != world_size:
        return False
    if saved_layout is None:  # checkpoints from before layouts were recorded: the world size is all we know
        return True
    return all(saved_layout.get(k) == getattr(layout, k) for k in LAYOUT_KEYS)


def canonical_dir(tag_dir: Path) -> Path:
    return Path(tag_dir) / CANONICAL_DIR


def require_canonical(tag_dir: Path, saved_layout: Optional[dict], saved_world: Optional[int]) -> None:
    from ofa_scale.parallel.canonical_store import INDEX

    if not (canonical_dir(tag_dir) / INDEX).is_file():
        raise UserError(f"{tag_dir} (written under layout {saved_layout or {}}, {saved_world} processes) holds no "
                        f"layout-free copy ({CANONICAL_DIR}/), which resuming a pipeline or changing the layout "
                        f"needs; resume with the original layout and process count (and pp=1)")


class _EngineView:
    """What parallel/canonical.py reads from an engine (`.module`, `.optimizer`), with the trainer's GroupsForward
    wrapper removed so parameter names are OFA's (`encoder.…`, not `model.encoder.…`)."""

    def __init__(self, engine):
        from ofa_scale.training.step import GroupsForward

        module = engine.module
        self.module = module.model if isinstance(module, GroupsForward) else module
        self.optimizer = engine.optimizer


class _Subset:
    """The parameters of `module` that `keep(name, parameter)` selects and no BatchNorm statistics, as
    parallel/canonical.py walks a module: a trained-only copy holds the trained parameters alone."""

    def __init__(self, module: torch.nn.Module, keep):
        self._module, self._keep = module, keep

    def named_parameters(self):
        return ((n, p) for n, p in self._module.named_parameters() if self._keep(n, p))

    def named_buffers(self):
        return iter(())


def write_canonical(ctx, engine, tag_dir: Path, model_config, step: int, lr_scheduler,
                    trained_only: bool = False) -> None:
    """Collective: every rank calls it and writes its slices into `<tag_dir>/canonical/` (`trained_only`: the
    parameters that train, their Adam moments, no frozen weight or statistic)."""
    from ofa_scale.parallel.canonical import full_shapes, save_canonical

    view = _EngineView(engine)
    if trained_only:
        view.module = _Subset(view.module, lambda _, p: p.requires_grad)
    save_canonical(ctx, view, canonical_dir(tag_dir), full_shapes(model_config),
                   extra={"step": step, "lr_schedule_step": int(lr_scheduler.last_epoch), "trained_only": trained_only},
                   model_config=model_config)


def load_canonical_weights(tag_dir: Path, ctx, model: torch.nn.Module, base=None) -> None:
    """This rank's slices of the checkpoint's weights (call before deepspeed.initialize). `base(model)`, for a
    trained-only copy, first fills the whole model (the frozen base); the copy then overwrites what it holds."""
    from ofa_scale.parallel.canonical import load_model_weights
    from ofa_scale.parallel.canonical_store import MODEL, CanonicalReader

    weights = CanonicalReader(canonical_dir(tag_dir)).view(MODEL)
    if base is not None:
        base(model)
        held = set(weights.names())
        model = _Subset(model, lambda name, _: name in held)
    load_model_weights(ctx, model, weights)


def load_canonical_optimizer(tag_dir: Path, ctx, engine, lr_scheduler) -> None:
    """This rank's slices of the Adam moments and the step counter into the engine, and the schedule back at the
    checkpoint's step."""
    from ofa_scale.parallel.canonical import load_optimizer_state
    from ofa_scale.parallel.canonical_store import CanonicalReader

    reader = CanonicalReader(canonical_dir(tag_dir))
    meta = reader.meta
    view = _EngineView(engine)
    if meta["extra"].get("trained_only"):  # frozen parameters have no moments
        view.module = _Subset(view.module, lambda _, p: p.requires_grad)
    load_optimizer_state(ctx, view, reader, meta["optimizer_step"])
    schedule_step = int(meta["extra"]["lr_schedule_step"])
    # LambdaLR: lr = base_lr × λ(step); set the position and every group's lr to what step() would have left
    lr_scheduler.last_epoch = schedule_step
    lr_scheduler._step_count = schedule_step + 1
    lrs = [base * fn(schedule_step) for base, fn in zip(lr_scheduler.base_lrs, lr_scheduler.lr_lambdas)]
    for group, lr in zip(lr_scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    lr_scheduler._last_lr = lrs
    engine.global_steps = int(meta["extra"]["step"])
