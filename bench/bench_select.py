"""Kernel benchmark of the select op (magnitude cuts): ties and breadcrumbs (bench/gpu_check.sh runs one per op).

The op has C++ CPU kernels only so far: this runs bench/bench_methods.py's methods on the CPU whatever
--device says (a --device cuda run says so and measures the CPU kernels).

    python bench/bench_select.py [--quick] [--device cpu|cuda] [--out bench/results]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_methods  # noqa: E402
import common  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=common.RESULTS)
    args = p.parse_args(argv)
    if args.device != "cpu":
        print(f"select: no {args.device} kernels yet; measuring the C++ CPU kernels")
    extra = ["--quick", "--skip-mergekit"] if args.quick else []
    return bench_methods.main([*extra, "--methods", *"ties breadcrumbs".split(), "--out", str(args.out)])


if __name__ == "__main__":
    raise SystemExit(main())
