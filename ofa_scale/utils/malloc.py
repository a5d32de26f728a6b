"""Keep freed memory from staying resident in the C allocator (glibc): `bound_heap_growth` at start-up,
`release_free_memory` after phases that free a lot.

**Why the heap grows.** glibc serves a request below its mmap threshold from heaps it does not shrink when chunks
in the middle are freed, and larger ones as separate mappings that go back to the OS on free. The threshold starts
at 128 KiB but is dynamic: each time a mapped chunk is freed, it rises to that chunk's size (up to 32 MiB). After
the first freed tensor of a few MiB, every tensor below that size comes from the heap: ZeRO-3's gathered
parameters and full-size gradients, the reduce buckets, activations. They are allocated and freed in a different
order every micro-batch, the heap fragments, and its free pages stay resident. Measured on a 2-rank ZeRO-3
`ofa_base` rank after three steps (glibc's `mallinfo2`): a 1.66 GiB heap with 0.33 GiB in use; a `malloc_trim`
at every phase (forward, backward, step) only lowers the peak from 3.60 to 3.16 GiB, because one forward already
fragments it.

`bound_heap_growth()` sets the threshold explicitly (`mallopt(M_MMAP_THRESHOLD)`, which also turns the dynamic
adjustment off), at glibc's own starting value: every block of 128 KiB or more is its own mapping and is returned
when freed, so the process's RSS follows what it really holds (that rank: 2.56 GiB; one process of the same run
4.04 -> 3.55 GiB). The price is that each new large block is fresh, zeroed pages: that 2-rank run took 83 CPU
seconds against 68 (benchmarks/host_memory.py, start-up included), and an activation-heavy CPU step
(benchmarks/model_step.py --clock cpu --threads 1, ofa_tiny, batch 8, 256 px, with MALLOC_MMAP_THRESHOLD_=131072
against without) 5.3 s against 4.0 s. On a GPU the host allocates little per step and neither effect matters.
The trainer applies it under ZeRO-3, whose point is memory per rank (`train.host_heap`, training/trainer.py
`bounds_heap`).

`release_free_memory()` (`malloc_trim(0)`) returns every free page of every heap: what small allocations (Python
objects, < 128 KiB tensors) left behind after the build, `deepspeed.initialize` or a checkpoint save.

On other C libraries (musl, macOS) there are no such calls and both do nothing.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Optional

M_MMAP_THRESHOLD = -3  # glibc's <malloc.h>
MMAP_THRESHOLD = 128 << 10  # glibc's starting value (DEFAULT_MMAP_THRESHOLD_MIN)


@functools.cache
def _glibc() -> Optional[ctypes.CDLL]:
    try:
        libc = ctypes.CDLL(None)  # the C library this process already runs on
    except OSError:
        return None
    if not all(hasattr(libc, name) for name in ("gnu_get_libc_version", "malloc_trim", "mallopt")):
        return None  # not glibc: its malloc_trim (if any) does not release the middle of the heap
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    libc.malloc_trim.restype = ctypes.c_int
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return libc


def bound_heap_growth(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at `threshold` bytes for the rest of the process (module docstring); True when
    the C library took it."""
    libc = _glibc()
    return libc is not None and libc.mallopt(M_MMAP_THRESHOLD, threshold) == 1


def release_free_memory() -> bool:
    """Return the allocator's free pages to the OS; True when the C library could (glibc)."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
