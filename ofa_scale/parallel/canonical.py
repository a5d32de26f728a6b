"""Layout-free ("canonical") model and optimizer state: full, unsplit tensors under OFA's state-dict names.

Why our own gather instead of DeepSpeed's checkpoint tools: `zero_to_fp32` assumes tp=1, and the universal
checkpoint reshapes row-parallel weights wrongly unless every parameter is described to it. Here every parameter
knows its OFA name (pipeline layers map theirs back) and, when tensor-parallel, its split dimension, so:

* gather: fp32 master values (and Adam moments; BatchNorm statistics of data-parallel rank 0) are assembled over ZeRO's data-parallel partitions by DeepSpeed's
  `safe_get_full_*` helpers, over tensor-parallel ranks by all-gather along the split dimension (vocabulary padding
  trimmed), and over pipeline stages by gathering the per-stage dicts to global rank 0;
* load: each rank slices its shard out of the full tensors. Model weights are loaded into the freshly built module
  *before* `deepspeed.initialize` (so ZeRO partitions and the fp32 masters start from them); Adam moments and the
  step counter are loaded into the engine afterwards.

On disk (a directory, written by global rank 0, each file atomically): `model.safetensors` (fp32),
`optimizer.safetensors` (`exp_avg/<name>`, `exp_avg_sq/<name>`), `canonical.json` (format version, optimizer step,
the layout it was written from, caller's extra metadata).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

from ofa_scale.errors import UserError
from ofa_scale.utils.io import atomic_write_bytes, atomic_write_json

FORMAT_VERSION = 1
ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def unwrap(module: nn.Module) -> nn.Module:
    """The user module inside a DeepSpeed engine."""
    return getattr(module, "module", module)


def named_parameters(module: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(OFA name, parameter) for this rank's parameters, for a plain model or a pipeline stage."""
    module = unwrap(module)
    if hasattr(module, "tied_modules"):
        from ofa_scale.parallel.pipeline import pipeline_named_parameters

        yield from pipeline_named_parameters(module)
    else:
        yield from module.named_parameters()


_STAT_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def named_statistics(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(OFA name, buffer) for BatchNorm statistics: state that training changes but the optimizer does not own
    (index buffers are recomputed by the model and never saved)."""
    module = unwrap(module)
    pipeline = hasattr(module, "tied_modules")
    for name, buf in module.named_buffers():
        if name.rsplit(".", 1)[-1] in _STAT_BUFFERS:
            if pipeline:
                from ofa_scale.parallel.pipeline import to_ofa_name

                name = to_ofa_name(module, name)
            yield name, buf


def full_shapes(model_cfg: Any, model_cls=None) -> dict[str, torch.Size]:
    """Unsplit parameter shapes, from a model built on the meta device (no memory)."""
    from ofa_scale.model.layers import LayerFactory

    if model_cls is None:
        from ofa_scale.model import OFAModel as model_cls  # noqa: N813
    with torch.device("meta"):
        reference = model_cls(model_cfg, layers=LayerFactory())
    return {n: p.shape for n, p in reference.named_parameters()}


def shard(full: torch.Tensor, dim: Optional[int], tp_size: int, tp_rank: int, local_shape) -> torch.Tensor:
    """This TP rank's slice of a full tensor (zero-padded along `dim` first when the vocabulary was padded)."""
    if dim is None or tp_size == 1:
        if tuple(full.shape) != tuple(local_shape):
            raise UserError(f"checkpoint tensor of shape {tuple(full.shape)} does not fit a parameter of shape "
                            f"{tuple(local_shape)}; the checkpoint is from a different model size")
        return full
    per = local_shape[dim]
    total = per * tp_size
    if full.shape[dim] < total:
        pad_shape = list(full.shape)
        pad_shape[dim] = total - full.shape[dim]
        full = torch.cat([full, full.new_zeros(pad_shape)], dim=dim)
    return full.narrow(dim, tp_rank * per, per).clone()


def _tp_gather(local: torch.Tensor, dim: int, ctx, full_shape) -> torch.Tensor:
    parts = [torch.empty_like(local) for _ in range(ctx.tp_size)]
    dist.all_gather(parts, local.contiguous(), group=ctx.tp_group)
    full = torch.cat(parts, dim=dim)
    return full.narrow(dim, 0, full_shape[dim]).clone()  # drop vocabulary padding


def _local_values(engine_or_module, key: Optional[str]) -> dict[str, torch.Tensor]:
    """This rank's TP-local tensors (fp32 master values, or an Adam moment), full over data-parallel ranks."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    optimizer = getattr(engine_or_module, "optimizer", None)
    out = {}
    for name, p in named_parameters(engine_or_module):
        if key is None:
            value = safe_get_full_fp32_param(p)
            if value is None:
                value = p.detach()
        else:
            value = safe_get_full_optimizer_state(p, key)
            if value is None:  # no ZeRO: a plain torch optimizer holds per-parameter state
                state = getattr(optimizer, "state", {}).get(p, {})
                value = state.get(key)
                if value is None:
                    value = torch.zeros_like(p)
        out[name] = value.detach().float().reshape(p.shape if not hasattr(p, "ds_shape") else p.ds_shape).cpu()
    if key is None:  # replicated statistics; data-parallel ranks differ (no SyncBN), rank 0's are kept
        out.update({name: buf.detach().cpu().clone() for name, buf in named_statistics(engine_or_module)})
    return out


def gather_full(ctx, engine_or_module, shapes: dict[str, torch.Size], key: Optional[str] = None
                ) -> Optional[dict[str, torch.Tensor]]:
    """Full tensors under OFA names on global rank 0 (None elsewhere). Collective: every rank must call it."""
    local = _local_values(engine_or_module, key)
    split = ctx.split_params
    full = {}
    for name, value in local.items():
        dim = split.get(name)
        dim = dim if name in shapes else None
        full[name] = _tp_gather(value, dim, ctx, shapes[name]) if dim is not None and ctx.tp_size > 1 else value
    if ctx.pp_size > 1:
        if ctx.dp_rank != 0 or ctx.tp_rank != 0:
            return None
        from megatron.core import parallel_state

        group = parallel_state.get_pipeline_model_parallel_group()
        gathered = [None] * ctx.pp_size if ctx.pp_rank == 0 else None
        dist.gather_object(full, gathered, dst=dist.get_global_rank(group, 0), group=group)
        if ctx.pp_rank != 0:
            return None
        full = {}
        for part in gathered:
            full.update(part)  # the tied embedding appears on two stages with equal values
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    missing = set(shapes) - set(full)
    if missing:
        raise RuntimeError(f"canonical gather is missing {sorted(missing)[:5]}")
    return full


def load_model_weights(ctx, module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy this rank's shard of every parameter from full OFA-named tensors (call before deepspeed.initialize)."""
    split = ctx.split_params if ctx is not None else {}
    tp_size = ctx.tp_size if ctx is not None else 1
    tp_rank = ctx.tp_rank if ctx is not None else 0
    with torch.no_grad():
        for name, p in named_parameters(module):
            if name not in state:
                raise UserError(f"checkpoint has no tensor {name}; it was written for a different model")
            p.copy_(shard(state[name].to(p.dtype), split.get(name), tp_size, tp_rank, p.shape))
        for name, buf in named_statistics(module):
            if name in state:  # checkpoints written before statistics were saved simply lack them
                buf.copy_(state[name].to(buf.dtype))


def _inner_optimizer(engine):
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def optimizer_step(engine) -> int:
    inner = _inner_optimizer(engine)
    for p in _state_owners(engine, inner):
        if "step" in inner.state.get(p, {}):
            return int(inner.state[p]["step"])
    return 0


def _state_owners(engine, inner) -> list[torch.Tensor]:
    """Tensors the torch optimizer keeps state for. ZeRO-3 empties its param_groups between steps and keeps the
    flat fp32 partitions aside."""
    owners = [p for group in inner.param_groups for p in group["params"]]
    owners += [p for p in getattr(engine.optimizer, "fp32_partitioned_groups_flat", []) if p is not None]
    unique = {id(p): p for p in owners}
    return list(unique.values())


def _ensure_adam_state(engine, inner) -> None:
    """Adam creates its state at the first step; a resumed engine has taken none, so create zeros (and let ZeRO
    link each parameter's fragment of them) before writing the checkpoint's values in."""
    for p in _state_owners(engine, inner):
        st = inner.state[p]
        st.setdefault("step", torch.tensor(0.0))
        for key in ADAM_KEYS:
            if key not in st:
                st[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
    if hasattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state"):
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()


def load_optimizer_state(ctx, engine, moments: dict[str, dict[str, torch.Tensor]], step: int) -> None:
    """Set Adam moments (full OFA-named tensors per key) and the step counter in an initialised engine."""
    from deepspeed.utils import safe_set_full_optimizer_state

    inner = _inner_optimizer(engine)
    zero = hasattr(engine.optimizer, "optimizer")  # ZeRO wraps the torch optimizer
    _ensure_adam_state(engine, inner)
    for name, p in named_parameters(engine):
        dim = ctx.split_params.get(name)
        shape = p.ds_shape if hasattr(p, "ds_shape") else p.shape
        for key in ADAM_KEYS:
            value = shard(moments[key][name], dim, ctx.tp_size, ctx.tp_rank, shape).to(torch.float32)
            if zero:
                safe_set_full_optimizer_state(p, value, key)
            else:
                inner.state[p][key] = value.to(p.device).clone()
    for p in _state_owners(engine, inner):
        inner.state[p]["step"] = torch.tensor(float(step))


def save_canonical(ctx, engine, path: str | Path, shapes: dict[str, torch.Size], extra: dict | None = None,
                   model_config: Any = None) -> None:
    """Write model + Adam moments + metadata as a canonical checkpoint directory (collective call).

    `model_config` (an OFAConfig) is recorded so `ofa-convert export` can rebuild the model without the run's
    config."""
    from safetensors.torch import save as st_save

    model = gather_full(ctx, engine, shapes)
    moments = {key: gather_full(ctx, engine, shapes, key) for key in ADAM_KEYS}
    if model is None:
        return
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path / "model.safetensors", st_save({k: v.contiguous() for k, v in model.items()}))
    flat = {f"{key}/{name}": t.contiguous() for key, d in moments.items() for name, t in d.items()}
    atomic_write_bytes(path / "optimizer.safetensors", st_save(flat))
    atomic_write_json(path / "canonical.json", {
        "format_version": FORMAT_VERSION, "optimizer_step": optimizer_step(engine),
        "layout": ctx.layout.to_dict(), "extra": extra or {},
        "model": dataclasses.asdict(model_config) if model_config is not None else None})


def read_canonical(path: str | Path) -> tuple[dict, dict, dict]:
    """(model tensors, {key: moments}, metadata) of a canonical checkpoint directory."""
    from safetensors.torch import load_file

    path = Path(path)
    meta_path = path / "canonical.json"
    if not meta_path.is_file():
        raise UserError(f"{path} is not a canonical checkpoint (no canonical.json); point at the directory "
                        f"save_canonical wrote")
    meta = json.loads(meta_path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path} has canonical format version {meta.get('format_version')}, this code reads "
                        f"{FORMAT_VERSION}; convert it with the matching ofa-scale version")
    model = load_file(str(path / "model.safetensors"))
    flat = load_file(str(path / "optimizer.safetensors")) if (path / "optimizer.safetensors").is_file() else {}
    moments: dict[str, dict[str, torch.Tensor]] = {k: {} for k in ADAM_KEYS}
    for name, t in flat.items():
        key, _, pname = name.partition("/")
        moments[key][pname] = t
    return model, moments, meta

