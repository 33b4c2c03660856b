#!/usr/bin/env bash
# One-shot GPU check for a lent GPU machine (H200: no network; torch, triton, nvcc, pytest there).
#
#   bench/gpu_check.sh RESULTS_DIR
#
# 1. installs the project without network (CUDA built for the local GPU only) and fails that step
#    unless mergekit_fast._C imports, with its CUDA kernels where there is a GPU;
# 2. runs the GPU-marked tests;
# 3. runs the kernel benchmark of every op: for each mergekit_fast/ops/<op>.py, bench/bench_<op>.py
#    with the common flags `--quick --device DEV --out DIR` (a new op's benchmark accepts them
#    and is picked up; an op without one fails its step, bench_<op>: FAIL (missing));
# 4. merges two random ~1B models end to end on the GPU and on the CPU path;
# 5. prints a pass/fail summary with the key figures and the files actually written.
# Plots need matplotlib. Without it the benchmarks write their CSVs only, and the summary says so;
# make the plots afterwards on any machine with matplotlib: python bench/plot.py RESULTS_DIR/*.csv
# Without a GPU it says so and runs the CPU parts (CI runs it that way: GPU_CHECK_SIZE=tiny).
# Budget: about 8 minutes on an H200. Missing Python packages there can travel as wheels in ./.whl
# (see /work/.library/device/README.md); they are installed first when present.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/results/gpu_check}
SIZE=${GPU_CHECK_SIZE:-1b}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
declare -A STATUS
ORDER=()
log() { echo "[gpu_check] $*"; }
step() {  # step NAME CMD... : run, tee the log, record pass/fail
  local name=$1
  shift
  ORDER+=("$name")
  log "== $name"
  if "$@" > >(tee "$OUT/$name.log") 2>&1; then STATUS[$name]=pass; else STATUS[$name]=FAIL; fi
}

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

GPU=0
if $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  GPU=1
  log "GPU: $($PY -c 'import torch; print(torch.cuda.get_device_name(0))')"
  export MERGEKIT_FAST_CUDA_ARCHS=${MERGEKIT_FAST_CUDA_ARCHS:-native}
else
  log "no GPU visible: running the CPU parts only"
fi

install() {
  if ! $PY -c "import mergekit_fast._C" 2>/dev/null || [ "$GPU" = 1 ]; then
    # No build isolation: there is no network here, and setuptools and pybind11 are installed.
    $PY -m pip install -q --no-build-isolation --no-deps -e . || return 1
  fi
  if ! $PY -c "import mergekit_fast._C"; then
    echo "the native module mergekit_fast._C does not import: every native benchmark would be skipped"
    return 1
  fi
  if [ "$GPU" = 1 ] && ! $PY -c "import sys, mergekit_fast._C as C; sys.exit(0 if C.with_cuda else 1)"; then
    echo "the native module has no CUDA kernels (was nvcc found?)"
    return 1
  fi
}
step install install
step info $PY -m mergekit_fast.info

DEVICE=cpu
if [ "$GPU" = 1 ]; then
  DEVICE=cuda
  step gpu_tests $PY -m pytest -q -m gpu -p no:cacheprovider tests/
fi

HAVE_MPL=1
$PY -c "import matplotlib" 2>/dev/null || HAVE_MPL=0
[ "$HAVE_MPL" = 1 ] || log "matplotlib is not installed: the benchmarks write CSVs only (plots: bench/plot.py)"
missing() {
  echo "no bench/$1.py for mergekit_fast/ops/${1#bench_}.py"
  return 1
}
for op_file in mergekit_fast/ops/*.py; do
  op=$(basename "$op_file" .py)
  case $op in _* | __*) continue ;; esac
  if [ -f "bench/bench_$op.py" ]; then
    step "bench_$op" $PY "bench/bench_$op.py" --quick --device $DEVICE --out "$OUT"
  else
    step "bench_$op" missing "bench_$op"
  fi
done
step e2e_cpu $PY bench/bench_merge.py --synthetic --size "$SIZE" --skip-mergekit --runs 1 --device cpu \
  --verify 8 --out "$OUT"
if [ "$GPU" = 1 ]; then
  step e2e_gpu $PY bench/bench_merge.py --synthetic --size "$SIZE" --skip-mergekit --runs 1 --device cuda \
    --verify 8 --out "$OUT"
fi

log "== summary ($OUT)"
$PY - "$OUT" <<'EOF'
import csv, glob, os, sys
out = sys.argv[1]
def rows(pattern):
    r = []
    for f in glob.glob(f"{out}/{pattern}"):
        with open(f) as fh:
            r += list(csv.DictReader(fh))
    return r
s = [r for r in rows("slerp-*.csv") if r["bench"] == "slerp" and r["backend"] in ("cuda", "triton", "cpp")]
for b in sorted({r["backend"] for r in s}):
    best = max((r for r in s if r["backend"] == b), key=lambda r: float(r["GBps"]))
    print(f"  SLERP {b:6s} best {float(best['GBps']):8.1f} GB/s = {float(best['frac_of_copy']):.0%} of copy "
          f"bandwidth ({float(best['copy_GBps']):.0f} GB/s) at n={best['numel']} ({best['dtype']})")
for r in rows("routing*.csv"):
    if str(r.get("T")) == "4096":
        print(f"  routing T=4096 E={r['E']} k={r['k']} {r['provider']:12s} {float(r['us']):9.1f} us")
for r in rows("merge-*.csv"):
    print(f"  merge {r['bench']} {r['model']} on {r['device']}: {float(r['seconds']):.2f} s, "
          f"{float(r['input_GBps']):.2f} GB/s of input, peak RSS {int(r['peak_rss']) / 2**30:.2f} GiB")
for kind in ("csv", "png"):
    files = sorted(os.path.basename(f) for f in glob.glob(f"{out}/*.{kind}"))
    print(f"  {kind.upper()} written: {', '.join(files) if files else 'none'}")
EOF
if [ "$HAVE_MPL" = 0 ]; then
  log "no plots here (no matplotlib); on a machine with matplotlib: python bench/plot.py $OUT/*.csv"
fi
fail=0
for k in "${ORDER[@]}"; do
  log "$k: ${STATUS[$k]}"
  [ "${STATUS[$k]}" = pass ] || fail=1
done
[ $fail = 0 ] && log "ALL PASS" || log "SOME STEPS FAILED"
exit $fail
