#!/usr/bin/env bash
# One-shot GPU check for a lent GPU machine (H200: no network; torch, triton, nvcc, pytest there).
#
#   bench/gpu_check.sh RESULTS_DIR
#
# 1. installs the project without network, CUDA built for the local GPU only;
# 2. runs the GPU-marked tests;
# 3. runs the kernel benchmarks (SLERP large and segmented, routing);
# 4. merges two random ~1B models end to end on the GPU and on the CPU path;
# 5. prints a pass/fail summary with the key figures.
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
log() { echo "[gpu_check] $*"; }
step() {  # step NAME CMD... : run, tee the log, record pass/fail
  local name=$1; shift
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

if ! $PY -c "import mergekit_fast._C" 2>/dev/null || [ "$GPU" = 1 ]; then
  step install $PY -m pip install -q --no-build-isolation --no-deps -e .
else
  STATUS[install]=pass
fi
step info $PY -m mergekit_fast.info

DEVICE=cpu
if [ "$GPU" = 1 ]; then
  DEVICE=cuda
  step gpu_tests $PY -m pytest -q -m gpu -p no:cacheprovider tests/
fi
QUICK=--quick
step bench_slerp $PY bench/bench_slerp.py $QUICK --device $DEVICE --out "$OUT"
step bench_routing $PY bench/bench_routing.py $QUICK --device $DEVICE --out "$OUT"
step e2e_cpu $PY bench/bench_merge.py --synthetic --size "$SIZE" --skip-mergekit --runs 1 --device cpu \
  --verify 8 --out "$OUT"
if [ "$GPU" = 1 ]; then
  step e2e_gpu $PY bench/bench_merge.py --synthetic --size "$SIZE" --skip-mergekit --runs 1 --device cuda \
    --verify 8 --out "$OUT"
fi

log "== summary ($OUT)"
$PY - "$OUT" <<'EOF'
import csv, glob, sys
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
EOF
fail=0
for k in "${!STATUS[@]}"; do
  log "$k: ${STATUS[$k]}"
  [ "${STATUS[$k]}" = pass ] || fail=1
done
[ $fail = 0 ] && log "ALL PASS" || log "SOME STEPS FAILED"
exit $fail
