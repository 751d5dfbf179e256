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
echo "setup: .venv ready ($(.venv/bin/python -c 'from importlib.metadata import version as v; print("torch", v("torch"), "deepspeed", v("deepspeed"))'))"
