"""The host allocator for CPU training: keep freed memory instead of re-faulting it every step.

glibc's malloc gives blocks above its mmap threshold (32 MiB at most) a fresh mmap and unmaps them on free.
DeepSpeed allocates such blocks every step (ZeRO: two 2e8-element reduce buckets per micro step, the fp32
gradient partition, fp64 copies for the gradient norm), so the kernel zeroes ~160,000 new 4 KiB pages per
BERT-base step and the engine's step took 45-77% longer than a plain loop (README, Benchmarks).

1. tcmalloc (gperftools; Debian `libtcmalloc-minimal4`, conda `gperftools`) when installed: `preload_tcmalloc()`
   re-executes the command with it in LD_PRELOAD (an allocator must be in place before the interpreter starts)
   and TCMALLOC_RELEASE_RATE=0, so freed pages are kept and reused: 0 page faults per step, engine overhead
   within noise of the plain loop. Launchers call it first thing; BERT_HOST_MALLOC=glibc opts out.
2. Otherwise glibc, tuned by `keep_freed_memory()` (mallopt): M_MMAP_THRESHOLD = 32 MiB, glibc's ceiling, so
   every block up to 32 MiB comes from the heap, and M_TRIM_THRESHOLD = -1, so the heap is never shrunk.
   Blocks above 32 MiB still get their own mmap (and their faults). Turning mmap off altogether (M_MMAP_MAX = 0)
   removed every fault, but with batches of varying size (unpadding) each step's barely touched reduce buckets
   no longer fit the previous step's hole: the heap grew by 381 MB of address space per step until fork() of a
   DataLoader worker failed with ENOMEM (tests/test_malloc.py keeps that from coming back).
Price of both: resident memory stays at the run's peak. GPU runs are left alone: device memory has torch's
caching allocator, and host allocation is not on their critical path.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import sys
from typing import Optional

# glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling on 64-bit (4 MiB * sizeof(long))

CHOICE_ENV = "BERT_HOST_MALLOC"  # "glibc": do not preload; "tcmalloc": set by the re-execution (no loop)
TCMALLOC_ENV = {
    "TCMALLOC_RELEASE_RATE": "0",  # never hand freed pages back to the OS: they would be faulted in again
    "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40),  # BERT-large's 1.3 GB blocks are expected, not news
}


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
    """glibc: reuse freed blocks up to 32 MiB instead of returning them to the OS (see the module docstring).
    True if applied; a no-op under tcmalloc, which keeps everything already."""
    libc = _glibc()
    return (not tcmalloc_loaded() and libc is not None
            and _mallopt(libc, (M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX), (M_TRIM_THRESHOLD, -1)))


def find_tcmalloc() -> Optional[str]:
    """Path (or soname for the dynamic loader) of tcmalloc: this environment's lib/ first (conda), then the
    system's library cache. None if it is not installed."""
    for name in ("tcmalloc_minimal", "tcmalloc"):
        local = sorted(glob.glob(os.path.join(sys.prefix, "lib", f"lib{name}.so*")))
        if local:
            return local[0]
        found = ctypes.util.find_library(name)
        if found:
            return found
    return None


def tcmalloc_loaded() -> bool:
    """Whether this process runs on tcmalloc (read from its memory map, not assumed from the environment)."""
    try:
        with open("/proc/self/maps") as f:
            return "libtcmalloc" in f.read()
    except OSError:
        return False


def _on_cpu_host() -> bool:
    import torch  # here, not at the top: this module is imported by entry points before anything heavy
    return not torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cpu") == "cpu"


def preload_tcmalloc() -> None:
    """On a CPU host with tcmalloc installed, replace this process by the same command with tcmalloc preloaded
    (same PID, so deepspeed/torchrun/srun keep tracking it). Returns without doing anything when already on
    tcmalloc, opted out (BERT_HOST_MALLOC=glibc), on a GPU host, or when tcmalloc is not installed.
    Call only from an entry point's `if __name__ == "__main__":` block, before any work."""
    if os.environ.get(CHOICE_ENV) or tcmalloc_loaded() or not sys.platform.startswith("linux"):
        return
    lib = find_tcmalloc()
    if lib is None or not _on_cpu_host():
        return
    env = dict(os.environ, **TCMALLOC_ENV)
    env[CHOICE_ENV] = "tcmalloc"
    env["LD_PRELOAD"] = ":".join(p for p in (lib, os.environ.get("LD_PRELOAD")) if p)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)


def glibc_env(environ: dict) -> dict:
    """`environ` for a child process that must run on glibc's malloc (tcmalloc taken out of LD_PRELOAD)."""
    env = {k: v for k, v in environ.items() if k not in TCMALLOC_ENV}
    preload = [p for p in env.pop("LD_PRELOAD", "").split(":") if p and "libtcmalloc" not in p]
    if preload:
        env["LD_PRELOAD"] = ":".join(preload)
    env[CHOICE_ENV] = "glibc"
    return env


def configure() -> str:
    """CPU processes: tune glibc when tcmalloc is not loaded. Returns one line for the run log saying which
    allocator this process has and, if it is slow, what to do about it."""
    if tcmalloc_loaded():
        return "host allocator: tcmalloc, freed memory kept for reuse (RSS stays at the run's peak)"
    hint = ("" if os.environ.get(CHOICE_ENV) == "glibc" else
            "; install tcmalloc for faster CPU steps (apt-get install libtcmalloc-minimal4, or conda install "
            "gperftools): the launchers preload it")
    if keep_freed_memory():
        return "host allocator: glibc, freed blocks up to 32 MiB reused (RSS stays at the run's peak)" + hint
    return "host allocator: the C library's default" + hint
