#!/usr/bin/env bash
# Fill .whl/ (ignored) with the wheels the lent GPU machine lacks, then check that the folder is complete.
# That machine has Python 3.12 (torch, transformers, tokenizers, ... preinstalled) and no network, so
# deepspeed, hjson, pydantic, webdataset, blingfire and their needs travel as cp312/py3 manylinux wheels.
#   1. scripts/gpu_wheels_check.py --pins lists NAME==VERSION still missing or stale, pinned to what this
#      project's venv resolved; each one is downloaded (deepspeed: built from its sdist, pure Python,
#      DS_BUILD_OPS=0: its ops are JIT-built on the GPU machine from the csrc/ the wheel carries).
#   2. scripts/gpu_wheels_check.py checks the folder: complete, one wheel each, tags, no shadowing, size.
#   3. the wheels are installed together into a temporary folder with a Python 3.12 (the device's install
#      line) and the carried modules imported; without a 3.12, pip resolves them for 3.12 (dry run).
# Idempotent: a second run downloads nothing. The venv: GPU_WHEELS_PYTHON, else .venv, else the main
# worktree's .venv. On the device: python3 -m pip install -q --no-index --no-deps --no-compile
# --no-cache-dir --upgrade --target "$SITE" .whl/*.whl && export PYTHONPATH="$SITE" (SITE: a scratch folder)
set -euo pipefail
cd "$(dirname "$0")/.."
WHL=.whl
SIM=build/gpu_wheels_sim  # stand-ins for device packages, only for the import test here
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64)

die() { echo "gpu_wheels: $*" >&2; exit 1; }
quiet() {  # run a command; show its output (less pip's noise about absent local indexes) only if it fails
    local log rc=0
    log=$(mktemp)
    "$@" >"$log" 2>&1 || rc=$?
    [ "$rc" = 0 ] || grep -v '^WARNING: Location' "$log" >&2
    rm -f "$log"
    return "$rc"
}

PY=${GPU_WHEELS_PYTHON:-}
if [ -z "$PY" ]; then
    main_venv="$(git rev-parse --path-format=absolute --git-common-dir 2>/dev/null || echo /nonexistent)/../.venv"
    for c in .venv/bin/python "$main_venv/bin/python"; do
        if [ -x "$c" ]; then PY=$c; break; fi
    done
fi
[ -n "$PY" ] || die "no project venv: run scripts/setup.sh (or set GPU_WHEELS_PYTHON)"
CHECK=("$PY" scripts/gpu_wheels_check.py --wheels "$WHL")

# pip download for CPython 3.12 manylinux x86_64; more manylinux_2_N if the usual ones find nothing.
download() {  # DEST NAME==VERSION
    local n args=() more=()
    args=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d "$1" "${PLATFORMS[@]/#/--platform=}")
    for n in $(seq 5 39); do more+=("--platform=manylinux_2_${n}_x86_64"); done
    "$PY" -m pip download -q "${args[@]}" "$2" >/dev/null 2>&1 || quiet "$PY" -m pip download -q "${args[@]}" "${more[@]}" "$2" ||
        die "no Python 3.12 manylinux x86_64 wheel of $2 could be downloaded (pip's words above)"
}

# PyPI ships deepspeed as an sdist only: build a pure-Python wheel with no op prebuilt.
build_deepspeed() {  # VERSION
    local tmp
    tmp=$(mktemp -d)
    quiet "$PY" -m pip download -q --no-deps --no-binary=:all: -d "$tmp" "deepspeed==$1" ||
        die "could not download the sdist of deepspeed==$1 (pip's words above)"
    quiet env DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-cache-dir -w "$tmp/out" "$tmp"/deepspeed-*.tar.gz ||
        die "building a wheel of deepspeed==$1 with DS_BUILD_OPS=0 failed (pip's words above)"
    mv "$tmp"/out/deepspeed-*.whl "$WHL"/
    rm -rf "$tmp"
}

mkdir -p "$WHL"
fetched=()
for round in 1 2 3; do
    plan=$("${CHECK[@]}" --pins) || die "cannot plan the wheels (see above)"
    [ -n "$plan" ] || break
    readarray -t pins <<<"$plan"
    [ "$round" -lt 3 ] || die "still missing after two rounds of downloads: ${pins[*]}"
    for pin in "${pins[@]}"; do
        name=${pin%%==*} version=${pin#*==}
        find "$WHL" -maxdepth 1 -type f -iname "${name//-/_}-*.whl" -delete  # a stale version goes first
        echo "gpu_wheels: fetching $pin"
        if [ "$name" = deepspeed ]; then build_deepspeed "$version"; else download "$WHL" "$pin"; fi
        fetched+=("$pin")
    done
done

"${CHECK[@]}" || die "$WHL is not complete (PROBLEM lines above)"

# Do they install together, the way the device installs them?
py312=${GPU_WHEELS_PY312:-}  # a path, or "none" for the dry run alone
[ -n "$py312" ] || for c in "$(command -v python3.12 || true)" "$HOME"/.pyenv/versions/3.12*/bin/python3.12 \
         "$(command -v uv >/dev/null && uv python find 3.12 2>/dev/null || true)"; do
    if [ -n "$c" ] && [ -x "$c" ] && "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
        py312=$c; break
    fi
done
site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT
if [ "$py312" != none ] && [ -n "$py312" ]; then
    quiet "$py312" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        "$WHL"/*.whl || die "the wheels do not install together with $py312 (pip's words above)"
    # Import what imports without torch, on stand-ins (this venv's versions) for the device's own packages.
    mkdir -p "$SIM"
    for pkg in typing-extensions numpy pyyaml; do
        v=$("$PY" -c "from importlib.metadata import version; print(version('$pkg'))")
        [ -n "$(find "$SIM" -maxdepth 1 -iname "${pkg//-/_}-$v-*.whl")" ] || download "$SIM" "$pkg==$v"
    done
    quiet "$py312" -m pip install -q --no-index --no-deps --target "$site/sim" "$SIM"/*.whl ||
        die "the stand-ins in $SIM do not install"
    PYTHONPATH="$site:$site/sim" "$py312" - <<'EOF' || die "a carried module does not import on Python 3.12"
import blingfire, braceexpand, hjson, pydantic, webdataset
assert blingfire.text_to_sentences("One sentence. Another one.").count("\n") == 1
assert pydantic.TypeAdapter(int).validate_python("3") == 3 and hjson.loads("{a: 1}") == {"a": 1}
assert list(braceexpand.braceexpand("s-{0..1}.tar")) == ["s-0.tar", "s-1.tar"]
EOF
    "$py312" -m compileall -q "$site/deepspeed" >/dev/null || die "deepspeed's sources do not compile on Python 3.12"
    verified="installed together with $("$py312" -V) ($py312); blingfire, braceexpand, hjson, pydantic, webdataset"
    verified+=" imported (stand-ins: typing-extensions, numpy, pyyaml); deepspeed byte-compiled (its import needs torch)"
else
    quiet "$PY" -m pip install -q --dry-run --no-index --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${PLATFORMS[@]/#/--platform=}" --target "$site" "$WHL"/*.whl ||
        die "pip does not accept the wheels together for Python 3.12 (pip's words above)"
    verified="without a Python 3.12: pip resolved them for 3.12 in a dry run only (not installed, not imported)"
fi

n=$(find "$WHL" -maxdepth 1 -type f -name '*.whl' | wc -l)
size=$(du -sh --apparent-size "$WHL" | cut -f1)
echo "gpu_wheels: OK: $n wheels, $size in $PWD/$WHL; fetched this run: ${fetched[*]:-nothing (already complete)}"
echo "gpu_wheels: $verified"
