"""In fp32 training, let the ZeRO optimizer's "fp32 master" partitions be the parameters' own storage.

DeepSpeed's ZeRO optimizers keep a master copy of each rank's parameter partition for the optimizer to update, then
copy it back into the parameters after each step. That copy is needed when the model runs in fp16/bf16; in fp32 it
holds the same values as the parameters, so every fp32 run keeps its weights twice.

* **ZeRO-3:** DeepSpeed means to skip the copy (it reuses the parameter partition when dtype and device match), but
  it compares `tensor.device == "cuda:0"`/`"cpu"`, a torch.device against a string, which is always False (+0.54
  GiB on one process for ofa_base; measured with benchmarks/host_memory.py).
* **ZeRO-1/2** (`stage_1_and_2.py`): the master is always `parallel_partitioned_bit16_groups[i][rank].clone()`
  (`single_partition_of_fp32_groups`), whatever the dtype; no option turns it off. It costs 4 bytes per parameter
  divided by the data-parallel size.

`share_fp32_master(engine)` makes each master partition a view of the parameter partition it copies, right after
`deepspeed.initialize` and before any checkpoint is loaded. Both hold the same values at that point, the optimizer
then updates the parameters in place, and DeepSpeed's copy back becomes a copy onto itself. Everything that reads
or writes the masters (checkpoints, `safe_get_full_fp32_param`, our canonical loader) goes through the same tensor
objects, so it sees the same values as before. ZeRO-1/2 also keeps per-parameter views of its master
(`param._hp_mapping`, read by `safe_get_full_fp32_param` and the universal checkpoint); they are re-linked to the
shared storage with DeepSpeed's own `_link_all_hp_params`, as DeepSpeed does after loading a checkpoint.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _point_at(master: torch.Tensor, param: torch.Tensor) -> int:
    """master.data = param.data when they are distinct copies of the same dtype, device and shape; bytes freed."""
    if param is None or master is param or master.numel() == 0:
        return 0
    if master.dtype != param.dtype or master.device != param.device or master.shape != param.shape:
        return 0
    if master.untyped_storage().data_ptr() == param.untyped_storage().data_ptr():
        return 0
    # The optimizer's param_groups and state are keyed by this tensor object; only its storage changes.
    master.data = param.data
    return master.numel() * master.element_size()


def share_fp32_master(engine) -> int:
    """Point every ZeRO fp32 master partition at its parameter partition when both are the same dtype and device
    (fp32 training, no optimizer offload). Returns the bytes freed (0 when nothing applies)."""
    optimizer = getattr(engine, "optimizer", None)
    if getattr(optimizer, "offload_optimizer", False) or getattr(optimizer, "cpu_offload", False):
        return 0
    if hasattr(optimizer, "single_partition_of_fp32_groups"):
        return _share_stage_1_and_2(optimizer)
    masters = getattr(optimizer, "fp32_partitioned_groups_flat", None)
    params = getattr(optimizer, "fp16_partitioned_groups_flat", None)
    if masters is None or params is None:
        return 0
    return sum(_point_at(master, param) for master, param in zip(masters, params))


def _share_stage_1_and_2(optimizer) -> int:
    freed = 0
    for i, master in enumerate(optimizer.single_partition_of_fp32_groups):
        partition_id = dist.get_rank(group=optimizer.real_dp_process_group[i])
        freed += _point_at(master, optimizer.parallel_partitioned_bit16_groups[i][partition_id])
    if freed:  # the per-parameter fragments still view the old copy (and would keep it alive)
        optimizer._link_all_hp_params()
        optimizer._hp_optimizer_states_linked = False  # new fragments: link Adam's state to them again when needed
    return freed
