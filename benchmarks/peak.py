"""`peak`: the measured matmul peak of this device per precision, the MFU denominator of every benchmark."""

from __future__ import annotations

from typing import Optional

import torch

from benchmarks.report import bench_device, print_table
from trainer import engine as eng, metrics, precision

DTYPES = ("fp32", "bf16", "fp16")


def measure_peak(dtypes: list[str], n: Optional[int], seconds: float, device: torch.device) -> dict:
    """Measured matmul peak per dtype. fp16 only where the device has fast fp16 (never chosen on a CPU);
    without n the GEMM is sized from a probe, so even emulated bf16 finishes within ``seconds``."""
    facts = precision.device_facts(device.type)
    out = {}
    for name in dtypes:
        if name == "fp16" and not facts.fast_fp16:
            print(f"peak: fp16 skipped ({facts.kind} has no fast fp16: {facts.detail})")
            continue
        out[name] = metrics.measure_peak_tflops(device, eng.torch_dtype(name), seconds=seconds, n=n)
    return out


def run(a) -> dict:
    peak = measure_peak(a.dtypes.split(","), a.n, a.seconds, bench_device())
    print_table([{"dtype": k, "tflops": v} for k, v in peak.items()], [("dtype", "{}"), ("tflops", "{:.3f}")])
    return {"peak_tflops": peak, "n": a.n}


def add_parser(sub) -> None:
    pk = sub.add_parser("peak", help="measured matmul peak per precision (MFU denominator)")
    pk.add_argument("--dtypes", default="fp32,bf16,fp16")
    pk.add_argument("--n", type=int, default=None, help="GEMM size (default: sized from a probe to the budget)")
    pk.add_argument("--seconds", type=float, default=3.0, help="time budget per dtype")
    pk.set_defaults(run=run)
