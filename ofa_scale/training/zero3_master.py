"""Under ZeRO-3 in fp32, let the optimizer's "fp32 master" partitions be the parameter partitions themselves.

DeepSpeed's stage-3 optimizer keeps a master copy of each rank's parameter partition for the optimizer to update,
then copies it back into the parameters after each step. That copy is needed when the model runs in fp16/bf16. In
fp32 DeepSpeed means to skip it (it reuses the parameter partition when dtype and device match), but it compares
`tensor.device == "cuda:0"`/`"cpu"`, a torch.device against a string, which is always False, so every fp32 run
holds its fp32 weights twice (+0.54 GiB on one process for ofa_base; measured with benchmarks/host_memory.py).

`share_fp32_master(engine)` makes each master partition a view of the parameter partition it copies, right after
`deepspeed.initialize` and before any checkpoint is loaded. Both hold the same values at that point, the optimizer
then updates the parameters in place, and DeepSpeed's copy back becomes a copy onto itself. Everything that reads
or writes the masters (checkpoints, `safe_get_full_fp32_param`, our canonical loader) goes through the same tensor
objects, so it sees the same values as before.
"""

from __future__ import annotations


def share_fp32_master(engine) -> int:
    """Point every ZeRO-3 fp32 master partition at its parameter partition when both are the same dtype and
    device (fp32 training, no optimizer offload). Returns the bytes freed (0 when nothing applies)."""
    optimizer = getattr(engine, "optimizer", None)
    masters = getattr(optimizer, "fp32_partitioned_groups_flat", None)
    params = getattr(optimizer, "fp16_partitioned_groups_flat", None)
    if masters is None or params is None or getattr(optimizer, "offload_optimizer", False):
        return 0
    freed = 0
    for master, param in zip(masters, params):
        if param is None or master is param or master.numel() == 0:
            continue
        if master.dtype != param.dtype or master.device != param.device or master.shape != param.shape:
            continue
        if master.untyped_storage().data_ptr() == param.untyped_storage().data_ptr():
            continue
        freed += master.numel() * master.element_size()
        # The optimizer's param_groups and state are keyed by this tensor object; only its storage changes.
        master.data = param.data
    return freed
