"""Run a command and record what the disk and the page cache did meanwhile, every 0.25 s.

    python bench/io_trace.py [--disk PATH] [--csv TIMELINE.csv] -- COMMAND ...

Prints, per second of the run, the disk's read and write rates (MB/s), its busy fraction (io_ticks, as
iostat's %util), the page cache's dirty and writeback bytes and the CPU's user/system/iowait shares; then
the totals. What it shows: whether the disk was kept busy (and where it idled: start-up, planning, the
end), and whether dirty pages piled up. Reads only /proc; needs neither torch nor mergekit_fast.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import threading
import time
from pathlib import Path

PERIOD = 0.25


def block_device(path: Path) -> str | None:
    """The name in /proc/diskstats of the whole disk holding ``path`` (vda for /dev/vda1), or None."""
    dev = os.stat(path).st_dev
    sys_dir = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    try:
        real = sys_dir.resolve()
    except OSError:
        return None
    if (real / "partition").exists():
        real = real.parent
    return real.name if real.exists() else None


def _disk(dev: str) -> tuple[int, int, int]:
    for line in Path("/proc/diskstats").read_text().splitlines():
        f = line.split()
        if len(f) > 12 and f[2] == dev:
            return int(f[5]) * 512, int(f[9]) * 512, int(f[12])
    return 0, 0, 0


def _mem() -> dict[str, int]:
    out = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        k, v = line.split(":", 1)
        if k in ("Dirty", "Writeback", "Cached", "MemFree"):
            out[k] = int(v.split()[0]) * 1024
    return out


def _cpu() -> list[int]:
    f = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    return [int(x) for x in f]  # user nice system idle iowait irq softirq steal ...


def sample(dev: str, stop: threading.Event, rows: list[dict]) -> None:
    t0 = time.perf_counter()
    last = (_disk(dev), _cpu(), t0)
    while not stop.wait(PERIOD):
        now = time.perf_counter()
        d, c = _disk(dev), _cpu()
        (d0, c0, tp) = last
        dt = now - tp
        dc = [b - a for a, b in zip(c0, c)]
        tot = max(1, sum(dc))
        rows.append({
            "t": round(now - t0, 3), "read_MBps": (d[0] - d0[0]) / dt / 1e6, "write_MBps": (d[1] - d0[1]) / dt / 1e6,
            "busy": (d[2] - d0[2]) / 1e3 / dt, **{k.lower(): v for k, v in _mem().items()},
            "user": (dc[0] + dc[1]) / tot, "system": (dc[2] + dc[5] + dc[6]) / tot, "iowait": dc[4] / tot,
            "steal": dc[7] / tot if len(dc) > 7 else 0.0,
        })  # fmt: skip
        last = (d, c, now)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--disk", type=Path, default=Path.cwd(), help="a path on the disk to watch (default: .)")
    p.add_argument("--csv", type=Path, default=None, help="write the timeline here")
    p.add_argument("--quiet", action="store_true", help="totals only")
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    dev = block_device(args.disk)
    if not cmd or dev is None:
        p.error("a command is needed, and --disk must be on a block device")
    rows: list[dict] = []
    stop = threading.Event()
    th = threading.Thread(target=sample, args=(dev, stop, rows), daemon=True)
    d0 = _disk(dev)
    t0 = time.perf_counter()
    th.start()
    rc = subprocess.run(cmd).returncode
    wall = time.perf_counter() - t0
    stop.set()
    th.join()
    d1 = _disk(dev)
    if not args.quiet:
        print(f"{'t':>6} {'read':>6} {'write':>6} {'busy':>5} {'dirty':>6} {'wback':>6} {'usr':>4} {'sys':>4} {'iow':>4}"
              "   (MB/s, GB, CPU shares)")  # fmt: skip
        step = max(1, round(1 / PERIOD))
        for i in range(0, len(rows), step):
            grp = rows[i : i + step]
            avg = {k: sum(r[k] for r in grp) / len(grp) for k in grp[0]}
            print(f"{grp[-1]['t']:6.1f} {avg['read_MBps']:6.0f} {avg['write_MBps']:6.0f} {avg['busy']:5.2f} "
                  f"{grp[-1]['dirty'] / 1e9:6.2f} {grp[-1]['writeback'] / 1e9:6.2f} {avg['user']:4.2f} "
                  f"{avg['system']:4.2f} {avg['iowait']:4.2f}")  # fmt: skip
    busy = (d1[2] - d0[2]) / 1e3
    print(f"wall {wall:.2f} s (exit {rc}): read {(d1[0] - d0[0]) / 1e9:.2f} GB, wrote {(d1[1] - d0[1]) / 1e9:.2f} GB, "
          f"disk busy {busy:.1f} s ({busy / wall:.0%})")  # fmt: skip
    if args.csv and rows:
        with open(args.csv, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
