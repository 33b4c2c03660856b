#!/usr/bin/env bash
# Set up a local virtualenv for mergekit_fast on a fresh machine, idempotently.
#   * creates $VENV (default .venv) unless it exists;
#   * installs torch 2.13.0 (CPU wheel) ONLY when the environment has no torch at all: an unpinned
#     requirement would pull a multi-GB CUDA build, and a torch the user already has is kept;
#   * installs the package in editable mode, building the native module (C++; CUDA when nvcc is
#     found), plus the extras named in $EXTRAS (default "test").
# Re-running it after a change to setup.py or csrc/ rebuilds the native module. It says what it
# is doing as it goes; the pip output is kept in $VENV/bootstrap-*.log (shown when a step fails).
# First run on a 2-core machine: 2 to 4 minutes (torch ~20 s, the test dependencies ~40 s once
# pip has them cached, longer the first time; the native module ~75 s with nvcc, ~20 s without);
# later runs only redo what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-test}
PY=${PYTHON:-python3}
SECONDS=0
say() { echo "[bootstrap $(printf '%3d' "$SECONDS")s] $*"; }
pip_step() {  # pip_step NAME ARGS...: pip install ARGS, the build's progress lines shown, the rest logged
  local name=$1
  shift
  local logf="$VENV/bootstrap-$name.log"
  if ! "$VPY" -m pip install -v "$@" 2>&1 | tee "$logf" | { grep --line-buffered -E '^ *mergekit_fast: ' || true; } |
    sed -u 's/^ *mergekit_fast: /[bootstrap]        /'; then
    grep -vE "is ignored" "$logf" | tail -n 40
    say "FAILED: pip install $* (full log: $logf)"
    exit 1
  fi
}

if [ ! -x "$VENV/bin/python" ]; then
  say "creating virtualenv $VENV"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
say "setuptools and pybind11 in $VENV (the native build's tools; kept when new enough)"
pip_step tools "setuptools>=77" pybind11

if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  say "no torch in $VENV: installing torch==2.13.0 (CPU wheel, alone first; about 20 s)"
  pip_step torch "torch==2.13.0"
else
  say "keeping installed torch $("$VPY" -c 'import torch; print(torch.__version__)')"
fi

spec="."
[ -n "$EXTRAS" ] && spec=".[$EXTRAS]"
if command -v nvcc >/dev/null 2>&1 || [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]; then
  native="C++ kernels for three CPU levels and CUDA kernels (nvcc found): about 75 s the first time"
else
  native="C++ kernels for three CPU levels (no nvcc: no CUDA kernels): about 20 s the first time"
fi
[ "${MERGEKIT_FAST_SKIP_NATIVE:-0}" = 1 ] && native="skipped (MERGEKIT_FAST_SKIP_NATIVE=1: pure-Python install)"
say "installing mergekit_fast ($spec) in editable mode: its dependencies first"
[ "$EXTRAS" = test ] && say "  (the test oracles mergekit 0.1.5 and transformers, and triton: under a minute once pip has them cached)"
say "  then the native module mergekit_fast._C: $native"
# No build isolation: the build needs only setuptools and pybind11 (installed above), never torch,
# and this way the set-up also works offline (as on the lent GPU machine) once they are there.
pip_step package --no-build-isolation -e "$spec"
"$VPY" -c "import torch, mergekit_fast; print('[bootstrap] torch', torch.__version__)"
"$VPY" -m mergekit_fast.info | sed 's/^/[bootstrap] /'
say "set-up done"
