"""Keeping freed CPU memory in the process, so that large tensors reuse pages instead of faulting in fresh ones.

glibc hands every allocation above its mmap threshold (at most 32 MiB) fresh pages from the kernel and gives them
back on free, so each large activation of a denoising step on the CPU page-faults its way in again, zero-filled:
a million minor faults in one SD1.5 step at 256² with 4 images (benchmarks/allocator.py), 14 million at 512² with 8.
Keeping freed memory in glibc's heap instead (no mmap for allocations, no trimming of the heap's top) makes those
faults go away.
"""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
KEPT = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1))  # no mmapped allocations; trim only past 2 GiB free
OPT_OUT = "STYLEALIGNED_KEEP_FREED_MEMORY"
GLIBC_SETTINGS = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                  "GLIBC_TUNABLES")
_kept = False


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory in the process for reuse (see the module docstring); True if it now does.

    Process-wide, so the CLI calls it and a library call never does. Nothing changes where the C library is not
    glibc (macOS, musl), where STYLEALIGNED_KEEP_FREED_MEMORY=0 is set, or where the user already tuned glibc's
    allocator through its own environment variables (MALLOC_*_, GLIBC_TUNABLES). What it could cost: the
    process keeps its peak memory between steps instead of returning it (measured: no higher peak resident).
    """
    global _kept
    if os.environ.get(OPT_OUT, "1") == "0" or any(name in os.environ for name in GLIBC_SETTINGS):
        return _kept
    mallopt = _mallopt()
    _kept = _kept or (mallopt is not None and all(mallopt(parameter, value) == 1 for parameter, value in KEPT))
    return _kept


def freed_memory_kept() -> bool:
    """Whether `keep_freed_memory` took effect in this process."""
    return _kept


def _mallopt():
    """glibc's mallopt, or None under another C library."""
    try:
        libc = ctypes.CDLL(None)  # the symbols already loaded into the process, the C library's among them
        libc.gnu_get_libc_version  # glibc's own: another C library's mallopt (if any) takes other parameters
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return None
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt
