"""Host and accelerator memory of every rank, in every log line.

Host: the process's peak resident set size (`getrusage`, the kernel's high-water mark: nothing between two reads
is missed) and its current RSS. Accelerator: `torch.cuda.max_memory_allocated` where CUDA is the device. Each
step's record carries the maximum over ranks, the minimum, and the rank holding the maximum (one all-reduce of a
few CPU floats), so rank 0's metrics.jsonl and console line describe the whole job.
"""

from __future__ import annotations

import os
import resource
from typing import Optional

import torch

GIB = float(1 << 30)


def host_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def host_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return host_peak_bytes()


def accelerator_peak_bytes() -> Optional[int]:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    return None


class MemoryMeter:
    """Peaks per rank; `mark(label)` records this rank's RSS at a start-up milestone (for the profile)."""

    def __init__(self):
        self.marks: list[tuple[str, float, float]] = []  # (label, rss GiB, peak GiB)
        self.last: dict[str, float] = {}

    def mark(self, label: str) -> None:
        self.marks.append((label, host_rss_bytes() / GIB, host_peak_bytes() / GIB))

    def step_record(self) -> dict[str, float]:
        """Collective: {host_peak_gib, host_peak_gib_min, host_peak_rank, host_rss_gib, accel_peak_gib, …}."""
        from ofa_scale.parallel import collectives

        me = collectives.rank()
        host = host_peak_bytes() / GIB
        accel = accelerator_peak_bytes()
        values = [host, -host, 0.0]
        values += [accel / GIB, -(accel / GIB)] if accel is not None else [-1.0, 1.0]
        t = torch.tensor(values, dtype=torch.float64)
        # max of the peak, max of minus the peak (= -min); the rank of the maximum is recovered below
        maxed = collectives.all_reduce(t.clone(), "max")
        owner = torch.tensor([float(me) if host >= float(maxed[0]) else -1.0], dtype=torch.float64)
        owner = collectives.all_reduce(owner, "max")
        record = {"host_peak_gib": round(float(maxed[0]), 4), "host_peak_gib_min": round(-float(maxed[1]), 4),
                  "host_peak_rank": int(owner[0]), "host_rss_gib": round(host_rss_bytes() / GIB, 4)}
        if accel is not None:
            record.update(accel_peak_gib=round(float(maxed[3]), 4), accel_peak_gib_min=round(-float(maxed[4]), 4))
        self.last = record
        return record

    def summary(self) -> str:
        if not self.last:
            return ""
        text = (f"peak host memory {self.last['host_peak_gib']:.2f} GiB (rank {self.last['host_peak_rank']}), "
                f"smallest rank peak {self.last['host_peak_gib_min']:.2f} GiB")
        if "accel_peak_gib" in self.last:
            text += f"; peak accelerator memory {self.last['accel_peak_gib']:.2f} GiB"
        return text
