"""DataLoader worker processes: deaf to the job's stop signals, dead with the process that started them.

Slurm and the deepspeed launcher signal every process of a job, workers included. torch's workers die of SIGTERM
from anyone but their parent, and the trainer then fails with "DataLoader worker ... killed by signal" instead
of checkpointing. So workers ignore the stop signals: the trainer handles them, and when it finishes, its
DataLoader ends the workers. A trainer killed outright (SIGKILL, OOM killer) cannot end them, and a worker busy
in a long decode, or blocked writing a batch nobody reads, would stay alive holding its memory; on Linux the
kernel kills a worker when its parent dies (PR_SET_PDEATHSIG). The kernel means the parent *thread*: iterate the
loader from a thread that outlives its workers (the trainer's main thread does).
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
from typing import Iterator

# What a job's supervisor sends to stop or preempt it; the trainer's own handlers decide what they mean.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


@contextlib.contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """Hold the stop signals pending while workers are forked, so none arrives before a worker ignores them.

    The calling thread receives what arrived once the block ends; forked workers inherit the block and drop
    what is pending by ignoring the signals first (init_worker)."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def worker_parent_pid() -> int | None:
    """The pid workers will have as parent, when known: with forkserver their parent is the fork server."""
    method = multiprocessing.get_start_method(allow_none=True) or multiprocessing.get_all_start_methods()[0]
    return os.getpid() if method in ("fork", "spawn") else None


def init_worker(parent_pid: int | None, worker_id: int) -> None:
    """DataLoader worker_init_fn (bind `parent_pid` from worker_parent_pid() in the parent)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    if sys.platform.startswith("linux"):
        _die_with_parent(parent_pid)


def _die_with_parent(parent_pid: int | None) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return  # not fatal: torch's worker still polls for its parent between batches
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(0)  # the parent died between the fork and the prctl: the kernel will not signal this worker
