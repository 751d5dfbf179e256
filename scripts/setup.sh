#!/usr/bin/env bash
# Create .venv and install the project on a fresh machine (CPU). Idempotent: a second run is quick.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: an unpinned torch (asked for by deepspeed) would pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[test]"
# DeepSpeed JIT-compiles FusedAdam and its CPU comm op on first use (~1-2 min with g++); do it once here rather than inside the
# first training run or test (cached in .venv/torch_extensions, see trainer/dist.py; a no-op when built).
.venv/bin/python -c "from trainer.dist import pin_extensions_dir; pin_extensions_dir()
from deepspeed.accelerator import get_accelerator as a
if a().device_name() == 'cpu':  # on CUDA, FusedAdam is built on first use by the GPU node's own toolchain
    [a().create_op_builder(n).load(verbose=False) for n in ('FusedAdamBuilder', 'ShareMemCommBuilder')]" 2>&1 \
    | grep -v -e '^\[' -e 'WARNING' || true
# CPU training runs on tcmalloc when it is installed (trainer/cpu_start.py: DeepSpeed's step on glibc's malloc took
# 45-77% longer, re-faulting its per-step buffers). Installed here when we may; otherwise a note says how.
if ! .venv/bin/python -c "import sys; from trainer.cpu_start import find_tcmalloc; sys.exit(find_tcmalloc() is None)"; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        { apt-get install -y -qq libtcmalloc-minimal4 || { apt-get update -qq && apt-get install -y -qq libtcmalloc-minimal4; }; } \
            >/dev/null 2>&1 || echo "setup: apt-get could not install libtcmalloc-minimal4; CPU runs use glibc's malloc (slower)"
    else
        echo "setup: tcmalloc not found; CPU runs use glibc's malloc (slower). Install it with" \
             "'sudo apt-get install libtcmalloc-minimal4' or 'conda install -c conda-forge gperftools'"
    fi
fi
# Slurm for tests/test_slurm.py, which runs slurm/*.sh against a private two-node cluster on this machine
# (scripts/local_slurm.sh: real slurmctld + slurmd, no munge). Installed when we may, like tcmalloc.
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm ||
            { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
                slurm-wlm; }; } >/dev/null 2>&1 ||
            echo "setup: apt-get could not install slurm-wlm; the real-Slurm tests in tests/test_slurm.py will be skipped"
    else
        echo "setup: Slurm not found; the real-Slurm tests in tests/test_slurm.py need root and" \
             "'apt-get install slurm-wlm' (they are skipped otherwise)"
    fi
fi
ready=$(.venv/bin/python -c 'from importlib.metadata import version as v; from trainer.cpu_start import find_tcmalloc as f
print("torch", v("torch"), "deepspeed", v("deepspeed"), "- CPU host allocator:", "tcmalloc" if f() else "glibc")')
echo "setup: .venv ready ($ready)"
