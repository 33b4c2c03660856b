"""The same merge with the local executor, on Ray with 1 worker and on Ray with 2 workers, alternating.

One process: the models are built once (synthetic, bench/cache/), a local Ray cluster is started once
(every CPU of this machine; loopback only; its start-up is timed and reported apart), then each run
plans the config and writes it with ``run_merge`` through the executor under test, alternating
local / ray-1 / ray-2, a sync() before every run; medians. The output is split into shards of
``--shard-size`` so that two workers have shards to share, and every output is checked byte for byte
against the first local one.

On a small machine this measures the executor's overhead more than its gain: two workers share the
same cores, memory bandwidth and disk, so they can at best hide one worker's waits behind the other's
work. A cluster of nodes with their own disks and GPUs is where the split pays.

    python bench/bench_executors.py                    # 2 x 0.1B SLERP, 5 runs per executor
    python bench/bench_executors.py --runs 3 --size tiny --shard-size 2M
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray on the loopback address only
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_merge  # noqa: E402
import common  # noqa: E402
import method_configs  # noqa: E402


def files_of(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(bench_merge.SIZES), default="0.1b")
    p.add_argument("--method", choices=method_configs.methods(), default="slerp")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--shard-size", default="25M", help="--out-shard-size of the merge (default 25M)")
    p.add_argument("--out", type=Path, default=common.RESULTS)
    args = p.parse_args(argv)

    import ray

    from mergekit_fast.cli import parse_size
    from mergekit_fast.config import parse_config
    from mergekit_fast.engine import MergeOptions, run_merge
    from mergekit_fast.executors import LocalExecutor
    from mergekit_fast.executors.ray import RayExecutor
    from mergekit_fast.plan import build_plan

    a, b, c, n = bench_merge.models(args.size, synthetic=True)
    text = method_configs.config(args.method, a, b, c, n)
    opt = MergeOptions(device="cpu", out_shard_size=parse_size(args.shard_size), progress=False, force=True)
    work = Path(tempfile.mkdtemp(prefix="mkf-bench-exec-"))
    temp = tempfile.mkdtemp(prefix="mkf-ray-", dir="/tmp")
    t = time.perf_counter()
    ray.init(address="local", include_dashboard=False, _temp_dir=temp, logging_level="warning")
    ray_start = time.perf_counter() - t
    cpus = int(ray.cluster_resources().get("CPU", 0))
    print(f"Ray cluster started in {ray_start:.2f} s ({cpus} CPUs)", flush=True)
    executors = {"local": LocalExecutor(), "ray-1": RayExecutor(workers=1), "ray-2": RayExecutor(workers=2)}
    times: dict[str, list[float]] = {k: [] for k in executors}
    reference = None
    shards = bytes_moved = 0
    try:
        for r in range(-args.warmup, args.runs):
            for name, ex in executors.items():
                out = work / "out"
                shutil.rmtree(out, ignore_errors=True)
                os.sync()
                t = time.perf_counter()
                plan = build_plan(parse_config(text))
                result = run_merge(plan, out, opt, executor=ex)
                sec = time.perf_counter() - t
                files = files_of(out)
                if reference is None:
                    reference = files
                elif files != reference:
                    raise SystemExit(f"{name}: the output differs from the local executor's")
                shards, bytes_moved = result.shards, result.bytes_read + result.bytes_written
                label = "warm-up" if r < 0 else f"run {r + 1}/{args.runs}"
                print(f"{label:9s} {name:6s} {sec:7.2f} s  ({result.shards} shards)", flush=True)
                if r >= 0:
                    times[name].append(sec)
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    size_bytes = sum(f.stat().st_size for f in a.glob("*.safetensors"))
    local = statistics.median(times["local"])
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append({"bench": f"executors_{args.method}", "model": args.size, "model_bytes": size_bytes,
                     "shards": shards, "executor": name, "runs": len(ts), "median_s": round(med, 3),
                     "min_s": round(min(ts), 3), "max_s": round(max(ts), 3), "GBps": round(bytes_moved / med / 1e9, 3),
                     "vs_local": round(med / local, 3), "ray_start_s": round(ray_start, 2), "cpus": cpus})  # fmt: skip
    print(f"\n{args.method} of 2 x {args.size} ({size_bytes / 1e6:.0f} MB each), {shards} output shards, "
          f"{bytes_moved / 1e9:.2f} GB read + written per run; median of {args.runs}:")  # fmt: skip
    for row in rows:
        print(f"  {row['executor']:6s} {row['median_s']:7.2f} s  ({row['min_s']:.2f} to {row['max_s']:.2f})  "
              f"{row['GBps']:5.2f} GB/s  {row['vs_local']:.2f}x the local time")  # fmt: skip
    print(f"  (Ray's cluster start-up, once: {ray_start:.2f} s, not in the times above)")
    csv_path, _ = common.write_rows(
        rows, args.out, f"executors-{args.method}-{args.size}-{common.machine_tag()}"
    )
    print(f"wrote {csv_path}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raise SystemExit(main())
