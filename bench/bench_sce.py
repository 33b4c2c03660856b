"""Kernel benchmark of sce's native passes (mergekit_fast/ops/sce.py; bench/gpu_check.sh runs one per op).

The passes have C++ CPU kernels only so far: this runs bench/bench_methods.py's sce case on the CPU
whatever --device says (a --device cuda run says so and measures the CPU kernels).

    python bench/bench_sce.py [--quick] [--device cpu|cuda] [--out bench/results]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_methods  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(bench_methods.op_main("sce", ["sce"], __doc__))
