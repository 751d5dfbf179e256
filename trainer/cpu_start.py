"""The CPU host workarounds that act at a process's start, before torch is imported (the others are in
trainer/cpu.py, whose list this module's two complete). It imports nothing heavy: trainer.launch calls it first
thing, and on a host without a GPU driver it decides without importing torch, which would otherwise be
imported twice (once to ask CUDA, again after the re-execution below), ~2.5 s of every rank's start-up.

1. Host allocator (`preload_tcmalloc`, `configure_allocator`). glibc's malloc gives blocks above its mmap
   threshold (32 MiB at most) a fresh mmap and unmaps them on free, so the kernel zeroes ~160,000 new pages
   per BERT-base step of DeepSpeed (its reduce buckets, fp32 gradient partition, fp64 norm copies): the
   engine's step took 45-77% longer than a plain loop. tcmalloc with TCMALLOC_RELEASE_RATE=0 keeps and
   reuses them (0 faults per step). An allocator must be in place before the interpreter starts, so the
   launchers re-execute their own command with it in LD_PRELOAD (same PID: deepspeed, torchrun and srun
   keep tracking it). Without tcmalloc (or with BERT_HOST_MALLOC=glibc), glibc is tuned instead: blocks up to
   32 MiB reuse the heap, which is never trimmed. Cost of both: resident memory stays at the run's peak.
6. py-cpuinfo asked once (`ask_cpuinfo_once`). DeepSpeed's CPU op builder asks py-cpuinfo for the CPU's arch
   and its SIMD flags (two asks) when it loads an op with compile flags (FusedAdam), built or not, and each ask
   runs a Python subprocess that sleeps 1 s to time the clock: 2.6 s of a rank's start-up. The answer
   is asked once, in a thread started before torch's import so that its sleep overlaps it, and kept for the
   process. Cost: none (the CPU does not change under a process).
"""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import glob
import os
import sys
import threading
from typing import Optional

# ---------------------------------------------------------------------------------------------------
# Is this a CPU host? Decided without torch where no GPU driver is installed.

# What a CUDA (NVIDIA), ROCm (AMD) or WSL GPU driver puts on a host; none of them: no device torch could use.
GPU_DRIVER_FILES = ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg")


def cpu_host() -> bool:
    """No CUDA device and no other DeepSpeed accelerator asked for. Without a GPU driver on the host torch is not
    imported to find that out; with one, torch is asked (a host whose driver has no usable device is a CPU host)."""
    if os.environ.get("DS_ACCELERATOR", "cpu") != "cpu":
        return False
    if not any(os.path.exists(p) for p in GPU_DRIVER_FILES):
        return True
    import torch

    return not torch.cuda.is_available()


# ---------------------------------------------------------------------------------------------------
# 1. Host allocator

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


def keep_freed_memory() -> bool:
    """glibc: reuse freed blocks up to 32 MiB instead of returning them to the OS. True if applied; a no-op
    under tcmalloc, which keeps everything already."""
    libc = _glibc()
    if tcmalloc_loaded() or libc is None:
        return False
    settings = ((M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX), (M_TRIM_THRESHOLD, -1))
    return all(libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) == 1 for param, value in settings)


def find_tcmalloc() -> Optional[str]:
    """Path (or soname) of tcmalloc: this environment's lib/ first (conda), then the system's library cache."""
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


def preload_tcmalloc() -> None:
    """Replace this process by the same command with tcmalloc preloaded, when it is installed and this is
    not done already (or opted out with BERT_HOST_MALLOC=glibc). Call first thing in an entry point."""
    if os.environ.get(CHOICE_ENV) or tcmalloc_loaded() or not sys.platform.startswith("linux"):
        return
    lib = find_tcmalloc()
    if lib is None:
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


def configure_allocator() -> str:
    """Tune glibc when tcmalloc is not loaded; one line for the run log naming the allocator (and the fix)."""
    if tcmalloc_loaded():
        return "host allocator: tcmalloc, freed memory kept for reuse (RSS stays at the run's peak)"
    hint = ("" if os.environ.get(CHOICE_ENV) == "glibc" else
            "; install tcmalloc for faster CPU steps (apt-get install libtcmalloc-minimal4, or conda install "
            "gperftools): the launchers preload it")
    if keep_freed_memory():
        return "host allocator: glibc, freed blocks up to 32 MiB reused (RSS stays at the run's peak)" + hint
    return "host allocator: the C library's default" + hint


# ---------------------------------------------------------------------------------------------------
# 6. py-cpuinfo asked once


def ask_cpuinfo_once() -> None:
    """Start asking py-cpuinfo in a thread now and make ``cpuinfo.get_cpu_info`` return that answer from then
    on (DeepSpeed's op builders import the function at each call, so they get this one). A failed ask is
    asked again by the caller, as py-cpuinfo would. The thread is joined at exit, so that its subprocess is
    never left behind."""
    try:
        import cpuinfo
    except ImportError:  # DeepSpeed then reads lscpu instead, once per ask (no sleep)
        return
    ask, answer = cpuinfo.get_cpu_info, {}
    if getattr(ask, "asked_once", False):
        return
    worker = threading.Thread(target=lambda: answer.update(info=ask()), name="cpuinfo", daemon=True)
    worker.start()
    atexit.register(worker.join, 30.0)

    def get_cpu_info() -> dict:
        worker.join(30.0)  # ~1.3 s, normally long over by the time an op loads
        return answer["info"] if answer.get("info") else ask()

    get_cpu_info.asked_once = True
    cpuinfo.get_cpu_info = get_cpu_info
