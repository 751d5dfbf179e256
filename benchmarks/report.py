"""What every benchmark shares: the device it measures, the machine's facts, the printed table and the JSON.

Nothing here measures; the benchmarks (benchmarks/train.py, peak.py, ...) do. ``machine_facts`` is also what
the GPU kit (scripts/gpu_check.py) records of the machine it ran on: one description of a machine for both.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import platform
import resource
import subprocess
from typing import Optional

import torch

from trainer import precision

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ZERO2 = os.path.join(REPO, "ds_configs", "zero2.json")  # the DeepSpeed JSON pretraining ships with


def bench_device() -> torch.device:
    """The device benchmarks measure: the GPU where there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's architecture, cores and the instruction set its precision rests on."""
    if device.type == "cuda":
        return torch.cuda.get_device_name()
    facts = precision.cpu_facts()
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores ({facts.detail})"


def _version(name: str) -> Optional[str]:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def _last_line(*argv: str, having: str = "") -> Optional[str]:
    """The last line of a command's output that holds ``having`` (None if the command is not there)."""
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        return None
    return next((ln.strip() for ln in reversed(out) if having in ln), None)


def _cpu_model() -> str:
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), platform.processor())
    return platform.processor()


def machine_facts(device: torch.device) -> dict:
    """The machine a result was measured on: device, CPU (model, the instruction set bf16 rests on, cores,
    threads), library versions, the commit, the build environment, and for a GPU its properties and driver."""
    facts = {"device": device_name(device), "kind": device.type, "python": platform.python_version(),
             "torch": torch.__version__, "deepspeed": _version("deepspeed"), "transformers": _version("transformers"),
             "tokenizers": _version("tokenizers"), "numpy": _version("numpy"), "cpu": _cpu_model(),
             "cpu_isa": precision.cpu_facts().detail, "processor": platform.processor() or platform.machine(),
             "cores": os.cpu_count(), "cpu_threads": torch.get_num_threads(),
             "git_commit": _last_line("git", "-C", REPO, "rev-parse", "HEAD"),
             "env": {k: os.environ.get(k) for k in ("TORCH_CUDA_ARCH_LIST", "MAX_JOBS", "TORCH_EXTENSIONS_DIR",
                                                     "CUDA_HOME", "PYTHONPATH")}}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(0)
        facts.update(gpu=p.name, capability=f"{p.major}.{p.minor}", gpu_memory_gib=round(p.total_memory / 2 ** 30, 1),
                     multiprocessors=p.multi_processor_count, cuda=torch.version.cuda,
                     cudnn=torch.backends.cudnn.version(), nvcc=_last_line("nvcc", "--version", having="release"),
                     driver=_last_line("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"))
    return facts


def print_table(rows: list[dict], cols: list[tuple[str, str]]) -> None:
    """``rows`` under the headers of ``cols`` = [(key, format)], right-aligned; a missing value prints "-"."""
    def cell(r, k, fmt):
        return fmt.format(r[k]) if r.get(k) is not None else "-"

    widths = [max(len(k), *(len(cell(r, k, fmt)) for r in rows)) for k, fmt in cols]
    print("  ".join(k.rjust(w) for (k, _), w in zip(cols, widths)))
    for r in rows:
        print("  ".join(cell(r, k, fmt).rjust(w) for (k, fmt), w in zip(cols, widths)))


def write_result(res: dict, json_path: Optional[str]) -> str:
    """A command's result as JSON: on stdout as one line for "-", else to ``json_path`` (default
    bench_results/CMD.json); returns where it went."""
    if json_path == "-":
        print(json.dumps(res))
        return "-"
    path = json_path or os.path.join("bench_results", f"{res['cmd']}.json")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    return path


def rss_mb() -> float:
    """Peak resident memory of this process so far, MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def children_cpu() -> float:
    """CPU seconds of this process's ended children (a builder's workers)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime
