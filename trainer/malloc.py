"""The host allocator setting for CPU training: keep freed memory instead of re-faulting it every step.

glibc's malloc gives blocks above its mmap threshold a fresh mmap and unmaps them on free, and it returns
the top of its heap to the OS once more than the trim threshold is free there. Both thresholds start low
and move with the workload, so a CPU training step keeps handing memory back and taking it again: the
kernel zeroes new 4 KiB pages every step (BERT-base, seq 128, micro 8, ZeRO-2 bf16: 374,000 faults, 1.5 GB
per step here).

The setting (mallopt): M_MMAP_THRESHOLD = 32 MiB, glibc's ceiling, fixed so that every block up to 32 MiB
comes from the heap, and M_TRIM_THRESHOLD = -1, so the heap is never shrunk and its freed blocks are reused.
Blocks above 32 MiB still get their own mmap (and their faults): turning mmap off altogether (M_MMAP_MAX = 0)
removed every fault, but DeepSpeed allocates two mostly untouched 2e8-element reduce buckets per step and,
with batches of varying size (unpadding), each step's buckets no longer fit the previous step's hole: the
heap grew by 381 MB of address space per step until fork() of a DataLoader worker failed with ENOMEM
(tests/test_malloc.py keeps that from coming back). Price of the setting: resident memory stays at the run's peak.
GPU runs do not need it: device memory has torch's caching allocator.
"""

from __future__ import annotations

import ctypes
from typing import Optional

# glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling on 64-bit (4 MiB * sizeof(long))


def _glibc() -> Optional[ctypes.CDLL]:
    """The process's C library if it is glibc (musl and others have no tunable mallopt)."""
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None


def _mallopt(libc: ctypes.CDLL, *settings: tuple[int, int]) -> bool:
    return all(libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) == 1 for param, value in settings)


def keep_freed_memory() -> bool:
    """Reuse freed blocks up to 32 MiB instead of returning them to the OS (see the module docstring).
    True if applied."""
    libc = _glibc()
    return libc is not None and _mallopt(libc, (M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX), (M_TRIM_THRESHOLD, -1))
