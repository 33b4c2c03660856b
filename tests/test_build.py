"""The native build: what it holds (CPU levels, CUDA targets), that info and the build record tell
the truth about it, and that every CPU level computes exactly what the reference computes."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import needs_native

from mergekit_fast import _native, backends, info

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def _nvcc_present() -> bool:
    cuda_home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    return shutil.which("nvcc") is not None or (Path(cuda_home) / "bin" / "nvcc").exists()


def _facts() -> dict:
    return _native.module_facts() or {}


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True,
                          text=True, cwd=TESTS, timeout=300)  # fmt: skip


@needs_native
def test_native_module_imports_without_a_gpu():
    # A fresh interpreter with no GPU visible: importing the module (and its CUDA runtime, linked
    # statically) must not touch a device.
    res = _run("import mergekit_fast._C as C; print(C.with_cuda)", CUDA_VISIBLE_DEVICES="")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() in ("True", "False")


@needs_native
@pytest.mark.skipif(not _nvcc_present(), reason="nvcc is not installed here")
def test_build_has_cuda_when_nvcc_is_present():
    cuda = _facts().get("cuda") or {}
    if cuda.get("reason") == "MERGEKIT_FAST_SKIP_CUDA=1 at build time":
        pytest.skip("this build opted out of CUDA (MERGEKIT_FAST_SKIP_CUDA=1)")
    assert cuda.get("built") is True, f"nvcc is installed but the native build has no CUDA kernels: {cuda}"
    assert _native.C.with_cuda is True
    for name in ("slerp_cuda", "slerp_segments_cuda", "slerp_cuda_workspace_bytes"):
        assert hasattr(_native.C, name), name
    # The workspace holds 2 coefficients and 3 partials per 16384 elements (at least one chunk).
    assert _native.C.slerp_cuda_workspace_bytes(1) == 8 * (2 + 3)
    assert _native.C.slerp_cuda_workspace_bytes(16384) == 8 * (2 + 3)
    assert _native.C.slerp_cuda_workspace_bytes(3 * 16384 + 1) == 8 * (2 + 3 * 4)
    # A default build holds machine code for every target this nvcc supports, and PTX.
    if cuda.get("requested", "").startswith("default"):
        supported = set(re.findall(r"sm_(\w+)", subprocess.run(
            [shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc", "--list-gpu-code"],
            capture_output=True, text=True).stdout))  # fmt: skip
        assert set(cuda["sass"]) == {"80", "90", "100"} & supported
        assert cuda["ptx"] == [cuda["sass"][-1]]


@needs_native
def test_the_build_record_describes_the_importable_module():
    # The record is written by the build that produced the module, beside it (inside a wheel too).
    agrees, note = _native.record_status()
    assert agrees is True, note
    assert _native.build_record() == _facts()
    assert re.fullmatch(r"[0-9a-f]{16}", _facts()["build_id"])


def test_info_says_what_is_true():
    res = subprocess.run([sys.executable, "-m", "mergekit_fast.info"], capture_output=True, text=True,
                         cwd=TESTS, timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stderr
    for name in backends.BACKENDS:
        assert f"  {name} " in res.stdout, f"{name} missing from:\n{res.stdout}"
    if _native.C is None:
        assert "native module mergekit_fast._C unavailable: " in res.stdout
        assert _native.import_error() in res.stdout
        assert "cpp     unavailable" in res.stdout
    else:
        assert f"native module mergekit_fast._C imports (build {_facts()['build_id']}" in res.stdout
        assert f"CPU kernels  {_native.cpu_isa()['in_use']}" in res.stdout
    data = json.loads(subprocess.run([sys.executable, "-m", "mergekit_fast.info", "--json"], capture_output=True,
                                     text=True, cwd=TESTS, timeout=120).stdout)  # fmt: skip
    assert data["native"]["importable"] is (_native.C is not None)
    assert data["native"]["facts"] == _native.module_facts()


def test_a_stale_record_is_called_stale(monkeypatch, tmp_path):
    # A record from another build (e.g. a pure-Python build's, or one an old sdist carried) never
    # passes for the module that imports.
    stale = tmp_path / "_build_info.json"
    stale.write_text(json.dumps({"native": True, "build_id": "0123456789abcdef", "cuda": {"built": True}}))
    monkeypatch.setattr(_native, "RECORD", stale)
    agrees, note = _native.record_status()
    if _native.C is None:
        assert agrees is None
        assert "built but does not import" in _native.import_error()
    else:
        assert agrees is False and "stale" in note
        assert "stale" in info.format_text(info.collect())


def test_a_pure_python_record_explains_the_missing_module(monkeypatch, tmp_path):
    rec = tmp_path / "_build_info.json"
    rec.write_text(json.dumps({"native": False, "reason": "MERGEKIT_FAST_SKIP_NATIVE=1 at build time"}))
    monkeypatch.setattr(_native, "RECORD", rec)
    monkeypatch.setattr(_native, "C", None)
    assert (
        _native.import_error()
        == "the native module was not built (MERGEKIT_FAST_SKIP_NATIVE=1 at build time)"
    )
    assert backends.unavailable_reason("cpp", "cpu") == _native.import_error()


# ----------------------------------------------------------------------------- CPU levels

_LEVELS = ["baseline", "avx2", "avx512"]

# Runs in a fresh interpreter under MERGEKIT_FAST_CPU_ISA: the C++ kernels on tails, block edges
# and adversarial routing rows, each compared with the torch reference, and a digest of every
# output byte so that the levels can be compared with each other.
_LEVEL_CHECK = r"""
import hashlib, torch
import mergekit_fast as mk
from mergekit_fast import _native
from mergekit_fast.ops.slerp import slerp_ref
from mergekit_fast.ops.routing import topk_routing_ref
from test_routing import _adversarial_logits, _configs
C, h, g = _native.C, hashlib.sha256(), torch.Generator().manual_seed(0)
for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
    for n in (1, 7, 8, 9, 1000, 16384 + 13, 300_001):
        a = torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
        b = torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
        out, ref = mk.slerp(0.37, a, b, backend="cpp"), slerp_ref(0.37, a, b)
        # fp64: the coefficients keep fp64 sums taken in another order than the reference's, so
        # the last bit may differ; every other dtype rounds them to fp32 and is bit-exact.
        exact = torch.equal(out, ref) if dtype != torch.float64 else torch.allclose(out, ref, 1e-14, 1e-14)
        assert exact, (dtype, n)
        h.update(out.view(torch.uint8).numpy().tobytes())
    outs = mk.slerp_batched([0.1, 0.9, 0.5], [a[:5], a[:4000], a], [b[:5], b[:4000], b], backend="cpp")
    for o in outs:
        h.update(o.view(torch.uint8).numpy().tobytes())
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for E, k in ((8, 2), (64, 6), (256, 8)):
        x = _adversarial_logits(45, E, dtype, seed=E + k)
        for name, kw in _configs(E, k).items():
            w, ids = mk.topk_routing(x, k, backend="cpp", **kw)
            wr, idr = topk_routing_ref(x, k, **kw)
            assert torch.equal(ids, idr) and torch.equal(w, wr), (dtype, E, k, name)
            h.update(w.numpy().tobytes() + ids.numpy().tobytes())
print(C.cpu_isa()["in_use"], h.hexdigest())
"""


def _dispatch_build() -> bool:
    return (_facts().get("cpu") or {}).get("mode") == "dispatch"


@needs_native
def test_every_cpu_level_computes_exactly_the_reference():
    if not _dispatch_build():
        pytest.skip(f"this build has one CPU level ({_native.cpu_isa()['compiled']})")
    supported = _native.cpu_isa()["supported"]
    levels = _LEVELS[: _LEVELS.index(supported) + 1]
    digests = {}
    for level in levels:
        res = _run(_LEVEL_CHECK, MERGEKIT_FAST_CPU_ISA=level)
        assert res.returncode == 0, f"{level}:\n{res.stderr[-3000:]}"
        in_use, digest = res.stdout.split()
        assert in_use == level
        digests[level] = digest
    assert len(set(digests.values())) == 1, f"the CPU levels disagree: {digests}"
    if len(levels) < len(_LEVELS):
        pytest.skip(f"this CPU runs only {', '.join(levels)}; the others were not checked")


@needs_native
def test_an_unknown_cpu_level_is_an_error():
    res = _run("import torch, mergekit_fast as mk; mk.slerp(0.5, torch.ones(4), torch.ones(4), backend='cpp')",
               MERGEKIT_FAST_CPU_ISA="avx9000")  # fmt: skip
    assert res.returncode != 0
    assert "MERGEKIT_FAST_CPU_ISA=avx9000 is not one of auto, baseline, avx2, avx512" in res.stderr


@needs_native
def test_wide_instructions_only_in_their_own_level():
    # cpu_isa.h: shared inline code is linked from the baseline objects, so no function outside
    # the avx2 and avx512 namespaces holds a VEX/EVEX instruction (vzeroupper included: it is an
    # AVX instruction too), which a baseline CPU could not run.
    if not _dispatch_build():
        pytest.skip("not a portable (dispatch) build")
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump is not installed")
    dis = subprocess.run([objdump, "-d", "--no-show-raw-insn", "-C", _native.C.__file__], capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    offenders, fn = set(), None
    for line in dis.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if m:
            fn = m.group(1)
            continue
        parts = line.split("\t")
        if len(parts) >= 2 and re.match(r"v[a-z]", parts[1]):
            if "mkf::avx2::" not in fn and "mkf::avx512::" not in fn:
                offenders.add(fn)
    assert not offenders, f"AVX code outside the avx2/avx512 levels: {sorted(offenders)[:10]}"
