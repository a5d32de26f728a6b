"""Run a test's per-rank function on forked processes (gloo over TCP), for tests that compare a few tensors rather
than whole training runs (those go through parallel_launch.launch)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.multiprocessing as mp

from parallel_launch import _free_port


def run_forked(worker: Callable, world: int, out_dir: Path, *args) -> list:
    """Call `worker(rank, port, str(out_dir), *args)` on `world` forked processes; the worker initialises the gloo
    group at tcp://127.0.0.1:port and saves its result to out_dir/rank{rank}.pt. Returns the results, rank order."""
    # fork: the ranks inherit the imported modules instead of importing torch and megatron again (seconds each)
    import megatron.core.tensor_parallel  # noqa: F401

    mp.start_processes(worker, args=(_free_port(), str(out_dir), *args), nprocs=world, join=True,
                       start_method="fork")
    return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world)]
