"""Run every benchmark and collect the results with their provenance.

    python bench/run_all.py --quick      # at most ~3 minutes on a 2-core CPU
    python bench/run_all.py              # full grids, 0.85B models end to end
    mergekit-fast bench [--quick]        # the same

Writes bench/results/<machine>-<date>.json and .csv (every row, plus the machine: CPU/GPU name,
torch, triton and CUDA versions, commit) and each benchmark's PNG plot beside them.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402

# (name, module, extra args in quick mode, extra args in full mode)
BENCHES = [
    ("slerp", "bench_slerp", ["--quick"], []),
    ("routing", "bench_routing", ["--quick"], []),
    ("merge", "bench_merge", ["--quick"], []),
    ("moe", "bench_moe", ["--quick"], []),
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=common.RESULTS)
    p.add_argument(
        "--only",
        nargs="*",
        default=None,
        help="run only these benchmarks: " + ", ".join(b[0] for b in BENCHES),
    )
    args = p.parse_args(argv)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M")
    run_dir = args.out / f"{common.machine_tag()}-{stamp}"
    run_dir.mkdir(parents=True, exist_ok=True)
    summary = {"machine": common.machine_info(), "mode": "quick" if args.quick else "full", "benchmarks": {}}
    failed = []
    for name, module, quick_args, full_args in BENCHES:
        if args.only and name not in args.only:
            continue
        if not (HERE / f"{module}.py").exists():
            print(f"== {name}: {module}.py not present, skipped")
            continue
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        try:
            mod = __import__(module)
            rc = mod.main([*(quick_args if args.quick else full_args), "--out", str(run_dir)])
            status = "ok" if not rc else f"exit {rc}"
        except Exception as exc:  # noqa: BLE001 - one failing benchmark must not hide the others
            traceback.print_exc()
            status = f"failed: {type(exc).__name__}: {exc}"
        if status != "ok":
            failed.append(name)
        summary["benchmarks"][name] = {"status": status, "seconds": round(time.perf_counter() - t0, 1)}
    rows = []
    for f in sorted(run_dir.glob("*.csv")):
        with open(f) as fh:
            for row in csv.DictReader(fh):
                rows.append({"file": f.name, **row})
    summary["rows"] = rows
    base = args.out / f"{common.machine_tag()}-{stamp}"
    Path(f"{base}.json").write_text(json.dumps(summary, indent=2))
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(f"{base}.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    print(f"\nwrote {base}.json, {base}.csv and the per-benchmark files and plots in {run_dir}/")
    for name, info in summary["benchmarks"].items():
        print(f"  {name:8s} {info['status']} ({info['seconds']} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
