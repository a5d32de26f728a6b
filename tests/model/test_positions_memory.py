"""The position index tables are built without table-sized temporaries (issue 8 §4): every rank builds them for the
encoder and the decoder, and at OFA's 42 image buckets the plain matrix formula held ~150 MB for a moment. Their
values are exactly the plain formula's (spec §4.4–§4.5), whose code is kept here as the reference."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from ofa_scale.model.positions import image_relative_buckets, token_relative_buckets


def plain_token_buckets(bucket_size: int, max_position: int) -> torch.Tensor:
    rel = torch.arange(max_position)[:, None] - torch.arange(max_position)[None, :]
    sign = torch.sign(rel)
    mid = bucket_size // 2
    abs_pos = torch.where((rel < mid) & (rel > -mid), torch.full_like(rel, mid - 1), rel.abs())
    log_pos = torch.ceil(torch.log(abs_pos / mid) / torch.log(torch.tensor((max_position - 1) / mid)) * (mid - 1))
    log_pos = log_pos.int() + mid
    return torch.where(abs_pos.le(mid), rel, log_pos * sign).long() + bucket_size - 1


def plain_image_buckets(bucket_size: int) -> torch.Tensor:
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


@pytest.mark.parametrize("bucket_size,max_position", [(256, 1024), (256, 2048), (256, 300), (64, 1024), (16, 64),
                                                      (8, 40)])
def test_token_buckets_equal_the_plain_formula(bucket_size, max_position):
    assert torch.equal(token_relative_buckets(bucket_size, max_position),
                       plain_token_buckets(bucket_size, max_position))


@pytest.mark.parametrize("bucket_size", [1, 2, 3, 16, 42])
def test_image_buckets_equal_the_plain_formula(bucket_size):
    assert torch.equal(image_relative_buckets(bucket_size), plain_image_buckets(bucket_size))


WORKER = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch
    from ofa_scale.model import positions

    def hwm_kib():
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])

    build = {"image": positions.image_relative_buckets, "token": positions.token_relative_buckets}[sys.argv[1]]
    # a tiny table first: whatever torch initialises lazily is not the table's cost (a full-size one would leave
    # its freed temporaries resident in glibc's heap and hide the next call's)
    build(2) if sys.argv[1] == "image" else build(8, 40)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    before = hwm_kib()
    table = build(42) if sys.argv[1] == "image" else build(256, 1024)
    print(json.dumps({"peak": (hwm_kib() - before) * 1024, "table": table.numel() * table.element_size()}))
""")


@pytest.mark.parametrize("which,limit", [("image", 1.5), ("token", 3.0)])
def test_building_a_table_holds_little_more_than_the_table(which, limit):
    """Peak RSS growth of building OFA's tables in a fresh process: the image table (25 MB) took 174 MB with the
    plain formula and takes 25 MB; the token table (8 MB) took 73 MB and takes 17 MB (table + distance index)."""
    out = subprocess.run([sys.executable, "-c", WORKER, which], capture_output=True, text=True, timeout=120,
                         check=True)
    r = json.loads(out.stdout)
    assert r["peak"] < limit * r["table"], r
