"""Every collective the project issues goes through this module (tests/parallel/test_collectives_policy.py fails if
a `torch.distributed` collective is called anywhere else in `ofa_scale/`).

Policy (docs/interfaces.md §7): the default process group is created *here*, before DeepSpeed, with one backend per
device type: `gloo` on CPU-only machines, `cpu:gloo,cuda:nccl` where CUDA is the accelerator. DeepSpeed's
`init_distributed` and megatron-core's `parallel_state` reuse that group and inherit its backends for every
subgroup, so a collective on a CPU tensor (the stop flag, loss denominators, metric sums, checkpoint gathers) goes
through gloo and one on a CUDA tensor (ZeRO, TP, pipeline traffic) goes through NCCL. Each function checks that
its tensor's device type has a backend in the group, so a tensor that NCCL would reject fails here, on CPU
machines too, with a message naming the device — rather than on the first GPU step of a cluster job.

Small bookkeeping values (flags, counts, metric sums) are therefore kept on the CPU on purpose: they never need a
host↔device copy, and their reductions cannot stall behind the NCCL stream of the gradient traffic.
"""

from __future__ import annotations

import datetime
import os
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

# device type -> backend; the order is the spec's order ("cpu:gloo,cuda:nccl")
_BACKENDS = {"cpu": "gloo", "cuda": "nccl", "xpu": "xccl", "hpu": "hccl"}

# tensors handed to collectives since the last `start_recording()` (device type, op); tests read this
_recorded: Optional[list[tuple[str, str]]] = None


def backend_for(device_type: str) -> str:
    """The default group's backend string for an accelerator type: 'gloo' for 'cpu', 'cpu:gloo,cuda:nccl' for
    'cuda' (CPU tensors keep a backend on every machine)."""
    if device_type == "cpu":
        return "gloo"
    if device_type not in _BACKENDS:
        raise ValueError(f"no collective backend is known for device type {device_type!r}; "
                         f"known: {', '.join(_BACKENDS)}")
    return f"cpu:gloo,{device_type}:{_BACKENDS[device_type]}"


def device_types(backend: str) -> set[str]:
    """Device types a backend string serves: 'gloo' -> {'cpu'}, 'cpu:gloo,cuda:nccl' -> {'cpu', 'cuda'}."""
    out = set()
    for part in backend.lower().split(","):
        if ":" in part:
            out.add(part.split(":", 1)[0].strip())
        else:
            out.update({"gloo": {"cpu"}, "nccl": {"cuda"}, "xccl": {"xpu"}, "hccl": {"hpu"},
                        "mpi": {"cpu", "cuda"}}.get(part.strip(), {part.strip()}))
    return out


def init_default_group(device_type: str, timeout_minutes: float = 30.0) -> None:
    """Create the default process group with `backend_for(device_type)` from the launcher's environment (RANK,
    WORLD_SIZE, MASTER_ADDR, MASTER_PORT), unless one exists. Call before `deepspeed.init_distributed`."""
    if dist.is_initialized():
        return
    kwargs: dict[str, Any] = dict(backend=backend_for(device_type), init_method="env://",
                                  timeout=datetime.timedelta(minutes=timeout_minutes),
                                  rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    dist.init_process_group(**kwargs)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def group_rank_to_global(group, group_rank: int) -> int:
    return dist.get_global_rank(group, group_rank) if group is not None else group_rank


# ---- recording (for tests of the policy) -----------------------------------------------------------------------
def start_recording() -> None:
    global _recorded
    _recorded = []


def stop_recording() -> list[tuple[str, str]]:
    global _recorded
    out, _recorded = list(_recorded or []), None
    return out


def _check(t: torch.Tensor, op: str, group) -> None:
    backend = str(dist.get_backend(group)) if is_distributed() else "gloo"
    served = device_types(backend)
    if t.device.type not in served:
        raise RuntimeError(f"{op} on a {t.device.type} tensor, but the process group's backend {backend!r} serves "
                           f"only {sorted(served)} tensors; keep the tensor on one of those devices")
    if _recorded is not None:
        _recorded.append((t.device.type, op))


_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


# ---- tensor collectives ----------------------------------------------------------------------------------------
def all_reduce(t: torch.Tensor, op: str = "sum", group=None) -> torch.Tensor:
    """In-place all-reduce of `t` over `group` (no-op without a process group); returns `t`."""
    if not is_distributed():
        return t
    _check(t, f"all_reduce({op})", group)
    dist.all_reduce(t, op=_OPS[op], group=group)
    return t


def all_gather(t: torch.Tensor, group=None) -> list[torch.Tensor]:
    """Every group member's `t` (same shape everywhere), in group-rank order."""
    if not is_distributed():
        return [t]
    _check(t, "all_gather", group)
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return parts


def broadcast(t: torch.Tensor, src: int = 0, group=None) -> torch.Tensor:
    """In-place broadcast from global rank `src`."""
    if not is_distributed():
        return t
    _check(t, "broadcast", group)
    dist.broadcast(t, src=src, group=group)
    return t


def any_rank(flag: bool, group=None) -> bool:
    """True on every rank when `flag` is true on at least one (a CPU tensor: gloo serves it under NCCL jobs)."""
    t = torch.tensor([1.0 if flag else 0.0])
    return bool(all_reduce(t, "max", group).item() > 0)


# ---- object collectives (pickled; small values only) ------------------------------------------------------------
def _object_check(op: str, group) -> None:
    # object collectives pickle into a byte tensor on the group's preferred device; with a cpu:gloo entry in
    # the backend that is the CPU
    if _recorded is not None:
        _recorded.append(("object", op))


def broadcast_object(obj: Any, src: int = 0, group=None) -> Any:
    if not is_distributed():
        return obj
    _object_check("broadcast_object", group)
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def all_gather_object(obj: Any, group=None) -> list[Any]:
    if not is_distributed():
        return [obj]
    _object_check("all_gather_object", group)
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def gather_object(obj: Any, dst_group_rank: int = 0, group=None) -> Optional[list[Any]]:
    """The list of every member's `obj` on the member with group rank `dst_group_rank`; None elsewhere."""
    if not is_distributed():
        return [obj]
    _object_check("gather_object", group)
    me = dist.get_rank(group)
    out: Optional[list[Any]] = [None] * dist.get_world_size(group) if me == dst_group_rank else None
    dist.gather_object(obj, out, dst=group_rank_to_global(group, dst_group_rank), group=group)
    return out


def barrier(group=None) -> None:
    if is_distributed():
        if _recorded is not None:
            _recorded.append(("none", "barrier"))
        dist.barrier(group=group)


def reduce_sum_list(values: Sequence[float], group=None) -> list[float]:
    """Sums of a few floats over the group, in one all-reduce (float64 on the CPU)."""
    t = torch.tensor(list(values), dtype=torch.float64)
    return [float(v) for v in all_reduce(t, "sum", group)]
