"""Kernel benchmark of the combine op: linear, task_arithmetic and dare_ties (bench/gpu_check.sh runs one per op).

On the CPU: bench/bench_methods.py's C++ kernels. With --device cuda: the Triton kernels
(task_arithmetic, dare_ties; GB/s against the GPU's copy bandwidth, and the bytes against the C++
kernel's).

    python bench/bench_combine.py [--quick] [--device cpu|cuda] [--out bench/results]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_methods  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(
        bench_methods.op_main("combine", "linear task_arithmetic dare_linear dare_ties".split(), __doc__)
    )
