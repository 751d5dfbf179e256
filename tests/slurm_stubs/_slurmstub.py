"""Shared helpers of the simulated Slurm commands (srun, sbatch, scontrol) used by tests/test_slurm.py.

Every stub appends one JSON line per call to ``$SLURM_STUB_LOG/<command>.jsonl`` (argv, parsed options,
the SLURM_* environment it saw) so a test can assert exactly what a script asked Slurm to do. Only the
standard library is used: the stubs run under whatever ``python3`` is first on PATH.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

# Options that take a value when written as two words ("--nodes 2"); the scripts under test always use
# "--opt=value", this is only so a stray two-word form is parsed instead of silently misread.
VALUE_OPTS = {"-N", "-n", "-c", "-t", "-J", "-o", "-e", "-d", "-a", "-p", "-A", "--nodes", "--ntasks",
              "--ntasks-per-node", "--cpus-per-task", "--time", "--job-name", "--output", "--error",
              "--dependency", "--array", "--partition", "--account", "--export", "--signal",
              "--gpus-per-node", "--open-mode", "--chdir", "-D", "--gres", "--mem"}
SHORT_TO_LONG = {"-N": "--nodes", "-n": "--ntasks", "-c": "--cpus-per-task", "-t": "--time", "-J": "--job-name",
                 "-o": "--output", "-e": "--error", "-d": "--dependency", "-a": "--array", "-p": "--partition",
                 "-A": "--account", "-D": "--chdir"}


def log_dir() -> Path:
    d = os.environ.get("SLURM_STUB_LOG")
    if not d:
        sys.exit(f"{Path(sys.argv[0]).name} (test stub): SLURM_STUB_LOG is not set; the test must point it "
                 "at a folder for the call records")
    p = Path(d)
    p.mkdir(parents=True, exist_ok=True)
    return p


def record(command: str, entry: dict) -> None:
    with open(log_dir() / f"{command}.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")


def slurm_env(env=None) -> dict:
    env = os.environ if env is None else env
    return {k: v for k, v in env.items() if k.startswith(("SLURM_", "SLURMD_"))}


def parse_options(argv: list[str]) -> tuple[dict, list[str]]:
    """Split ``[options] command args...`` into ({"--long": value or True}, rest) at the first non-option."""
    opts: dict = {}
    i = 0
    while i < len(argv):
        a = argv[i]
        if not a.startswith("-") or a == "--":
            if a == "--":
                i += 1
            break
        if "=" in a and a.startswith("--"):
            k, v = a.split("=", 1)
        elif a in VALUE_OPTS:
            k, v = a, argv[i + 1]
            i += 1
        else:
            k, v = a, True
        opts[SHORT_TO_LONG.get(k, k)] = v
        i += 1
    return opts, argv[i:]


def expand_hostlist(spec: str) -> list[str]:
    """Slurm hostlist syntax: ``node[01-03,7],gpu5`` -> node01 node02 node03 node7 gpu5 (zero padding kept)."""
    hosts: list[str] = []
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", spec):
        m = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", part)
        if not m:
            hosts.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        for r in ranges.split(","):
            lo, _, hi = r.partition("-")
            hi = hi or lo
            width = len(lo)
            for n in range(int(lo), int(hi) + 1):
                hosts.append(f"{prefix}{n:0{width}d}{suffix}")
    return hosts


def next_job_id() -> int:
    """Monotonic job ids per log folder (start 1000) so a test can predict and match dependencies."""
    counter = log_dir() / "next_job_id"
    n = int(counter.read_text()) if counter.exists() else 1000
    counter.write_text(str(n + 1))
    return n
