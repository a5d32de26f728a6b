"""Hand memory that the C allocator keeps after frees back to the operating system (glibc's `malloc_trim`).

glibc serves allocations below its mmap threshold (128 KiB, raised up to 32 MiB after large frees) from heaps it
does not shrink when chunks in the middle are freed. Building a model allocates and frees thousands of such
tensors (DeepSpeed copies every parameter into flat buffers and drops the originals; a checkpoint save buffers and
releases slices), and the process keeps those pages resident though nothing uses them: measured at 0.4–0.5 GiB
per rank for ofa_base. Large later allocations (Adam's moments, flat gradient partitions) are mmapped separately
and cannot reuse them, so they add to the peak. `malloc_trim(0)` returns every free page of every arena.

On other C libraries (musl, macOS) there is no such call and this does nothing.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Callable, Optional


@functools.cache
def _malloc_trim() -> Optional[Callable[[int], int]]:
    try:
        libc = ctypes.CDLL(None)  # the C library this process already runs on
    except OSError:
        return None
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "malloc_trim"):
        return None  # not glibc: its malloc_trim (if any) does not release the middle of the heap
    trim = libc.malloc_trim
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_free_memory() -> bool:
    """Return the allocator's free pages to the OS; True when the C library could (glibc)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
