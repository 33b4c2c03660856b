"""The benchmarks' plots, from their CSV files: needs matplotlib, not torch nor mergekit_fast.

    python bench/plot.py RESULTS_DIR/*.csv [--out DIR]

The benchmarks draw these plots themselves where matplotlib is installed (through the functions
below). Where it is not (the lent GPU machine: bench/gpu_check.sh then writes the CSVs only),
copy the CSVs to a machine that has it and run this script: it writes each plot beside its CSV
(or into --out), under the name the benchmark would have used, and prints what it wrote.

What each CSV becomes, by its columns:
  backend, numel, GBps     (bench_slerp and other throughput benchmarks): GB/s against size, one
                           line per backend, the copy bandwidth as the ceiling; one plot per
                           (bench, dtype), the first under the CSV's own name
  provider, T, E, k, us    (bench_routing): latency against tokens, one panel per (E, k)
  tool, seconds            (bench_merge, bench_moe): wall time and peak RSS per tool
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def have_matplotlib() -> bool:
    return _pyplot() is not None


def throughput_chart(rows: list[dict], path: Path, *, x: str, y: str = "GBps", series: str = "backend",
                     title: str = "", ceiling: float | None = None, logx: bool = True) -> Path | None:  # fmt: skip
    """Throughput against size, one line per series, the device's copy bandwidth as the ceiling.
    None (and nothing written) without matplotlib."""
    plt = _pyplot()
    if plt is None or not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in sorted({r[series] for r in rows}):
        pts = sorted((float(r[x]), float(r[y])) for r in rows if r[series] == name)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    if ceiling:
        ax.axhline(ceiling, color="gray", linestyle="--", label=f"copy bandwidth {ceiling:.1f} GB/s")
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def routing_chart(rows: list[dict], path: Path, title: str) -> Path | None:
    """Latency against tokens T, one panel per (E, k), one line per provider."""
    plt = _pyplot()
    if plt is None or not rows:
        return None
    Es = sorted({int(r["E"]) for r in rows})
    ks = sorted({int(r["k"]) for r in rows})
    fig, axes = plt.subplots(len(ks), len(Es), figsize=(4.2 * len(Es), 3.4 * len(ks)), squeeze=False)
    for i, k in enumerate(ks):
        for j, E in enumerate(Es):
            ax = axes[i][j]
            sub = [r for r in rows if int(r["E"]) == E and int(r["k"]) == k]
            for name in sorted({r["provider"] for r in sub}):
                pts = sorted((float(r["T"]), float(r["us"])) for r in sub if r["provider"] == name)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"E={E}, k={k}")
            ax.set_xlabel("tokens T")
            ax.set_ylabel("median time (us)")
            ax.grid(True, alpha=0.3)
            if sub:
                ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def tools_chart(rows: list[dict], path: Path, title: str) -> Path | None:
    """Median wall time and peak RSS per tool (end-to-end benchmarks)."""
    plt = _pyplot()
    if plt is None or not rows:
        return None
    tools = [r["tool"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8, 3.6))
    ax1.bar(tools, [float(r["seconds"]) for r in rows], color="tab:blue")
    ax1.set_ylabel("median wall time (s)")
    if all(r.get("peak_rss") for r in rows):
        ax2.bar(tools, [float(r["peak_rss"]) / 2**30 for r in rows], color="tab:orange")
    ax2.set_ylabel("peak RSS (GiB)")
    for ax in (ax1, ax2):
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def plot_csv(path: Path, out_dir: Path | None = None) -> list[Path]:
    """The plots of one benchmark CSV (see the module docstring); [] for a CSV of another kind."""
    rows = read_rows(path)
    out_dir = out_dir or path.parent
    stem = path.stem
    cols = set(rows[0]) if rows else set()
    written: list[Path | None] = []
    if {"backend", "numel", "GBps"} <= cols:
        groups: dict[tuple, list[dict]] = {}
        for r in rows:
            groups.setdefault((r.get("bench", ""), r.get("dtype", "")), []).append(r)
        for n, ((bench, dtype), sub) in enumerate(groups.items()):
            ceiling = float(sub[0]["copy_GBps"]) if sub[0].get("copy_GBps") else None
            device = sub[0].get("device", "")
            name = stem if n == 0 else f"{stem}-{bench}-{dtype}".rstrip("-")
            written.append(throughput_chart(sub, out_dir / f"{name}.png", x="numel", ceiling=ceiling,
                                            title=f"{bench} {dtype} on {device} ({stem})"))  # fmt: skip
    elif {"provider", "T", "E", "k", "us"} <= cols:
        written.append(routing_chart(rows, out_dir / f"{stem}.png", f"top-k routing ({stem})"))
    elif {"tool", "seconds"} <= cols:
        written.append(tools_chart(rows, out_dir / f"{stem}.png", stem))
    return [p for p in written if p is not None]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csv", nargs="+", type=Path, help="benchmark CSV files")
    p.add_argument(
        "--out", type=Path, default=None, help="directory for the plots (default: beside each CSV)"
    )
    args = p.parse_args(argv)
    if not have_matplotlib():
        print("bench/plot.py needs matplotlib (pip install matplotlib)", file=sys.stderr)
        return 2
    total = 0
    for path in args.csv:
        written = plot_csv(path, args.out)
        for w in written:
            print(f"wrote {w}")
        if not written:
            print(f"{path}: no plot for this kind of CSV")
        total += len(written)
    return 0 if total else 1


if __name__ == "__main__":
    raise SystemExit(main())
