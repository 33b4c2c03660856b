"""bench/gpu_check.sh in its CPU form (CI has no GPU): it must run end to end and pass."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_cpu_form(tmp_path):
    env = {**os.environ, "GPU_CHECK_SIZE": "tiny", "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "ALL PASS" in out
    if "no GPU visible" in out:
        assert "e2e_cpu: pass" in out and "SLERP cpp" in out and "routing T=4096" in out
    assert list(tmp_path.glob("slerp-*.csv")) and list(tmp_path.glob("merge-slerp-tiny-*.csv"))
