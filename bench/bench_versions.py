"""mergekit-fast at another git revision against this tree, end to end, side by side in one run.

For "as fast as before" checks of a change: the other revision is checked out into a worktree under
bench/cache/versions/<rev> and run with this tree's compiled native module (copied next to it), so
the comparison isolates the Python-level change; both run the same config on the same models, in
fresh processes, alternating (bench/common.alternate).

    python bench/bench_versions.py --rev f9ad57e                   # gradient SLERP, 2 x 0.85B
    python bench/bench_versions.py --rev f9ad57e --method linear --runs 5
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_merge  # noqa: E402
import common  # noqa: E402
import method_configs  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def checkout(rev: str) -> Path:
    """A worktree of ``rev`` with this tree's native module copied in."""
    sha = subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.strip()  # fmt: skip
    path = Path(__file__).resolve().parent / "cache" / "versions" / sha
    if not (path / "mergekit_fast").exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "worktree", "add", "--detach", str(path), sha], cwd=ROOT, check=True,
                       capture_output=True)  # fmt: skip
    for so in (ROOT / "mergekit_fast").glob("_C*.so"):
        shutil.copy2(so, path / "mergekit_fast" / so.name)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rev", required=True, help="the other revision (a commit, tag or branch)")
    p.add_argument("--size", choices=sorted(bench_merge.SIZES), default="0.85b")
    p.add_argument("--method", choices=method_configs.methods(), default="slerp")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", type=Path, default=common.RESULTS)
    args = p.parse_args(argv)
    a, b, c, n = bench_merge.models(args.size)
    old = checkout(args.rev)
    work = Path(tempfile.mkdtemp(prefix="mkf-versions-"))
    cfg = work / "config.yml"
    cfg.write_text(method_configs.config(args.method, a, b, c, n))
    cli = ["-m", "mergekit_fast.cli", "merge", str(cfg)]
    flags = ["--force", "--device", "cpu", "--no-progress", "-q"]
    tag = old.name
    tools = {
        "this tree": ([sys.executable, *cli, str(work / "new"), *flags], work / "new"),
        tag: ([sys.executable, *cli, str(work / "old"), *flags], work / "old"),
    }
    # The old revision runs from its worktree (PYTHONPATH first on sys.path, before the editable install).
    env_old = {"PYTHONPATH": str(old), "HF_HUB_OFFLINE": "1"}
    results: dict[str, list] = {t: [] for t in tools}
    try:
        for r in range(-args.warmup, args.runs):
            for tool, (cmd, _) in tools.items():
                for _, other in tools.values():
                    shutil.rmtree(other, ignore_errors=True)
                os.sync()
                env = env_old if tool == tag else {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
                sec, rss = common.run_measured(cmd, env=env)
                label = "warm-up" if r < 0 else f"run {r + 1}/{args.runs}"
                print(f"{label:9s} {tool:14s} {sec:8.2f} s  peak RSS {rss / 2**30:6.2f} GiB", flush=True)
                if r >= 0:
                    results[tool].append((sec, rss))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = {"bench": f"versions_{args.method}", "model": args.size, "rev": tag}
    rows = common.summarize_tools(results, base, f"{args.method} {args.size}", tag)
    csv_path, _ = common.write_rows(
        rows, args.out, f"versions-{args.method}-{args.size}-{tag}-{common.machine_tag()}"
    )
    print(f"wrote {csv_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
