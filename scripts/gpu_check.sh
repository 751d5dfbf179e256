#!/usr/bin/env bash
# The GPU acceptance check (issue #15, docs/gpu.md), from the repository root of a GPU machine:
#   bash scripts/gpu_check.sh [OUTDIR]            OUTDIR defaults to $OUT (the lent machine's), else gpu_check_out
# installs the carried wheels (.whl/, filled on a networked machine by scripts/gpu_wheels.sh) into a temporary
# target, then runs scripts/gpu_check.py within GPU_CHECK_BUDGET_S (480 s, the install included): corpus and
# shards, the FusedAdam JIT build, pytest -m gpu, pretraining with zero2.json, ZeRO-1/3 with a resume, the
# benchmarks and the no-CPU-workaround check. OUTDIR gets gpu_check.json and gpu_check.log, nothing else.
#   bash scripts/gpu_check.sh --dry-run [OUTDIR]  on a CPU (CI): validates .whl/ if present (else prints the
# wheel plan), prints the GPU plan, and runs the same stages on a tiny CPU configuration (60-75 s on 2 cores).
# A GPU node with network: pip install -e . first (deepspeed, hjson, pydantic, webdataset, blingfire), then
# the same command; without .whl/ the installed packages are used.
set -euo pipefail
cd "$(dirname "$0")/.."
# The project from this tree, importable by scripts/gpu_check.py in every branch below (on the device it is not
# pip-installed; here .venv has it as an editable install, which this path equals).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s)
BUDGET_S=${GPU_CHECK_BUDGET_S:-480}
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUTDIR=${1:-${OUT:-gpu_check_out}}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
LOG=$OUTDIR/gpu_check.log
WORK=${GPU_CHECK_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}
mkdir -p "$WORK"
if [ "$DRY" = 1 ] && [ -z "${GPU_CHECK_WORK:-}" ]; then trap 'rm -rf "$WORK"' EXIT; fi
: >"$LOG"
rm -f "$OUTDIR/gpu_check.json"
say() { echo "gpu_check: $*" | tee -a "$LOG"; }

if [ -n "${GPU_CHECK_PYTHON:-}" ]; then PY=$GPU_CHECK_PYTHON
elif [ "$DRY" = 1 ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3
fi

# 1. The wheels: validated (dry run) or installed (GPU). setup_* go into the JSON as the "setup" stage.
setup_ok=true
setup_detail=""
if [ "$DRY" = 1 ]; then
    if compgen -G ".whl/*.whl" >/dev/null; then
        if "$PY" scripts/gpu_wheels_check.py --wheels .whl >>"$LOG" 2>&1; then
            setup_detail="validated .whl/: $(tail -n 1 "$LOG")"
        else
            setup_ok=false setup_detail="scripts/gpu_wheels_check.py finds .whl/ incomplete (PROBLEM lines in the log)"
        fi
    else
        "$PY" scripts/gpu_wheels_check.py --dry-run >>"$LOG" 2>&1 || setup_ok=false
        setup_detail="no .whl/: wheel validation skipped (run scripts/gpu_wheels.sh to fill it); plan: $(tail -n 1 "$LOG")"
    fi
else
    if compgen -G ".whl/*.whl" >/dev/null; then
        if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
            .whl/*.whl >>"$LOG" 2>&1; then
            export PYTHONPATH="$WORK/site:$PYTHONPATH"
            setup_detail="installed $(find .whl -maxdepth 1 -type f -name '*.whl' | wc -l) carried wheels into $WORK/site"
        else
            setup_ok=false setup_detail="pip could not install .whl/*.whl (its words are in the log)"
        fi
    else
        setup_detail="no .whl/: using the installed packages"
    fi
    if ! "$PY" -c "import deepspeed, hjson, pydantic, webdataset, torch; assert torch.cuda.is_available()" >>"$LOG" 2>&1; then
        setup_ok=false setup_detail="$setup_detail; deepspeed/hjson/pydantic/webdataset do not import or CUDA is unavailable"
    fi
    # FusedAdam is JIT-built for this GPU only, with every core, into a folder of this run.
    cap=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo 9.0)
    export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$cap}
    export MAX_JOBS=${MAX_JOBS:-$(nproc)}
    export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$WORK/torch_extensions}
    if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null; then
        CUDA_HOME=$(dirname "$(dirname "$(command -v nvcc)")")
        export CUDA_HOME
    fi
fi
say "setup: $($setup_ok && echo ok || echo FAILED): $setup_detail ($(($(date +%s) - START)) s)"

# 2. The stages (the dry run prints the GPU plan first: what the GPU machine will run).
if [ "$DRY" = 1 ]; then "$PY" scripts/gpu_check.py --plan | tee -a "$LOG" || true; fi
args=(--out "$OUTDIR" --work "$WORK" --deadline $((START + BUDGET_S - 10))
      --setup "$($setup_ok && echo pass || echo fail)" --setup-detail "$setup_detail" --setup-wall $(($(date +%s) - START)))
if [ "$DRY" = 1 ]; then args+=(--dry-run); fi
rc=0
timeout --kill-after=10 $((BUDGET_S - ($(date +%s) - START))) "$PY" scripts/gpu_check.py "${args[@]}" || rc=$?
[ "$rc" != 124 ] || say "the check overran its ${BUDGET_S} s and was stopped; the JSON holds the stages that ended"
if [ ! -s "$OUTDIR/gpu_check.json" ]; then  # the check could not even start (its error is in the log): say so
    printf '{"kit": "scripts/gpu_check.sh", "mode": "%s", "summary": {"ok": false}, "error": "%s", "setup": "%s"}\n' \
        "$([ "$DRY" = 1 ] && echo dry-run || echo gpu)" "scripts/gpu_check.py exited $rc before writing its report" \
        "${setup_detail//[\"\\]/}" >"$OUTDIR/gpu_check.json"
    tail -n 20 "$LOG"
fi
verdict=$([ "$rc" = 0 ] && echo PASS || echo FAIL)
say "$verdict (exit $rc) in $(($(date +%s) - START)) s$([ "$DRY" = 1 ] && echo ' (dry run)'): $OUTDIR/gpu_check.json, $LOG"
exit "$rc"
