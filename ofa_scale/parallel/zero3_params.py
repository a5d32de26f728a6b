"""Writing a value into a parameter that DeepSpeed's ZeRO-3 may already have partitioned.

Under `deepspeed.zero.Init` a parameter holds no data (`p.data` is empty); its data-parallel partition lives in
`p.ds_tensor`. DeepSpeed's layout: the flattened tensor, padded to a multiple of the partition group's size, split
into equal consecutive pieces, piece r on group rank r. `write_local` writes this rank's piece of a full
(tensor-parallel-local) value, so initial weights, a pretrained model or a layout-free checkpoint can be loaded
into a ZeRO-3 model without any rank ever holding more than one full parameter.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_partitioned(p: torch.Tensor) -> bool:
    return getattr(p, "ds_tensor", None) is not None and hasattr(p, "ds_process_group")


def write_local(p: torch.Tensor, value: torch.Tensor) -> None:
    """p ← value (its full, TP-local shape), into p's ZeRO-3 partition when p is partitioned."""
    with torch.no_grad():
        if not is_partitioned(p):
            p.copy_(value.to(p.dtype))
            return
        if tuple(value.shape) != tuple(p.ds_shape):
            raise ValueError(f"value of shape {tuple(value.shape)} for a parameter of shape {tuple(p.ds_shape)}")
        part = p.ds_tensor
        size = part.ds_numel
        start = size * dist.get_rank(group=p.ds_process_group)
        flat = value.reshape(-1)
        n = max(0, min(size, flat.numel() - start))
        if n:
            part.narrow(0, 0, n).copy_(flat.narrow(0, start, n).to(part.dtype))
