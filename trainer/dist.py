"""Process-group set-up for every way the trainer is started.

``deepspeed`` and ``torchrun`` export RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT. ``srun``
exports only SLURM_* variables and DeepSpeed's ``init_distributed`` does not read them (it falls back to
MPI discovery, which fails without mpi4py), so we derive the five variables here:

- RANK = SLURM_PROCID, LOCAL_RANK = SLURM_LOCALID, WORLD_SIZE = SLURM_STEP_NUM_TASKS (else SLURM_NTASKS);
- MASTER_ADDR = first line of ``scontrol show hostnames $SLURM_JOB_NODELIST`` (rank 0 runs there);
- MASTER_PORT = 20000 + SLURM_JOB_ID % 20000, so two jobs sharing a node do not collide on one port and
  every task of a job computes the same port without talking to the others.

A plain ``python launcher/pretrain.py`` (no launcher) becomes a world of one: RANK=0, WORLD_SIZE=1,
MASTER_ADDR=127.0.0.1 and a free port. Variables that are already set always win.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from datetime import timedelta
from typing import MutableMapping, Optional

from trainer.errors import DistError

_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# Longest wait of any collective before it raises (every rank then stops, naming its phase: trainer.trainer).
# It must outlast the longest time one rank may legitimately keep the others waiting: a checkpoint save of
# BERT-large to shared storage, a validation pass, a first JIT build of an op.
DEFAULT_TIMEOUT_S = {"gloo": 600.0, "nccl": 1800.0}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_master_addr(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True,
                             text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise DistError(f"cannot expand SLURM_JOB_NODELIST={nodelist!r} with `scontrol show hostnames` ({e}); "
                        f"set MASTER_ADDR yourself") from None
    hosts = [h.strip() for h in out.splitlines() if h.strip()]
    if not hosts:
        raise DistError(f"`scontrol show hostnames {nodelist}` printed no host; set MASTER_ADDR yourself")
    return hosts[0]


def setup_env(env: MutableMapping[str, str] | None = None) -> dict:
    """Fill RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT in ``env`` (default os.environ); return them."""
    env = os.environ if env is None else env
    if "RANK" not in env and "SLURM_PROCID" in env:
        env["RANK"] = env["SLURM_PROCID"]
        env.setdefault("LOCAL_RANK", env.get("SLURM_LOCALID", "0"))
        world = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS")
        if world is None:
            raise DistError("SLURM_PROCID is set but neither SLURM_STEP_NUM_TASKS nor SLURM_NTASKS is")
        env.setdefault("WORLD_SIZE", world)
        if "MASTER_ADDR" not in env:
            nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
            if not nodelist:
                raise DistError("under srun: SLURM_JOB_NODELIST is not set; set MASTER_ADDR yourself")
            env["MASTER_ADDR"] = slurm_master_addr(nodelist)
        if "MASTER_PORT" not in env:
            job = env.get("SLURM_JOB_ID")
            if job is None or not job.isdigit():
                raise DistError(f"under srun: SLURM_JOB_ID={job!r} is not a number; set MASTER_PORT yourself")
            env["MASTER_PORT"] = str(20000 + int(job) % 20000)
    elif "RANK" not in env:
        # A single plain process: a world of one on this machine.
        env["RANK"] = "0"
        env.setdefault("WORLD_SIZE", "1")
        env.setdefault("LOCAL_RANK", "0")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(free_port()))
    env.setdefault("LOCAL_RANK", "0")
    missing = [k for k in _KEYS if k not in env]
    if missing:
        raise DistError(f"RANK is set but {', '.join(missing)} is not: the launcher must set all of {', '.join(_KEYS)}")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT"):
        if not env[k].isdigit():
            raise DistError(f"{k}={env[k]!r} is not a non-negative integer")
    if int(env["RANK"]) >= int(env["WORLD_SIZE"]):
        raise DistError(f"RANK {env['RANK']} >= WORLD_SIZE {env['WORLD_SIZE']}")
    return {k: env[k] for k in _KEYS}


def pin_extensions_dir(env: MutableMapping[str, str] | None = None) -> str:
    """Build DeepSpeed's JIT ops (CPU FusedAdam, shm comm) into this virtualenv, unless the user chose a folder,
    always with this environment's ninja.

    torch's default, ~/.cache/torch_extensions, is shared by every virtualenv of the user. Two venvs on one
    machine (a checkout and a CI clone, say) differ in include paths, so each rebuilds the other's ops on every
    run, and a process killed mid-build (preemption, kill -9) leaves a lock file every later run waits on
    forever. One folder per venv (sys.prefix) avoids both. torch runs the first ninja on PATH, and two
    ninja versions (the venv's and the system's) each take the other's build log for a changed command and
    rebuild both ops (~75 s of CPU) whenever PATH changes between runs: the venv's own (a declared dependency)
    goes first.
    """
    env = os.environ if env is None else env
    bindir = os.path.dirname(sys.executable)
    if os.path.exists(os.path.join(bindir, "ninja")):
        rest = [p for p in env.get("PATH", "").split(os.pathsep) if p and p != bindir]
        env["PATH"] = os.pathsep.join([bindir, *rest])
    return env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))


def init(timeout_s: Optional[float] = None) -> tuple[int, int, int]:
    """setup_env() then the process group (nccl on CUDA, gloo on CPU) with a bound on every collective:
    ``timeout_s``, default DEFAULT_TIMEOUT_S of the backend. Returns (rank, local_rank, world_size)."""
    pin_extensions_dir()
    import deepspeed
    import torch.distributed as tdist
    from deepspeed.accelerator import get_accelerator

    setup_env()
    try:  # an unresolvable name makes the TCP store retry silently for ~10 minutes
        socket.getaddrinfo(os.environ["MASTER_ADDR"], None)
    except socket.gaierror as e:
        raise DistError(f"MASTER_ADDR={os.environ['MASTER_ADDR']} does not resolve on {socket.gethostname()} "
                        f"({e.strerror})") from None
    backend = get_accelerator().communication_backend_name()
    if backend == "nccl":
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # a timed-out collective raises
    timeout = timedelta(seconds=timeout_s or DEFAULT_TIMEOUT_S.get(backend, DEFAULT_TIMEOUT_S["gloo"]))
    deepspeed.init_distributed(dist_backend=backend, timeout=timeout, verbose=False)
    if get_accelerator().device_name() == "cpu":
        from trainer import cpu

        cpu.unlink_shm_buffer(tdist.get_rank())
    return tdist.get_rank(), int(os.environ["LOCAL_RANK"]), tdist.get_world_size()


def bound_collectives() -> None:
    """Give every process group the bound of the default one. DeepSpeed makes its own groups (ZeRO's data
    parallel group among them) with torch's defaults, 30 minutes for gloo and 10 for NCCL, not init's
    timeout: without this, a hung rank left the others in ZeRO's gradient all_reduce for 30 minutes.
    (torch's private _set_pg_timeout, torch >= 2.3; without it the groups keep their defaults.)"""
    import torch.distributed as tdist
    from torch.distributed import distributed_c10d as c10d

    if not (tdist.is_available() and tdist.is_initialized()) or not hasattr(c10d, "_set_pg_timeout"):
        return
    default = c10d._get_default_group()
    timeout = default._get_backend(default._device_types[0]).options._timeout
    for group in list(c10d._world.pg_map):
        if group is not default and not c10d._rank_not_in_group(group):
            c10d._set_pg_timeout(timeout, group)


def rank_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        return tdist.get_rank(), tdist.get_world_size()
    return 0, 1


def all_reduce_sum(values, device, extra=()) -> list[float]:
    """Sums over ranks of a list of host numbers followed by ``extra`` (host numbers or 0-dim device tensors), as
    one float64 tensor (one host read); the values themselves without a process group."""
    import torch
    import torch.distributed as tdist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    if extra:
        t = torch.cat([t, torch.stack([torch.as_tensor(x, dtype=torch.float64, device=device).reshape(())
                                       for x in extra])])
    if tdist.is_available() and tdist.is_initialized():
        tdist.all_reduce(t)
    return t.tolist()


def all_reduce_named(sums: dict, device) -> dict:
    """Sums over ranks of named numbers (host numbers or 0-dim device tensors) -> name: float. One all_reduce of
    one float64 tensor laid out in sorted-name order, so every rank must hold the same names; one host read."""
    names = sorted(sums)
    return dict(zip(names, all_reduce_sum([], device, extra=[sums[k] for k in names])))


def all_gather_object(obj) -> list:
    """Every rank's ``obj``, indexed by rank (a list of one without a process group)."""
    import torch.distributed as tdist

    if not (tdist.is_available() and tdist.is_initialized()):
        return [obj]
    out = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()


# Words of the errors torch raises when a collective fails (gloo, NCCL and the TCP store).
_COLLECTIVE_FAILURE = ("gloo", "nccl", "timed out", "connection closed", "connection reset", "broken pipe",
                       "socket", "store", "watchdog")


def is_collective_failure(e: BaseException) -> bool:
    """Whether ``e`` is a collective that failed or timed out (a peer died, the bound fired), not a bug."""
    import torch.distributed as tdist

    if isinstance(e, getattr(tdist, "DistError", ())):
        return True
    return isinstance(e, RuntimeError) and any(w in str(e).lower() for w in _COLLECTIVE_FAILURE)


def shutdown() -> None:
    """Leave the process group after a normal end (every rank is here: one last barrier)."""
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()
        tdist.destroy_process_group()
