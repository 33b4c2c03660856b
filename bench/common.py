"""Shared benchmark plumbing: timing, provenance, CSV/JSON output and plots.

Timing: on a GPU, triton.testing.do_bench (median, L2 flushed between runs); on the CPU, warm-up
then the median of repeated runs within a time budget. Providers of one benchmark are measured
side by side in one run, and ratios between them are what the reports quote.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch
from io_trace import block_device  # noqa: F401 - used here, and by the benchmarks

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    import mergekit_fast
    from mergekit_fast import backends

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "host": socket.gethostname(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": backends.triton_version(),
        "mergekit_fast": mergekit_fast.__version__,
        "commit": _git_commit(),
    }


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or None  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None


def machine_tag() -> str:
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
    else:
        name = f"cpu{os.cpu_count()}"
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").lower()


def bench_time(
    fn: Callable[[], object], *, device: str = "cpu", budget_s: float = 0.5, min_reps: int = 3
) -> float:
    """Median seconds per call of ``fn``."""
    if device.startswith("cuda"):
        import triton.testing

        return (
            triton.testing.do_bench(fn, warmup=25, rep=max(50, int(budget_s * 1000)), return_mode="median")
            / 1e3
        )
    fn()  # warm-up
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < budget_s and len(times) < 100):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device: str = "cpu", nbytes: int = 256 << 20) -> float:
    """Measured copy bandwidth in bytes/s (read + write), the ceiling for memory-bound kernels."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    sec = bench_time(lambda: dst.copy_(src), device=device, budget_s=0.5)
    return 2 * nbytes / sec


def write_rows(rows: list[dict], out_dir: Path, stem: str, meta: dict | None = None) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / f"{stem}.csv"
    json_path = out_dir / f"{stem}.json"
    keys: list[str] = []
    for r in rows:
        for k in r:
            if k not in keys:
                keys.append(k)
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    json_path.write_text(json.dumps({"machine": meta or machine_info(), "rows": rows}, indent=2))
    return csv_path, json_path


def plot_throughput(rows: list[dict], path: Path, *, x: str, y: str = "GBps", series: str = "backend",
                    title: str = "", ceiling: float | None = None, logx: bool = True) -> Path | None:  # fmt: skip
    """Throughput against size (bench/plot.py draws it); None, and no file, without matplotlib."""
    from plot import throughput_chart

    return throughput_chart(rows, path, x=x, y=y, series=series, title=title, ceiling=ceiling, logx=logx)


_RSS_WRAPPER = (
    "import resource, subprocess, sys, time; t = time.perf_counter(); "
    "rc = subprocess.run(sys.argv[1:]).returncode; dt = time.perf_counter() - t; "
    "print(f'@@ {rc} {dt} {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}', file=sys.stderr)"
)


def run_measured(cmd: list[str], env: dict | None = None) -> tuple[float, int]:
    """Run ``cmd`` in a fresh process; (wall seconds, peak RSS bytes of that process tree's largest)."""
    import sys

    proc = subprocess.run([sys.executable, "-c", _RSS_WRAPPER, *cmd], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})  # fmt: skip
    for line in proc.stderr.splitlines():
        if line.startswith("@@ "):
            rc, dt, rss = line.split()[1:]
            if int(rc) != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed ({rc}):\n{proc.stderr[-3000:]}")
            return float(dt), int(rss)
    raise RuntimeError(f"{' '.join(cmd)}: no measurement:\n{proc.stderr[-3000:]}")


def alternate(tools: dict[str, tuple[list[str], Path]], runs: int, warmup: int = 1, env: dict | None = None,
              after=None, before=None, timed_sync: bool = False,
              disk: Path | None = None) -> dict[str, list[tuple]]:  # fmt: skip
    """Run each tool's command ``runs`` times, alternating between the tools, each in a fresh process;
    {tool: [(seconds, peak RSS bytes, extras)]}. ``tools`` maps a name to (command, its output
    directory or file), which is removed before every run (untimed). ``warmup`` untimed runs per tool come first (the
    first run after a pause is often slow for either tool: page cache, CPU clocks). Every run starts
    after a sync(), so no tool is throttled for the dirty pages the previous run left behind (1.8 GB of
    output each; the kernel slows writers down once dirty pages pass its thresholds). The page
    cache stays warm unless ``before()`` (called after that sync, just before each run) evicts
    something. ``timed_sync``: the sync() right after each run is timed too (the output's bytes still
    in the page cache when the tool exits), extras["sync_s"]. ``disk``: the block device holding this
    path is sampled during each run (extras: its busy fraction and read/write bytes, DiskMonitor).
    ``after(tool, out)`` is called after each timed run."""
    results: dict[str, list[tuple]] = {t: [] for t in tools}
    for r in range(-warmup, runs):
        for tool, (cmd, out) in tools.items():
            for _, other in tools.values():
                if other.is_file():
                    other.unlink()  # a tool whose output is one file (io_floor.py --keep)
                shutil.rmtree(other, ignore_errors=True)
            os.sync()
            if before is not None:
                before()
            mon = DiskMonitor(disk) if disk is not None else None
            if mon is not None:
                mon.start()
            sec, rss = run_measured(cmd, env=env)
            extras: dict = mon.stop() if mon is not None else {}
            if timed_sync:
                t0 = time.perf_counter()
                os.sync()
                extras["sync_s"] = time.perf_counter() - t0
            label = "warm-up" if r < 0 else f"run {r + 1}/{runs}"
            more = "".join(
                f"  {k} {v:.2f}" if isinstance(v, float) else ""
                for k, v in extras.items()
                if not k.endswith("_bytes")
            )
            print(f"{label:9s} {tool:14s} {sec:8.2f} s  peak RSS {rss / 2**30:6.2f} GiB{more}", flush=True)
            if r >= 0:
                results[tool].append((sec, rss, extras))
                if after is not None:
                    after(tool, out)
    return results


def evict(paths) -> int:
    """Drop these files' clean pages from the page cache (posix_fadvise DONTNEED), so the next run reads
    them from the disk: a cold start for these files without touching anyone else's cache (dirty pages
    stay: sync first). Returns the bytes of the files evicted."""
    total = 0
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            total += os.fstat(fd).st_size
        finally:
            os.close(fd)
    return total


def drop_caches() -> bool:
    """sync, then drop the whole page cache (root only; every process on the machine loses its cache):
    False where refused."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


class DiskMonitor:
    """Samples /proc/diskstats for one disk while a run goes: bytes read and written, and the fraction
    of the run's wall time the disk had at least one request in flight (its io_ticks, as iostat's %util;
    on a virtual disk "busy" means requests queued, not that the device was saturated)."""

    def __init__(self, path: Path):
        self.dev = block_device(path)

    def _read(self) -> tuple[int, int, int] | None:
        if self.dev is None:
            return None
        for line in Path("/proc/diskstats").read_text().splitlines():
            f = line.split()
            if len(f) > 12 and f[2] == self.dev:
                return int(f[5]) * 512, int(f[9]) * 512, int(f[12])  # sectors read, written; io_ticks ms
        return None

    def start(self) -> None:
        self.t0 = time.perf_counter()
        self.s0 = self._read()

    def stop(self) -> dict:
        s1 = self._read()
        dt = time.perf_counter() - self.t0
        if self.s0 is None or s1 is None:
            return {}
        return {"disk_busy": (s1[2] - self.s0[2]) / 1e3 / dt, "disk_read_bytes": s1[0] - self.s0[0],
                "disk_write_bytes": s1[1] - self.s0[1]}  # fmt: skip


def cached_model(name: str, **kw) -> Path:
    """A random model built once with mergekit_fast.testing.make_model under bench/cache/."""
    from mergekit_fast.testing import make_model

    path = Path(__file__).resolve().parent / "cache" / name
    if not (path / "config.json").exists():
        print(f"building benchmark model {name} (once; cached in {path})")
        tmp = path.with_name(path.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        make_model(tmp, **kw)
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
    return path


def summarize_tools(results: dict[str, list[tuple[float, int]]], base: dict, label: str, baseline: str,
                    rate: tuple[str, int] | None = None) -> list[dict]:  # fmt: skip
    """Rows (median seconds, max peak RSS) per tool; the first tool gets its ratios to ``baseline``.

    ``rate`` = (column name, bytes) adds a GB/s column.
    """
    import statistics

    rows = []
    for tool, vals in results.items():
        sec = statistics.median(v[0] for v in vals)
        row = {**base, "tool": tool, "runs": len(vals), "seconds": sec, "peak_rss": max(v[1] for v in vals)}
        if rate:
            row[rate[0]] = rate[1] / sec / 1e9
        rows.append(row)
    if baseline in results and len(rows) > 1:
        fast, ref = rows[0], rows[[r["tool"] for r in rows].index(baseline)]
        fast["speedup_vs_mergekit"] = ref["seconds"] / fast["seconds"]
        fast["rss_ratio_vs_mergekit"] = fast["peak_rss"] / ref["peak_rss"]
        print(f"{label}: {fast['tool']} {fast['seconds']:.2f} s vs {baseline} {ref['seconds']:.2f} s "
              f"-> {fast['speedup_vs_mergekit']:.1f}x faster; peak RSS {fast['peak_rss'] / 2**30:.2f} vs "
              f"{ref['peak_rss'] / 2**30:.2f} GiB ({fast['rss_ratio_vs_mergekit']:.2f}x)")  # fmt: skip
    return rows
