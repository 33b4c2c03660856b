#!/usr/bin/env bash
# Set up a local virtualenv for mergekit_fast on a fresh machine, idempotently.
#   * creates $VENV (default .venv) unless it exists;
#   * installs torch 2.13.0 (CPU wheel) ONLY when the environment has no torch at all: an unpinned
#     requirement would pull a multi-GB CUDA build, and a torch the user already has is kept;
#   * installs the package in editable mode, building the native module (C++; CUDA when nvcc is
#     found), plus the extras named in $EXTRAS (default "test").
# Re-running it after a change to setup.py or csrc/ rebuilds the native module.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-test}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[bootstrap] creating virtualenv $VENV"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
"$VPY" -m pip install -q --upgrade pip setuptools wheel pybind11 2>&1 | grep -v "is ignored" || true

if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  echo "[bootstrap] no torch in $VENV: installing torch==2.13.0 (CPU wheel)"
  "$VPY" -m pip install -q "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
else
  echo "[bootstrap] keeping installed torch $("$VPY" -c 'import torch; print(torch.__version__)')"
fi

spec="."
[ -n "$EXTRAS" ] && spec=".[$EXTRAS]"
echo "[bootstrap] installing mergekit_fast ($spec) and building the native module"
# No build isolation: the build needs only setuptools and pybind11 (installed above), never torch.
"$VPY" -m pip install -q --no-build-isolation -e "$spec" 2>&1 | grep -vE "is ignored|^\s*$" | grep -iE "error|warn|mergekit_fast" || true
"$VPY" -c "import torch, mergekit_fast; print('[bootstrap] torch', torch.__version__)"
"$VPY" -m mergekit_fast.info | sed 's/^/[bootstrap] /'
