"""glibc's allocator, set for forward passes on the CPU.

A forward pass allocates tens of megabytes of activations and frees them before the next one. With
glibc's defaults, blocks that large are mapped from the kernel and unmapped again each time, so
every pass faults its activations' pages in anew: for 64 rows of the bundled model, 2,741 minor
page faults and 6.4 ms of kernel time in a 55 ms pass. Keeping freed memory in the heap for reuse
took the pass to 45 ms (bench numbers in the README). Blocks above glibc's largest mmap threshold
(32 MiB on 64-bit: big networks' activations) are still mapped each time.

The settings are process-wide; what samples calls `reuse_freed_memory()` once at start: the worker,
`edm-serve sample` and the benchmarks' in-process sampler.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1   # mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 << 20   # the most glibc accepts on 64-bit: blocks up to this come from the heap
TRIM_THRESHOLD_BYTES = 1 << 30    # free memory at the heap's top is given back beyond this only


def reuse_freed_memory() -> bool:
    """Have glibc keep freed blocks of up to 32 MiB for reuse; False where that is not possible
    (not Linux, or a C library without mallopt, e.g. musl's stub)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD,
                                                                                 TRIM_THRESHOLD_BYTES))


__all__ = ["reuse_freed_memory"]
