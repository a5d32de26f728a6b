"""Layout-free ("canonical") model and optimizer state, saved in slices by every rank and read back in slices
under any layout. The files and the index are parallel/canonical_store.py's.

Why our own format instead of DeepSpeed's tools: `zero_to_fp32` assumes tp=1, and the universal checkpoint
reshapes row-parallel weights wrongly unless every parameter is described to it. Here every parameter knows its OFA
name (pipeline layers map theirs back) and, when tensor-parallel, its split dimension.

Save (`save_canonical`, collective):
* every rank lists the pieces it can produce: the whole tensor of a replicated parameter, the slice along the split
  dimension of a tensor-parallel one (vocabulary padding trimmed), the BatchNorm statistics on data-parallel rank 0
  (data-parallel ranks' statistics differ without SyncBN; rank 0's are kept);
* the lists are exchanged (a few hundred names per rank) and every piece gets one owner among the ranks that hold
  it, balancing bytes (`assign_owners`): a replicated tensor is written once, by one of the tp × dp ranks (× the two
  pipeline stages of the tied embedding) that hold it, so writing is spread over the whole world;
* parameter by parameter, the fp32 master value and the two Adam moments are fetched (under ZeRO with DeepSpeed's
  `safe_get_full_*`, an all-gather over the data-parallel group, so every data-parallel rank fetches every
  parameter it holds and only the owner keeps it) and the owner queues them in its `ShardWriter`;
* every rank writes its own `rank-XXXXX-NNN.safetensors`; global rank 0 gathers the piece lists and writes
  `index.json` last.

Load: each rank reads only the slice of each of its parameters it needs (`load_model_weights` before
`deepspeed.initialize`, so ZeRO partitions and the fp32 masters start from it; `load_optimizer_state` afterwards).

Memory peak per rank (beyond its own training state): saving, one parameter's tensor-parallel-local fp32 value
(gathered over data-parallel ranks under ZeRO), plus the writer's buffer — the rank's owned share of weights and
moments, at most `chunk_bytes` (256 MiB) plus one tensor (safetensors writes the file from the tensors). Loading,
one parameter's tensor-parallel-local slice (under ZeRO every data-parallel rank reads the same slice and keeps its
partition). No rank ever holds the full model with its Adam moments.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Union

import torch
from torch import nn

from ofa_scale.errors import UserError
from ofa_scale.parallel.zero3_params import write_local
from ofa_scale.parallel import collectives
from ofa_scale.parallel.canonical_store import (ADAM_KEYS, CHUNK_BYTES, INDEX, KINDS, MODEL, CanonicalReader,
                                                FullTensors, ShardWriter, TensorView, entry, write_index)

TensorSource = Union[TensorView, FullTensors]


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
    """Unsplit shapes of the parameters and BatchNorm statistics, from a model built on the meta device."""
    from ofa_scale.model.layers import LayerFactory

    if model_cls is None:
        from ofa_scale.model import OFAModel as model_cls  # noqa: N813
    with torch.device("meta"):
        reference = model_cls(model_cfg, layers=LayerFactory())
    shapes = {n: p.shape for n, p in reference.named_parameters()}
    shapes.update({n: b.shape for n, b in named_statistics(reference)})
    return shapes


# ---- which slice a rank holds ------------------------------------------------------------------------------------
def _slot(ctx, name: str, local_shape, full_shape) -> tuple[Optional[int], int, int]:
    """(split dim or None, offset, length) of this rank's slice of a parameter, vocabulary padding excluded."""
    dim = ctx.split_params.get(name) if ctx is not None and ctx.tp_size > 1 else None
    if dim is None:
        if tuple(local_shape) != tuple(full_shape):
            raise UserError(f"checkpoint tensor {name} has shape {tuple(full_shape)} but the parameter has "
                            f"{tuple(local_shape)}; the checkpoint is from a different model size")
        return None, 0, 0
    per = local_shape[dim]
    others_match = all(a == b for d, (a, b) in enumerate(zip(local_shape, full_shape)) if d != dim)
    if len(local_shape) != len(full_shape) or not others_match or not per * (ctx.tp_size - 1) < full_shape[dim] \
            <= per * ctx.tp_size:
        raise UserError(f"checkpoint tensor {name} of shape {tuple(full_shape)} cannot be split {ctx.tp_size} ways "
                        f"into slices of shape {tuple(local_shape)}; the checkpoint is from a different model size")
    offset = ctx.tp_rank * per
    return dim, offset, max(0, min(per, full_shape[dim] - offset))


def _param_shape(p: torch.Tensor) -> torch.Size:
    return p.ds_shape if hasattr(p, "ds_shape") else p.shape  # ZeRO-3 keeps the real shape aside


def assign_owners(holdings: list[list[tuple[str, int, int]]]) -> dict[tuple[str, int], int]:
    """{(tensor name, offset): owning rank} from every rank's [(name, offset, bytes)]. Greedy by size, each piece
    to the least-loaded rank that holds it (ties to the lowest rank): deterministic, so every rank computes the same
    answer from the same lists."""
    holders: dict[tuple[str, int], list[int]] = {}
    size: dict[tuple[str, int], int] = {}
    for rank, pieces in enumerate(holdings):
        for name, offset, nbytes in pieces:
            holders.setdefault((name, offset), []).append(rank)
            size[(name, offset)] = nbytes
    load = [0] * len(holdings)
    owners = {}
    for key in sorted(holders, key=lambda k: (-size[k], k)):
        rank = min(holders[key], key=lambda r: (load[r], r))
        owners[key] = rank
        load[rank] += size[key]
    return owners


# ---- fp32 values -------------------------------------------------------------------------------------------------
def _inner_optimizer(engine):
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def fetch_is_collective(p: torch.Tensor) -> bool:
    """Under ZeRO the fp32 master and moments of a parameter are partitioned: fetching them is an all-gather."""
    return hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")


def fp32_value(p: torch.Tensor, kind: str = MODEL, optimizer=None) -> torch.Tensor:
    """The full (tensor-parallel-local) fp32 master value or Adam moment of a parameter. Collective over the
    data-parallel group under ZeRO (see `fetch_is_collective`)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if kind == MODEL:
        value = safe_get_full_fp32_param(p)
        if value is None and hasattr(p, "ds_tensor"):
            # a frozen parameter (finetuning's train.freeze_*) has no fp32 master: gather its ZeRO-3 partitions
            value = torch.cat(collectives.all_gather(p.ds_tensor.detach().contiguous(), p.ds_process_group))
            value = value[:p.ds_numel]
        elif value is None:
            value = p.detach()
    else:
        value = safe_get_full_optimizer_state(p, kind)
        if value is None:  # no ZeRO: a plain torch optimizer holds per-parameter state
            state = getattr(optimizer, "state", {}).get(p, {}) if optimizer is not None else {}
            value = state.get(kind)
            if value is None:  # before the first step
                value = torch.zeros(_param_shape(p))
    return value.detach().float().reshape(_param_shape(p))  # left on its device: only the owner copies it out


# ---- save -------------------------------------------------------------------------------------------------------
def optimizer_step(engine) -> int:
    inner = _inner_optimizer(engine)
    for p in _state_owners(engine, inner):
        if "step" in inner.state.get(p, {}):
            return int(inner.state[p]["step"])
    return 0


def save_canonical(ctx, engine, path: str | Path, shapes: dict[str, torch.Size], extra: dict | None = None,
                   model_config: Any = None, chunk_bytes: int = CHUNK_BYTES) -> dict[str, int]:
    """Write weights, BatchNorm statistics, Adam moments and metadata as a canonical checkpoint directory.
    Collective: every rank calls it and writes its own slices (module docstring). `model_config` (an OFAConfig) is
    recorded so `ofa-convert export` can rebuild the model without the run's config. Returns this rank's
    {"bytes_written", "peak_buffered"}."""
    path = Path(path)
    rank = collectives.rank()
    if rank == 0:
        (path / INDEX).unlink(missing_ok=True)  # a stale index must not vouch for the files being rewritten
    params = []
    for name, p in named_parameters(engine):
        if name not in shapes:
            raise UserError(f"parameter {name} is not in the model the checkpoint describes")
        params.append((name, p, *_slot(ctx, name, _param_shape(p), shapes[name])))
    stats = list(named_statistics(engine)) if (ctx is None or ctx.dp_rank == 0) else []
    for name, buf in stats:
        _slot(None, name, buf.shape, shapes[name])  # statistics are never split; a mismatch is another model
    # bytes of weights + moments per piece, to balance the owners
    mine = [(name, offset, 4 * len(KINDS) * math.prod(shapes[name]) * (1 if dim is None else length)
             // (1 if dim is None else shapes[name][dim])) for name, _, dim, offset, length in params]
    mine += [(name, 0, buf.numel() * buf.element_size()) for name, buf in stats]
    owners = assign_owners(collectives.all_gather_object(mine))

    optimizer = _inner_optimizer(engine)
    writer = ShardWriter(path, rank, chunk_bytes)
    for name, p, dim, offset, length in params:
        own = owners[(name, offset)] == rank
        if not own and not fetch_is_collective(p):
            continue
        for kind in KINDS:
            value = fp32_value(p, kind, optimizer)
            if own:
                if dim is not None:
                    value = value.narrow(dim, 0, length)
                writer.add(entry(kind, name), value, shapes[name], dim, offset)
    for name, buf in stats:
        if owners[(name, 0)] == rank:
            writer.add(entry(MODEL, name), buf, shapes[name])
    pieces = writer.close()
    gathered = collectives.gather_object(pieces, 0)
    if rank == 0:
        write_index(path, gathered, {
            "optimizer_step": optimizer_step(engine), "layout": ctx.layout.to_dict() if ctx is not None else None,
            "extra": extra or {}, "model": dataclasses.asdict(model_config) if model_config is not None else None})
    return {"bytes_written": writer.bytes_written, "peak_buffered": writer.peak_buffered}


# ---- load -------------------------------------------------------------------------------------------------------
def _source(tensors: Union[TensorSource, Mapping[str, torch.Tensor]]) -> TensorSource:
    return tensors if isinstance(tensors, (TensorView, FullTensors)) else FullTensors(tensors)


def _read_slice(ctx, source: TensorSource, name: str, local_shape) -> torch.Tensor:
    """This rank's slice of tensor `name` (zero rows where the vocabulary is padded)."""
    if name not in source:
        raise UserError(f"checkpoint has no tensor {name}; it was written for a different model")
    dim, offset, _ = _slot(ctx, name, local_shape, source.shape(name))
    if dim is None:
        return source.read(name)
    return source.read(name, dim, offset, local_shape[dim])


def load_model_weights(ctx, module: nn.Module, state: Union[TensorSource, Mapping[str, torch.Tensor]]) -> None:
    """Copy this rank's slice of every parameter, and the BatchNorm statistics, into `module` (call before
    deepspeed.initialize). `state`: full tensors by OFA name, or a reader's view (`CanonicalReader.view("model")`)."""
    source = _source(state)
    with torch.no_grad():
        for name, p in named_parameters(module):
            # write_local: into this rank's ZeRO-3 partition when the model was built under zero.Init
            write_local(p, _read_slice(ctx, source, name, _param_shape(p)))
        for name, buf in named_statistics(module):
            if name in source:  # checkpoints written before statistics were saved simply lack them
                buf.copy_(source.read(name).to(buf.dtype))


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


def load_optimizer_state(ctx, engine, moments: Union[CanonicalReader, Mapping[str, Mapping[str, torch.Tensor]]],
                         step: int) -> None:
    """Set Adam moments and the step counter in an initialised engine, reading only this rank's slices.
    `moments`: a reader, or {Adam key: full tensors by OFA name}."""
    from deepspeed.utils import safe_set_full_optimizer_state

    sources = {k: moments.view(k) if isinstance(moments, CanonicalReader) else FullTensors(moments[k])
               for k in ADAM_KEYS}
    inner = _inner_optimizer(engine)
    zero = hasattr(engine.optimizer, "optimizer")  # ZeRO wraps the torch optimizer
    _ensure_adam_state(engine, inner)
    for name, p in named_parameters(engine):
        for key in ADAM_KEYS:
            value = _read_slice(ctx, sources[key], name, _param_shape(p)).to(torch.float32)
            if zero:
                safe_set_full_optimizer_state(p, value, key)
            else:
                inner.state[p][key] = value.to(p.device).clone()
    for p in _state_owners(engine, inner):
        inner.state[p]["step"] = torch.tensor(float(step))
