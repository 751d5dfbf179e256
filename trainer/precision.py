"""Which precision a run trains in: the DeepSpeed JSON's request, decided against what the device does natively.

The JSON stays the one source of the request (``fp16.enabled`` / ``bf16.enabled``, else fp32). A device
without fast fp16 (every CPU) gets bf16 where bf16 is native, otherwise fp32: bf16 that is only emulated is
far slower than fp32 (a 1024^2 matmul on an AVX2-only EPYC: 0.8 GFLOP/s bf16 vs 72 fp32). Native bf16 means
CUDA compute capability >= 8.0, an x86 CPU with AVX512_BF16 or AMX, or an Arm CPU with the BF16 extension.
Neither DeepSpeed's CPU accelerator (``is_bf16_supported()`` is always True) nor
``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` (True on every AVX-512 CPU) answers that; CPUID does.

``decide`` is pure (tested branch by branch without the hardware); ``device_facts`` reads the hardware.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from typing import Optional

PRECISIONS = ("fp16", "bf16", "fp32")
# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) under which oneDNN still has native bf16 kernels.
_ONEDNN_BF16_ISAS = {"ALL", "DEFAULT", "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX",
                     "AVX512_CORE_AMX_FP16", "AVX10_1_512", "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16",
                     "AVX10_2_512", "AVX10_2_512_AMX_2"}


@dataclass(frozen=True)
class DeviceFacts:
    kind: str  # "cuda", "cpu", ...
    fast_fp16: bool
    native_bf16: bool
    detail: str  # the fact the answer rests on: "AVX2", "AVX512_BF16", "compute capability 9.0", ...


@dataclass(frozen=True)
class Decision:
    precision: str  # "fp16", "bf16" or "fp32": what the run trains in
    line: str  # the one log line: decision and reason
    emulated: bool = False  # bf16 asked for explicitly on a device that only emulates it


def requested(ds: dict) -> str:
    """The DeepSpeed JSON's precision request."""
    if (ds.get("fp16") or {}).get("enabled"):
        return "fp16"
    if (ds.get("bf16") or {}).get("enabled"):
        return "bf16"
    return "fp32"


def decide(request: str, facts: DeviceFacts) -> Decision:
    """fp16 where the device has fast fp16; else bf16 where native, else fp32. An explicit bf16 request runs
    bf16 even where it is only emulated (flagged, so the caller warns with a measured ratio)."""
    if request not in PRECISIONS:
        raise ValueError(f"precision {request!r} is not one of {PRECISIONS}")
    k, d = facts.kind, facts.detail
    if request == "fp16":
        if facts.fast_fp16:
            return Decision("fp16", f"{k}: fp16 with dynamic loss scaling ({d})")
        if facts.native_bf16:
            return Decision("bf16", f"{k}: no fast fp16; native bf16 ({d}): fp16 -> bf16")
        return Decision("fp32", f"{k}: no native bf16 ({d}): fp16 -> fp32")
    if request == "bf16":
        if facts.native_bf16:
            return Decision("bf16", f"{k}: bf16 ({d})")
        return Decision("bf16", f"{k}: bf16 as requested, but this device only emulates it ({d})", emulated=True)
    return Decision("fp32", f"{k}: fp32 as requested ({d})")


def apply(ds: dict, precision: str) -> dict:
    """A copy of the DeepSpeed JSON set to train in ``precision`` (the fp16 block kept only for fp16)."""
    out = {k: v for k, v in ds.items() if k not in ("fp16", "bf16")}
    if precision == "fp16":
        out["fp16"] = dict(ds.get("fp16") or {}, enabled=True)
    elif precision == "bf16":
        out["bf16"] = {"enabled": True}
    return out


# ---------------------------------------------------------------------------------------------------
# The hardware


def _cpuinfo_flags() -> set[str]:
    """x86 'flags' / Arm 'Features' of /proc/cpuinfo (first processor), lower-case."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip().lower() in ("flags", "features"):
                    return set(value.lower().split())
    except OSError:
        pass
    return set()


def cpu_facts(flags: Optional[set[str]] = None, machine: Optional[str] = None,
              onednn_isa: Optional[str] = None) -> DeviceFacts:
    """CPU facts from CPUID flags (arguments default to this machine's)."""
    flags = _cpuinfo_flags() if flags is None else flags
    machine = (machine or platform.machine()).lower()
    onednn_isa = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA")) if onednn_isa is None \
        else onednn_isa
    if machine in ("aarch64", "arm64"):
        native = "bf16" in flags
        detail = "Arm BF16" if native else "Arm without BF16"
    else:
        amx = "amx_bf16" in flags
        avx512_bf16 = "avx512_bf16" in flags
        native = amx or avx512_bf16
        detail = ("AMX" if amx else "AVX512_BF16" if avx512_bf16 else "AVX-512 without BF16" if "avx512f" in flags
                  else "AVX2" if "avx2" in flags else "no AVX2")
    if native and onednn_isa and onednn_isa.upper() not in _ONEDNN_BF16_ISAS:
        native, detail = False, f"{detail}, but ONEDNN_MAX_CPU_ISA={onednn_isa}"
    return DeviceFacts("cpu", fast_fp16=False, native_bf16=native, detail=detail)


def cuda_facts(capability: tuple[int, int]) -> DeviceFacts:
    major, minor = capability
    return DeviceFacts("cuda", fast_fp16=capability >= (6, 0), native_bf16=capability >= (8, 0),
                       detail=f"compute capability {major}.{minor}")


def device_facts(kind: str) -> DeviceFacts:
    """Facts of this process's device of ``kind`` ("cuda", "cpu", or another DeepSpeed accelerator)."""
    import torch

    if kind == "cuda":
        return cuda_facts(torch.cuda.get_device_capability())
    if kind == "cpu":
        return cpu_facts()
    from deepspeed.accelerator import get_accelerator  # other accelerators: their own answers

    acc = get_accelerator()
    return DeviceFacts(kind, bool(acc.is_fp16_supported()), bool(acc.is_bf16_supported()), "accelerator's report")


def emulation_ratio(device: str = "cpu", n: int = 256, seconds: float = 0.2) -> float:
    """How many times slower a bf16 matmul is than fp32 here (n x n, best of a short window each)."""
    import torch

    def rate(dtype) -> float:
        a = torch.randn(n, n, dtype=torch.float32, device=device).to(dtype)
        a @ a
        best, t_end = float("inf"), time.perf_counter() + seconds
        while time.perf_counter() < t_end or best == float("inf"):
            t0 = time.perf_counter()
            a @ a
            best = min(best, time.perf_counter() - t0)
        return best

    return rate(torch.bfloat16) / rate(torch.float32)
