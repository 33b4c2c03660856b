"""The native build: CUDA kernels whenever nvcc is present, importable without a GPU, reported by info."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mergekit_fast import _native, backends

ROOT = Path(__file__).resolve().parents[1]


def _nvcc_present() -> bool:
    cuda_home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    return shutil.which("nvcc") is not None or (Path(cuda_home) / "bin" / "nvcc").exists()


def test_native_module_imports_without_a_gpu():
    # A fresh interpreter with no GPU visible: importing the module (and its CUDA runtime, linked
    # statically) must not touch a device.
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    code = "import mergekit_fast._C as C; print(C.with_cuda)"
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() in ("True", "False")


@pytest.mark.skipif(not _nvcc_present(), reason="nvcc is not installed here")
def test_build_has_cuda_when_nvcc_is_present():
    info = _native.build_info()
    if info.get("cuda_skipped") == "MERGEKIT_FAST_SKIP_CUDA=1":
        pytest.skip("this build opted out of CUDA (MERGEKIT_FAST_SKIP_CUDA=1)")
    assert info.get("native") is True, info
    assert info.get("cuda") is True, f"nvcc is installed but the native build has no CUDA kernels: {info}"
    assert _native.import_error() is None
    assert _native.C.with_cuda is True
    for name in ("slerp_cuda", "slerp_segments_cuda", "slerp_cuda_workspace_bytes"):
        assert hasattr(_native.C, name), name
    # The workspace holds 2 coefficients and 3 partials per 16384 elements (at least one chunk).
    assert _native.C.slerp_cuda_workspace_bytes(1) == 8 * (2 + 3)
    assert _native.C.slerp_cuda_workspace_bytes(16384) == 8 * (2 + 3)
    assert _native.C.slerp_cuda_workspace_bytes(3 * 16384 + 1) == 8 * (2 + 3 * 4)


def test_info_mentions_every_backend():
    res = subprocess.run(
        [sys.executable, "-m", "mergekit_fast.info"], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert res.returncode == 0, res.stderr
    for name in backends.BACKENDS:
        assert f"  {name} " in res.stdout, f"{name} missing from:\n{res.stdout}"
    assert "native build" in res.stdout
