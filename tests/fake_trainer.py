#!/usr/bin/env python3
"""Stand-in for launcher/pretrain.py (and the deepspeed runner) in tests/test_slurm.py: `PYTHON=` / `DEEPSPEED=`
point here, the real srun of the local cluster starts it as every rank.

It records its argv and the environment it was started with (the distributed-training variables, every
SLURM_* and SLURMD_* variable, and any FAKE_PROBE_* variable) to $FAKE_TRAINER_LOG/<job>.<step>.<rank>.json, then
ends like the trainer does at the end of a run: with FAKE_STEP=N and FAKE_MAX_STEPS=M, rank 0 writes what the
real trainer leaves in ``train.output_dir=`` (config.yaml with train.max_steps M, checkpoints/latest =
step_N); FAKE_EXIT=K exits with status K (a crash). Only the standard library: it runs under any python3.
"""

import json
import os
import sys
from pathlib import Path

KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS", "NCCL_DEBUG",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING", "NCCL_ASYNC_ERROR_HANDLING", "PYTHONUNBUFFERED", "VIRTUAL_ENV")
argv = sys.argv[1:]
env = os.environ
log = Path(env["FAKE_TRAINER_LOG"])
log.mkdir(parents=True, exist_ok=True)
rec = {"argv": argv, "pid": os.getpid(),
       "env": {k: env[k] for k in KEYS if k in env},
       "slurm": {k: v for k, v in env.items() if k.startswith(("SLURM_", "SLURMD_", "FAKE_PROBE_"))}}
name = f"{env.get('SLURM_JOB_ID', 'nojob')}.{env.get('SLURM_RESTART_COUNT', '0')}.{env.get('SLURM_STEP_ID', 'x')}." \
       f"{env.get('SLURM_PROCID', '0')}.json"
(log / name).write_text(json.dumps(rec))
if "FAKE_STEP" in env and env.get("RANK", env.get("SLURM_PROCID", "0")) == "0":
    out = Path(next(a.split("=", 1)[1] for a in argv if a.startswith("train.output_dir=")))
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(f"train:\n  max_steps: {int(env['FAKE_MAX_STEPS'])}\n")
    (out / "checkpoints" / "latest").write_text(f"step_{int(env['FAKE_STEP']):07d}")
sys.exit(int(env.get("FAKE_EXIT", "0")))
