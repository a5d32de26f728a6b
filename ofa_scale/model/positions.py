"""OFA's position index tables (spec §4.4–§4.6): bucketed relative distances and patch position ids.

All are deterministic functions of the config; the model registers them as buffers (`token_rp_bucket`,
`image_rp_bucket`, `image_position_idx`) because the released state dict names them, but they are always
recomputed, never loaded.
"""

from __future__ import annotations

import torch


def token_relative_buckets(bucket_size: int = 256, max_position: int = 1024) -> torch.Tensor:
    """(max_position, max_position) int64 table index for query i, key j.

    |i-j| <= bucket_size/2 keeps the exact distance; beyond it the distance is log-bucketed up to max_position-1.
    Index = bucket + bucket_size - 1 (0 … 2·bucket_size-2). Computed in float32 like OFA, so the rounding matches.
    """
    rel = torch.arange(max_position)[:, None] - torch.arange(max_position)[None, :]
    sign = torch.sign(rel)
    mid = bucket_size // 2
    # distances inside the exact band get a dummy value so the log below stays finite
    abs_pos = torch.where((rel < mid) & (rel > -mid), torch.full_like(rel, mid - 1), rel.abs())
    log_pos = torch.ceil(torch.log(abs_pos / mid) / torch.log(torch.tensor((max_position - 1) / mid)) * (mid - 1))
    log_pos = log_pos.int() + mid
    bucket = torch.where(abs_pos.le(mid), rel, log_pos * sign).long()
    return bucket + bucket_size - 1


def image_relative_buckets(bucket_size: int = 42) -> torch.Tensor:
    """(bucket_size²+1, bucket_size²+1) int64 table index between two patch position ids.

    Id p = r·bucket_size + c + 1; index = (Δr + bs-1)·(2bs-1) + (Δc + bs-1). Id 0 (decoder bos) is special:
    row 0 -> n-3, column 0 -> n-2, (0,0) -> n-1 where n = (2bs-1)²+3.
    """
    n = (2 * bucket_size - 1) ** 2 + 3
    rows = torch.arange(bucket_size).repeat_interleave(bucket_size)
    cols = torch.arange(bucket_size).repeat(bucket_size)
    d_row = rows[:, None] - rows[None, :] + bucket_size - 1
    d_col = cols[:, None] - cols[None, :] + bucket_size - 1
    table = torch.zeros(bucket_size**2 + 1, bucket_size**2 + 1, dtype=torch.long)
    table[1:, 1:] = d_row * (2 * bucket_size - 1) + d_col
    table[0, :] = n - 3
    table[:, 0] = n - 2
    table[0, 0] = n - 1
    return table


def patch_position_ids(height: int, width: int, bucket_size: int = 42) -> torch.Tensor:
    """(height·width,) row-major ids r·bucket_size + c + 1 of an image feature grid (stride fixed at 42)."""
    rows = torch.arange(height)[:, None] * bucket_size
    cols = torch.arange(width)[None, :]
    return (rows + cols + 1).reshape(-1)


def code_position_ids(code_grid_size: int = 16, bucket_size: int = 42, tail: int = 769) -> torch.Tensor:
    """Decoder code-mode ids: [0 (bos)] + grid ids + [1024]·tail (1026 entries for a 16×16 grid)."""
    grid = patch_position_ids(code_grid_size, code_grid_size, bucket_size)
    return torch.cat([torch.zeros(1, dtype=torch.long), grid, torch.full((tail,), 1024, dtype=torch.long)])
