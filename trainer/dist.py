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
from typing import MutableMapping

_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class DistError(RuntimeError):
    """The environment does not describe a usable process group."""


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
    """Build DeepSpeed's JIT ops (CPU FusedAdam, shm comm) into this virtualenv, unless the user chose a folder.

    torch's default, ~/.cache/torch_extensions, is shared by every virtualenv of the user. Two venvs on one
    machine (a checkout and a CI clone, say) differ in include paths, so each rebuilds the other's ops on every
    run, and a process killed mid-build (preemption, kill -9) leaves a lock file every later run waits on
    forever. One folder per venv (sys.prefix) avoids both.
    """
    env = os.environ if env is None else env
    return env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))


def init(backend: str | None = None) -> tuple[int, int, int]:
    """setup_env() then deepspeed.init_distributed; returns (rank, local_rank, world_size)."""
    pin_extensions_dir()
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    setup_env()
    backend = backend or get_accelerator().communication_backend_name()  # nccl on CUDA, gloo on CPU
    deepspeed.init_distributed(dist_backend=backend)
    import torch.distributed as tdist
    if get_accelerator().device_name() == "cpu":
        unlink_shm_buffer(tdist.get_rank())
    return tdist.get_rank(), int(os.environ["LOCAL_RANK"]), tdist.get_world_size()


def shm_buffer_path(rank: int) -> str:
    return (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ['MASTER_ADDR']}_"
            f"{os.environ['MASTER_PORT']}_{rank}")


def unlink_shm_buffer(rank: int) -> None:
    """Remove this rank's name of DeepSpeed's CPU shared-memory allreduce buffer (the memory stays mapped).

    DeepSpeed creates /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank> (69 MB of RAM on tmpfs)
    per rank and never unlinks it: every CPU run leaked 69 MB per rank until reboot (4.3 GB after a day of
    test runs here). The name is only needed while the ranks open each other's buffers, which every rank has
    done when init_distributed returns; the barrier makes sure all of them got there.
    """
    import torch.distributed as tdist
    tdist.barrier()
    try:
        os.remove(shm_buffer_path(rank))
    except FileNotFoundError:  # the shm op is not in use (ranks on several nodes, or not built)
        pass
