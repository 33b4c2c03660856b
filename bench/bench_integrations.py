"""mergekit-yaml (0.1.5) with and without ``mergekit_fast.integrations.mergekit.install()``.

The same config per method family (TIES, DARE-TIES, SLERP, ... from bench/method_configs.py) on the
benchmark models of bench/bench_merge.py, run by

* ``mergekit``: ``mergekit-yaml CONFIG OUT`` (mergekit's own kernels);
* ``mergekit+install``: ``python -m mergekit_fast.integrations.mergekit CONFIG OUT`` (the same CLI, same
  flags, with every method on this package's kernels);
* ``mergekit_fast`` (unless ``--no-cli``): ``mergekit-fast merge`` for reference (this package's own
  engine: loading, planning and writing too, not only the tensor math).

Each run is a fresh process; runs alternate between the tools (common.alternate), and the report gives
the median wall time per tool and the ratio ``mergekit / mergekit+install``. mergekit and the
integration get the same flags (``--clone-tensors`` is mergekit's fastest setting here, see
bench_merge.py; ``--random-seed 0`` for the random methods).

    python bench/bench_integrations.py                        # 0.1b models, ties dare_ties slerp linear della
    python bench/bench_integrations.py --size 0.85b --methods ties slerp --runs 3
    python bench/bench_integrations.py --in-memory          # compute alone: merge_state_dicts in process
    python bench/bench_integrations.py --peft               # also peft's merge_utils against ours, in process

``--peft``: peft's ``ties`` / ``magnitude_prune`` / ``dare_ties`` against
``mergekit_fast.integrations.peft``'s on three task tensors (fp32, the shape of one full delta of a
``*_svd`` combination), calls alternating, median of each.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_merge  # noqa: E402
import common  # noqa: E402
import method_configs  # noqa: E402

DEFAULT_METHODS = ["ties", "dare_ties", "slerp", "linear", "della"]
MERGEKIT_FLAGS = ["--no-write-model-card", "--clone-tensors", "--quiet", "--random-seed", "0"]


def bench_peft(shape=(4096, 1024), reps: int = 7) -> list[dict]:
    import statistics
    import time

    import torch
    from peft.utils import merge_utils as pm

    from mergekit_fast.integrations import peft as ours

    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(shape, generator=g) for _ in range(3)]
    w = torch.tensor([0.6, 0.3, -0.4])
    cases = [("ties", (ts, w, 0.3)), ("magnitude_prune", (ts, w, 0.3)), ("dare_ties", (ts, w, 0.5))]
    rows = []
    print(f"== peft merge_utils, 3 x {shape} fp32", flush=True)
    for name, call in cases:
        times = {"peft": [], "mergekit_fast": []}
        for r in range(reps + 1):
            for tool, mod in (("peft", pm), ("mergekit_fast", ours)):
                t0 = time.perf_counter()
                getattr(mod, name)(*call)
                if r:  # the first round warms up
                    times[tool].append(time.perf_counter() - t0)
        med = {t: statistics.median(v) for t, v in times.items()}
        print(f"{name:16s} peft {med['peft'] * 1e3:8.1f} ms  mergekit_fast {med['mergekit_fast'] * 1e3:8.1f} ms  "
              f"-> {med['peft'] / med['mergekit_fast']:.2f}x")  # fmt: skip
        for tool, sec in med.items():
            rows.append({"bench": f"integration_peft_{name}", "model": "x".join(map(str, shape)), "tool": tool,
                         "runs": reps, "seconds": sec})  # fmt: skip
    return rows


# --in-memory: mergekit's merge_state_dicts on the loaded models, parameters as in method_configs
IN_MEMORY = {
    "ties": ("abc", {"weight": [1.0, 0.5], "density": [0.7, 0.5], "normalize": True}),
    "dare_ties": ("abc", {"weight": [0.6, 0.4], "density": 0.53}),
    "slerp": ("ab", {"t": 0.3}),
    "linear": ("abc", {"weight": [0.5, 0.3, 0.2]}),
    "della": ("abc", {"weight": [0.6, 0.4], "density": 0.5, "epsilon": 0.1}),
    "task_arithmetic": ("abc", {"weight": [0.7, 0.35]}),
    "dare_linear": ("abc", {"weight": [0.6, 0.4], "density": 0.5}),
}


def bench_in_memory(paths: dict, methods: list[str], runs: int) -> list[dict]:
    """Compute alone: mergekit's merge_state_dicts on state dicts in memory, with and without install(),
    alternating, on torch's threads (mergekit's default); median seconds of ``runs`` calls each."""
    import statistics
    import time

    import torch
    from mergekit.merge_methods.api import merge_state_dicts
    from safetensors.torch import load_file

    from mergekit_fast.integrations import mergekit as mkf

    sds = {k: {} for k in paths}
    for k, path in paths.items():
        for f in sorted(path.glob("*.safetensors")):
            sds[k].update(load_file(str(f)))
    rows = []
    for method in methods:
        if method not in IN_MEMORY:
            continue
        keys, params = IN_MEMORY[method]
        models = {k: sds[k] for k in keys}
        base = None if method == "linear" else "a"
        times = {"mergekit": [], "mergekit+install": []}
        torch.manual_seed(0)
        for r in range(runs + 1):
            for tool in times:
                if tool == "mergekit+install":
                    mkf.install([method])
                t0 = time.perf_counter()
                with torch.no_grad():
                    out = merge_state_dicts(models, method, parameters=params, base=base)
                dt = time.perf_counter() - t0
                mkf.uninstall()
                del out
                if r:  # the first round warms up
                    times[tool].append(dt)
        med = {t: statistics.median(v) for t, v in times.items()}
        print(f"in memory {method:16s} mergekit {med['mergekit']:7.2f} s  +install {med['mergekit+install']:7.2f} s"
              f"  -> {med['mergekit'] / med['mergekit+install']:.2f}x", flush=True)  # fmt: skip
        for tool, sec in med.items():
            rows.append({"bench": f"integration_mergekit_in_memory_{method}", "tool": tool, "runs": runs,
                         "seconds": sec})  # fmt: skip
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(bench_merge.SIZES), default="0.1b")
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=method_configs.methods())
    p.add_argument("--runs", type=int, default=3, help="timed runs per tool and method")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per tool first")
    p.add_argument("--no-cli", action="store_true", help="leave out mergekit-fast merge")
    p.add_argument("--peft", action="store_true", help="also peft's merge_utils against ours")
    p.add_argument("--peft-only", action="store_true", help="only that")
    p.add_argument("--in-memory", action="store_true",
                   help="instead: compute alone, mergekit's merge_state_dicts with and without install()")  # fmt: skip
    p.add_argument("--out", type=Path, default=common.RESULTS)
    args = p.parse_args(argv)
    if args.peft or args.peft_only:
        rows = bench_peft()
        csv_path, _ = common.write_rows(rows, args.out, f"integrations-peft-{common.machine_tag()}")
        print(f"wrote {csv_path}")
        if args.peft_only:
            return 0
    a, b, c, n = bench_merge.models(args.size)
    if args.in_memory:
        rows = bench_in_memory({"a": a, "b": b, "c": c}, args.methods, args.runs)
        name = f"integrations-mergekit-in-memory-{args.size}-{common.machine_tag()}"
        print(f"wrote {common.write_rows(rows, args.out, name)[0]}")
        return 0
    bindir = Path(sys.executable).parent
    size_bytes = sum(f.stat().st_size for f in a.glob("*.safetensors"))
    rows = []
    for method in args.methods:
        work = Path(tempfile.mkdtemp(prefix="mkf-bench-int-"))
        cfg = work / "config.yml"
        cfg.write_text(method_configs.config(method, a, b, c, n))
        tools = {
            "mergekit+install": (
                [sys.executable, "-m", "mergekit_fast.integrations.mergekit", str(cfg), str(work / "o1"),
                 *MERGEKIT_FLAGS],
                work / "o1",
            ),
            "mergekit": ([str(bindir / "mergekit-yaml"), str(cfg), str(work / "o2"), *MERGEKIT_FLAGS], work / "o2"),
        }  # fmt: skip
        if not args.no_cli:
            tools["mergekit_fast"] = (
                [str(bindir / "mergekit-fast"), "merge", str(cfg), str(work / "o3"), "--force", "--no-progress",
                 "-q", "--random-seed", "0"],
                work / "o3",
            )  # fmt: skip
        print(f"== {method} ({args.size})", flush=True)
        try:
            results = common.alternate(tools, args.runs, args.warmup, env={"HF_HUB_OFFLINE": "1"})
        finally:
            shutil.rmtree(work, ignore_errors=True)
        base = {"bench": f"integration_mergekit_{method}", "model": args.size, "model_bytes": size_bytes}
        rate = ("input_GBps", method_configs.inputs(method) * size_bytes)
        rows += common.summarize_tools(results, base, f"{method} {args.size}", "mergekit", rate)
    which = "" if args.methods == DEFAULT_METHODS else "-" + "-".join(args.methods)
    stem = f"integrations-mergekit-{args.size}{which}-{common.machine_tag()}"
    csv_path, _ = common.write_rows(rows, args.out, stem)
    print(f"\n{'method':16s} {'mergekit':>10s} {'+install':>10s} {'ratio':>7s}" + ("" if args.no_cli else
          f" {'mergekit_fast':>14s}"))  # fmt: skip
    for method in args.methods:
        by = {r["tool"]: r["seconds"] for r in rows if r["bench"] == f"integration_mergekit_{method}"}
        line = f"{method:16s} {by['mergekit']:9.2f}s {by['mergekit+install']:9.2f}s "
        line += f"{by['mergekit'] / by['mergekit+install']:6.2f}x"
        if "mergekit_fast" in by:
            line += f" {by['mergekit_fast']:13.2f}s"
        print(line)
    print(f"wrote {csv_path}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raise SystemExit(main())
