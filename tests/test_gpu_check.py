"""bench/gpu_check.sh in its CPU form (CI has no GPU): it must run end to end and pass, benchmark
every op, and, without matplotlib (as on the lent GPU machine), write CSVs that bench/plot.py
turns into the plots afterwards."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import needs_native

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@needs_native
def test_gpu_check_cpu_form(tmp_path):
    # matplotlib hidden: an importable package named matplotlib that raises ImportError.
    hide = tmp_path / "no_matplotlib" / "matplotlib"
    hide.mkdir(parents=True)
    (hide / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    out_dir = tmp_path / "results"
    pythonpath = os.pathsep.join(p for p in (str(hide.parent), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "GPU_CHECK_SIZE": "tiny", "PYTHON": sys.executable, "PYTHONPATH": pythonpath}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), str(out_dir)], env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "ALL PASS" in out
    if "no GPU visible" in out:
        assert "e2e_cpu: pass" in out and "SLERP cpp" in out and "routing T=4096" in out
    ops = sorted(p.stem for p in (ROOT / "mergekit_fast" / "ops").glob("*.py") if not p.stem.startswith("_"))
    for op in ops:
        assert f"bench_{op}: pass" in out, f"the GPU check did not benchmark the {op} op"
    assert list(out_dir.glob("slerp-*.csv")) and list(out_dir.glob("merge-slerp-tiny-*.csv"))
    # No plot written, none claimed, and the way to make them said.
    assert not list(out_dir.glob("*.png"))
    assert ".png" not in out.replace("*.png", "")
    assert "PNG written: none" in out and "bench/plot.py" in out
    pytest.importorskip("matplotlib")
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "plot.py"), *map(str, out_dir.glob("*.csv"))],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    for stem in ("slerp-", "routing_", "merge-slerp-tiny-"):
        assert list(out_dir.glob(f"{stem}*.png")), f"bench/plot.py made no {stem}* plot:\n{res.stdout}"
