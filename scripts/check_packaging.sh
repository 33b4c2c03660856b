#!/usr/bin/env bash
# Packaging check: install mergekit_fast the ways a user does, from what would be published.
#
#   scripts/check_packaging.sh [WORKDIR]     (CI runs it after `make test`; 3.5 to 7 minutes here)
#
# 1. `python -m build`: the sdist, then a wheel built FROM that sdist with build isolation (the
#    build gets its own setuptools and pybind11 from the index; torch is never a build
#    requirement). The sdist must hold every source the build needs and nothing a build
#    produced; the wheel must hold the native module and its build record.
# 2. A fresh virtualenv: torch==2.13.0 first and alone (an unpinned torch would pull a multi-GB
#    CUDA build; pip then keeps it, as it keeps any torch a user has), then the wheel.
#    mergekit_fast._C imports, `info` agrees with the record, and a tiny SLERP merge runs on the
#    native path (--backend cpp) with the same bytes as the torch path.
# 3. A second fresh virtualenv, the same torch first, then `pip install mergekit_fast-*.tar.gz`
#    with MERGEKIT_FAST_SKIP_NATIVE=1 (build isolation included, as a user would run it): no _C,
#    `info` says why, the merge runs on the torch path, --backend cpp fails with the reason, and
#    the tests pass (all but those that compare with mergekit, and the slow ones), those needing
#    _C skipped with the reason. The [hf] extra is installed: the MoE tests need it.
# Everything runs outside the source tree, so nothing imports the checkout by accident.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
# The tests run on the pure-Python install: all of them but those comparing with mergekit itself
# (not installed there) and the slow ones; `make test` runs the full suite on the native install.
PURE_TESTS=${PURE_TESTS:-tests}
WORK=${1:-$(mktemp -d "${TMPDIR:-/tmp}/mkf-packaging.XXXXXX")}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
SECONDS=0
log() { echo "[packaging $(printf '%3d' "$SECONDS")s] $*"; }
fail() {
  echo "[packaging] FAIL: $*" >&2
  exit 1
}
quiet() {  # quiet LOG CMD...: run, keep the output in LOG, show its tail on failure
  local out=$1
  shift
  if ! "$@" >"$out" 2>&1; then
    tail -n 60 "$out" >&2
    fail "$* (full log: $out)"
  fi
}
fresh_venv() {  # fresh_venv DIR: a virtualenv holding torch (pinned, installed alone) and nothing else
  rm -rf "$1"
  "$PY" -m venv "$1"
  quiet "$1.pip.log" "$1/bin/python" -m pip install --upgrade pip
  quiet "$1.torch.log" "$1/bin/python" -m pip install "$TORCH_SPEC"
}
torch_version() { "$1/bin/python" -W ignore -c "import torch; print(torch.__version__)"; }

log "work directory $WORK"
# ---------------------------------------------------------------- 1. sdist -> wheel
rm -rf "$WORK/tools" "$WORK/dist"
"$PY" -m venv "$WORK/tools"
quiet "$WORK/tools.log" "$WORK/tools/bin/python" -m pip install build
log "python -m build: the sdist, then a wheel from it (isolated build; native module, CUDA when nvcc is found)"
quiet "$WORK/build.log" "$WORK/tools/bin/python" -m build --outdir "$WORK/dist" "$ROOT"
SDIST=$(ls "$WORK"/dist/mergekit_fast-*.tar.gz)
WHEEL=$(ls "$WORK"/dist/mergekit_fast-*.whl)
log "built $(basename "$SDIST") and $(basename "$WHEEL")"
grep -E "^mergekit_fast: " "$WORK/build.log" | sed 's/^/    /' || true

TRACKED=$(git ls-files csrc triton_kernels mergekit_fast 2>/dev/null || true)
"$WORK/tools/bin/python" - "$SDIST" "$WHEEL" "$TRACKED" <<'EOF'
import sys, tarfile, zipfile, json
sdist, wheel, tracked = sys.argv[1], sys.argv[2], sys.argv[3].split()
with tarfile.open(sdist) as tf:
    names = {m.name.split("/", 1)[1] for m in tf.getmembers() if "/" in m.name}
missing = [f for f in tracked if f not in names]
assert not missing, f"the sdist lacks sources: {missing}"
for kind in (".h", ".cpp", ".cu"):
    assert any(n.startswith("csrc/") and n.endswith(kind) for n in names), f"no csrc/*{kind} in the sdist"
produced = [n for n in names if n.endswith((".so", ".o", ".pyc", "_build_info.json"))]
assert not produced, f"the sdist carries build products: {produced}"
with zipfile.ZipFile(wheel) as zf:
    wnames = zf.namelist()
    assert any(n.startswith("mergekit_fast/_C.") and n.endswith(".so") for n in wnames), "no _C in the wheel"
    modules = [f if f.startswith("mergekit_fast/") else f"mergekit_fast/{f}" for f in tracked if f.endswith(".py")]
    lacking = [m for m in modules if m not in wnames]
    assert not lacking, f"the wheel lacks modules: {lacking}"
    record = json.loads(zf.read("mergekit_fast/_build_info.json"))
assert record["native"] is True, record
print(f"    sdist: {len(names)} files, every tracked source ({len(tracked)}), no build products; "
      f"wheel: every module ({len(modules)}), _C and its record (build {record['build_id']})")
EOF

# ---------------------------------------------------------------- tiny merge, shared by both installs
cat >"$WORK/merge_check.py" <<'EOF'
"""python merge_check.py DIR BACKEND...: two tiny synthetic models, one SLERP merge per backend,
the same bytes from each (the C++ kernel is bit-exact with the torch reference)."""
import subprocess, sys
from pathlib import Path
from safetensors.torch import load_file
from mergekit_fast.testing import make_synthetic_model, slerp_gradient_config

root, backends = Path(sys.argv[1]), sys.argv[2:]
a = make_synthetic_model(root / "a", seed=1)
b = make_synthetic_model(root / "b", seed=2)
(root / "slerp.yml").write_text(slerp_gradient_config(a, b, 4))
bindir = Path(sys.executable).parent
outs = {}
for be in backends:
    out = root / f"out-{be}"
    subprocess.run([str(bindir / "mergekit-fast"), "merge", str(root / "slerp.yml"), str(out), "--force",
                    "--device", "cpu", "--backend", be, "-q", "--no-progress"], check=True)
    outs[be] = load_file(out / "model.safetensors")
first = outs[backends[0]]
for be, tensors in outs.items():
    assert tensors.keys() == first.keys() and all((tensors[k] == first[k]).all() for k in first), be
print(f"    merge ok: {len(first)} tensors, backends {', '.join(backends)} agree")
EOF

# ---------------------------------------------------------------- 2. the wheel, native
V=$WORK/venv-native
log "fresh virtualenv $V: $TORCH_SPEC first, alone"
fresh_venv "$V"
TV=$(torch_version "$V")
log "installing the wheel (torch $TV stays)"
quiet "$V.install.log" "$V/bin/python" -m pip install "$WHEEL"
[ "$(torch_version "$V")" = "$TV" ] || fail "installing the wheel replaced torch $TV"
cd "$WORK"
"$V/bin/python" -c "import mergekit_fast._C" || fail "the wheel's native module does not import"
"$V/bin/python" -m mergekit_fast.info | sed 's/^/    /'
"$V/bin/python" -m mergekit_fast.info --json >"$WORK/info-native.json"
NVCC_FOUND=0  # as setup.py looks for nvcc: $NVCC, $CUDA_HOME, $CUDA_PATH, /usr/local/cuda, PATH
for c in "${NVCC:-}" "${CUDA_HOME:-}/bin/nvcc" "${CUDA_PATH:-}/bin/nvcc" /usr/local/cuda/bin/nvcc "$(command -v nvcc || true)"; do
  [ -n "$c" ] && [ -x "$c" ] && NVCC_FOUND=1 && break
done
[ "${MERGEKIT_FAST_SKIP_CUDA:-0}" = 1 ] && NVCC_FOUND=0
"$V/bin/python" - "$WORK/info-native.json" "$V" "$NVCC_FOUND" <<'EOF'
import json, sys, platform
info, venv, nvcc = json.load(open(sys.argv[1])), sys.argv[2], sys.argv[3] == "1"
nat = info["native"]
assert info["package"].startswith(venv), f"imported {info['package']}, not the installed wheel"
assert nat["importable"] and nat["import_error"] is None, nat
assert nat["record_agrees"] is True, nat["record_note"]
assert info["backends"]["cpp"]["available"], info["backends"]["cpp"]
if platform.machine() == "x86_64":
    assert nat["facts"]["cpu"]["levels"] == ["baseline", "avx2", "avx512"], nat["facts"]["cpu"]
    assert nat["cpu_isa"]["in_use"] == nat["cpu_isa"]["supported"], nat["cpu_isa"]
assert nat["facts"]["cuda"]["built"] is nvcc, ("nvcc found" if nvcc else "no nvcc", nat["facts"]["cuda"])
print("    info: _C imports, the record agrees, CPU path", nat["cpu_isa"]["in_use"])
EOF
"$V/bin/python" "$WORK/merge_check.py" "$WORK/merge-native" cpp torch auto
cd "$ROOT"

# ---------------------------------------------------------------- 3. the sdist, pure Python
P=$WORK/venv-pure
log "fresh virtualenv $P: $TORCH_SPEC first, alone"
fresh_venv "$P"
TV=$(torch_version "$P")
log "MERGEKIT_FAST_SKIP_NATIVE=1 pip install $(basename "$SDIST")[hf] (isolated build)"
# The #sha256 fragment keys pip's wheel cache by the sdist's contents: without it, a second run with the
# same path installed the wheel pip built from an earlier sdist.
quiet "$P.install.log" env MERGEKIT_FAST_SKIP_NATIVE=1 "$P/bin/python" -m pip install \
  "mergekit_fast[hf] @ file://$SDIST#sha256=$(sha256sum "$SDIST" | cut -d' ' -f1)" pytest hypothesis "transformers>=5,<6"
[ "$(torch_version "$P")" = "$TV" ] || fail "installing the sdist replaced torch $TV"
cd "$WORK"
"$P/bin/python" -m mergekit_fast.info | sed 's/^/    /'
"$P/bin/python" -m mergekit_fast.info --json >"$WORK/info-pure.json"
"$P/bin/python" - "$WORK/info-pure.json" <<'EOF'
import json, sys
nat = json.load(open(sys.argv[1]))["native"]
assert not nat["importable"], nat
assert "MERGEKIT_FAST_SKIP_NATIVE=1" in nat["import_error"], nat["import_error"]
assert nat["record"]["native"] is False, nat["record"]
print("    info: no _C, because", nat["import_error"])
EOF
"$P/bin/python" "$WORK/merge_check.py" "$WORK/merge-pure" auto torch
if "$P/bin/mergekit-fast" merge "$WORK/merge-pure/slerp.yml" "$WORK/merge-pure/out-cpp" --backend cpp -q \
  >"$WORK/pure-cpp.log" 2>&1; then
  fail "--backend cpp ran without the native module"
fi
grep -q "MERGEKIT_FAST_SKIP_NATIVE=1" "$WORK/pure-cpp.log" || fail "--backend cpp failed without the reason: $(tail -3 "$WORK/pure-cpp.log")"
echo "    --backend cpp refused: $(grep -m1 -o "backend 'cpp'.*" "$WORK/pure-cpp.log" | cut -c1-150)"
# The tests, from the sdist (they travel in it), against the installed package.
rm -rf "$WORK/pure-tests" && mkdir -p "$WORK/pure-tests"
tar -xzf "$SDIST" -C "$WORK/pure-tests" --strip-components=1 --wildcards '*/tests/*' '*/pyproject.toml'
log "tests on the pure-Python install (-m 'not mergekit and not slow': mergekit is not installed there)"
cd "$WORK/pure-tests"
set +e
"$P/bin/python" -m pytest -q -p no:cacheprovider -m "not mergekit and not slow" $PURE_TESTS >"$WORK/pure-tests.log" 2>&1
rc=$?
set -e
grep -m 5 -E "^SKIPPED .*(_C|native)" "$WORK/pure-tests.log" | sed 's/^/    /' || true
tail -n 3 "$WORK/pure-tests.log" | sed 's/^/    /'
[ $rc = 0 ] || fail "tests failed on the pure-Python install (log: $WORK/pure-tests.log)"
cd "$ROOT"
log "packaging check passed"
