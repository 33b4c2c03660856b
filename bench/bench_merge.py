"""End to end: mergekit-yaml (0.1.5) against mergekit-fast on the same config and models.

Each run is a fresh process (so peak RSS is that tool's own), runs alternate between the tools,
and the report gives the median wall time, peak RSS and their ratios. Models are random
Mistral-shaped checkpoints built once and cached under bench/cache/ (generated, never downloaded).

    python bench/bench_merge.py                 # two ~0.85B bf16 models (hidden 2048, 16 layers)
    python bench/bench_merge.py --quick         # two ~0.1B models
    python bench/bench_merge.py --method dus    # depth up-scaling instead of the gradient SLERP
    python bench/bench_merge.py --method ties   # any method with a config in bench/method_configs.py
    python bench/bench_merge.py --size 8x0.3b   # MoE inputs: Mixtral-shaped, 8 experts, fused layout
    python bench/bench_merge.py --size 7b-16l   # Mistral-7B's tensor shapes, 16 of its 32 layers, cold
    python bench/bench_merge.py --size 7b       # Mistral-7B-shaped (7.24B parameters, 14.5 GB), cold

The 7B sizes (``DISK_SIZES``) measure what the disk allows. Their models are written once, shard by
shard as save_pretrained cuts them (5 GB), with torch alone (testing.make_synthetic_model: one tensor
in memory at a time, no transformers model), after a check that the disk has room for the models still
missing plus one output (7b: about 45 GB in all, 7b-16l: 22 GB). Every run starts cold: the inputs are
evicted from the page cache first (posix_fadvise DONTNEED, touching nobody else's cache; ``--cold
drop`` drops the whole cache as root instead), after a sync. The floor runs beside the tools, in the
same alternation: bench/io_floor.py reads every input once, the models in parallel, then writes the
output's size and fsyncs it. Each tool's time is its wall time plus the sync() right after it (the
output's bytes still in the page cache when it exits), so that every time counts the output on disk
as the floor's does; the rows give both, the disk's busy fraction and the machine's load.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import method_configs  # noqa: E402

SIZES = {
    # name: (hidden, layers, intermediate, vocab, heads, kv heads)
    "1b": (2048, 22, 5632, 32000, 32, 4),
    "0.85b": (2048, 16, 5632, 32000, 16, 8),
    "0.1b": (768, 8, 2048, 16000, 12, 4),
    "tiny": (128, 4, 352, 512, 4, 2),
    # Mistral-7B (v0.1) shapes: the whole model (14.5 GB per model in bf16), and its first 16 layers (7.5 GB)
    "7b": (4096, 32, 14336, 32000, 32, 8),
    "7b-16l": (4096, 16, 14336, 32000, 32, 8),
}
# Sizes where the disk is the limit: sharded models written with torch alone, measured cold with the floor.
DISK_SIZES = {"7b", "7b-16l"}
SHARD_BYTES = 5_000_000_000
# Mixtral-shaped models with 8 experts per layer (fused expert tensors), for MoE inputs (--moe):
# 8x0.3b is 1.3 GB per model (0.55 B parameters in the experts), 8x0.1b 0.65 GB
MOE_SIZES = {
    "8x0.3b": (1024, 8, 2816, 32000, 16, 8),
    "8x0.1b": (768, 8, 2048, 16000, 12, 4),
}


def moe_models(size: str) -> tuple[Path, Path, Path, int]:
    """Three Mixtral checkpoints (8 experts, fused layout) written with torch alone, cached."""
    from mergekit_fast.testing import make_synthetic_moe

    h, n, i, v, heads, kv = MOE_SIZES[size]
    root = common.RESULTS.parent / "cache"
    paths = []
    for tag, seed in (("a", 1), ("b", 2), ("c", 3)):
        path = root / f"mixtral-{size}-{tag}"
        if not (path / "config.json").exists():
            print(f"building benchmark model {path.name} (once; cached)")
            make_synthetic_moe(path, seed=seed, num_layers=n, hidden_size=h, intermediate_size=i, num_experts=8,
                               vocab_size=v, num_heads=heads, num_kv_heads=kv)  # fmt: skip
        paths.append(path)
    return paths[0], paths[1], paths[2], n


def model_bytes(size: str) -> int:
    """The bytes of one bf16 model of this (dense Mistral) size."""
    h, n, i, v, heads, kv = SIZES[size]
    head_dim = h // heads
    layer = 2 * h * h + 2 * h * kv * head_dim + 3 * h * i + 2 * h  # q, o; k, v; gate, up, down; 2 norms
    return 2 * (n * layer + 2 * v * h + h)


def disk_models(size: str, count: int) -> tuple[Path, Path, Path, int]:
    """The first ``count`` of three sharded Mistral-shaped models of a DISK_SIZES size, written once (after
    checking the disk has room for the ones missing plus one output); unused ones are not written."""
    from mergekit_fast.testing import make_synthetic_model

    h, n, i, v, heads, kv = SIZES[size]
    root = common.RESULTS.parent / "cache"
    root.mkdir(parents=True, exist_ok=True)
    paths = [root / f"synthetic-{size}-{tag}" for tag in "abc"]
    missing = [p for p in paths[:count] if not (p / "config.json").exists()]
    need = (len(missing) + 1) * model_bytes(size) + (1 << 30)
    free = shutil.disk_usage(root).free
    if free < need:
        raise SystemExit(
            f"--size {size}: {len(missing)} model(s) to write and one output need {need / 1e9:.1f} GB on "
            f"{root}'s disk, {free / 1e9:.1f} GB are free (try --size 7b-16l, or free some space)"
        )
    for path, seed in zip(paths[:count], (1, 2, 3)):
        if path in missing:
            print(
                f"writing benchmark model {path.name} ({model_bytes(size) / 1e9:.1f} GB, once; cached)",
                flush=True,
            )
            shutil.rmtree(path, ignore_errors=True)  # a partial one from an interrupted run
            make_synthetic_model(path, seed=seed, num_layers=n, hidden_size=h, intermediate_size=i, vocab_size=v,
                                 num_heads=heads, num_kv_heads=kv, max_shard_size=SHARD_BYTES)  # fmt: skip
    return paths[0], paths[1], paths[2], n


def models(size: str, synthetic: bool = False, count: int = 3) -> tuple[Path, Path, Path, int]:
    if size in MOE_SIZES:
        return moe_models(size)
    if size in DISK_SIZES:
        return disk_models(size, count)
    h, n, i, v, heads, kv = SIZES[size]
    kw = dict(
        num_layers=n, hidden_size=h, intermediate_size=i, vocab_size=v, num_heads=heads, num_kv_heads=kv
    )
    if synthetic:  # written directly with torch, no transformers needed
        from mergekit_fast.testing import make_synthetic_model

        root = common.RESULTS.parent / "cache"
        paths = []
        for tag, seed in (("a", 1), ("b", 2), ("c", 3)):
            path = root / f"synthetic-{size}-{tag}"
            if not (path / "config.json").exists():
                make_synthetic_model(path, seed=seed, **kw)
            paths.append(path)
        return paths[0], paths[1], paths[2], n
    kw["arch"] = "mistral"
    return (
        common.cached_model(f"mistral-{size}-a", seed=1, **kw),
        common.cached_model(f"mistral-{size}-b", seed=2, **kw),
        common.cached_model(f"mistral-{size}-c", seed=3, **kw),
        n,
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small models, one run each")
    p.add_argument("--size", choices=sorted(SIZES) + sorted(MOE_SIZES), default=None,
                   help="model size; the 8x... sizes are Mixtral-shaped MoE inputs (8 experts per layer); "
                        "7b and 7b-16l run cold, with the floor")  # fmt: skip
    p.add_argument("--method", choices=method_configs.methods(), default="slerp")
    p.add_argument("--runs", type=int, default=None, help="runs per tool (default 3, quick 1)")
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed runs per tool first (default 1, quick and 7B sizes 0)",
    )
    p.add_argument("--device", default="cpu", help="mergekit-fast's --device (mergekit runs on the CPU)")
    p.add_argument("--page-cache", action="store_true",
                   help="also run mergekit-fast with --no-direct-io (the page-cache path), side by side")  # fmt: skip
    p.add_argument("--skip-mergekit", action="store_true")
    p.add_argument(
        "--synthetic", action="store_true", help="models written with torch alone (no transformers)"
    )
    p.add_argument("--verify", default="0", help="mergekit-fast --verify N|all")
    p.add_argument("--cold", choices=("evict", "drop", "warm"), default=None,
                   help="before each run: evict the inputs from the page cache (posix_fadvise DONTNEED), drop "
                        "the whole page cache (root), or nothing (default: evict for the 7B sizes, else warm)")  # fmt: skip
    p.add_argument("--floor", action=argparse.BooleanOptionalAction, default=None,
                   help="also run the disk's floor, bench/io_floor.py (default: on for the 7B sizes)")  # fmt: skip
    p.add_argument("--out", type=Path, default=common.RESULTS)
    args = p.parse_args(argv)
    size = args.size or ("0.1b" if args.quick else "0.85b")
    disk = size in DISK_SIZES
    runs = args.runs or (1 if args.quick else 3)
    args.warmup = args.warmup if args.warmup is not None else (0 if args.quick or disk else 1)
    cold = args.cold or ("evict" if disk else "warm")
    floor = args.floor if args.floor is not None else disk
    count = method_configs.inputs(args.method)
    a, b, c, n = models(size, args.synthetic, count)
    inputs = [a, b, c][:count]
    bindir = Path(sys.executable).parent
    cache = common.RESULTS.parent / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="mkf-bench-", dir=cache if disk else None))  # on the inputs' disk
    cfg = work / "config.yml"
    cfg.write_text(method_configs.config(args.method, a, b, c, n))
    tools = {"mergekit_fast": [str(bindir / "mergekit-fast"), "merge", str(cfg), str(work / "out_fast"), "--force",
                                "--device", args.device, "--no-progress", "-q", "--verify", args.verify]}  # fmt: skip
    if args.page_cache:  # the same merge without direct I/O, side by side
        tools["mergekit_fast_page_cache"] = [*tools["mergekit_fast"], "--no-direct-io"]
        outs_extra = {"mergekit_fast_page_cache": work / "out_fast"}
    else:
        outs_extra = {}
    if not args.skip_mergekit:
        # --clone-tensors is mergekit's fastest setting here (2 x 0.85B SLERP: 17.5-18.7 s with it, 22-27 s
        # without, 2026-11-29), and DUS needs it anyway (duplicated layers share storage).
        tools["mergekit"] = [str(bindir / "mergekit-yaml"), str(cfg), str(work / "out_mk"), "--no-write-model-card",
                             "--clone-tensors", "--quiet"]  # fmt: skip
    out_bytes = output_bytes(cfg)
    if floor:
        tools["floor"] = [sys.executable, str(Path(__file__).resolve().parent / "io_floor.py"),
                          *[x for m in inputs for x in ("--model", str(m))], "--write-bytes", str(out_bytes),
                          "--out", str(work / "floor.bin"), "--keep"]  # fmt: skip
    outs = {"mergekit_fast": work / "out_fast", "mergekit": work / "out_mk", "floor": work / "floor.bin"}
    outs.update(outs_extra)
    files = [f for m in inputs for f in sorted(m.glob("*.safetensors"))]

    def before() -> None:
        if cold == "drop" and not common.drop_caches():
            raise SystemExit("--cold drop: /proc/sys/vm/drop_caches refused (not root?); use --cold evict")
        if cold != "warm":
            common.evict(files)

    load = [os.getloadavg()[0]]
    try:
        results = common.alternate(
            {t: (cmd, outs[t]) for t, cmd in tools.items()}, runs, args.warmup, env={"HF_HUB_OFFLINE": "1"},
            before=before, timed_sync=disk or floor, disk=cache, after=lambda tool, out: load.append(os.getloadavg()[0])
        )  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    size_bytes = sum(f.stat().st_size for f in a.glob("*.safetensors"))
    base = {"bench": f"merge_{args.method}", "model": size, "model_bytes": size_bytes, "device": args.device,
            "cache": cold}  # fmt: skip
    rate = ("input_GBps", count * size_bytes)
    # Each run's time: wall + the sync after it (the output on disk, as the floor's fsync has it).
    timed = {t: [(sec + e.get("sync_s", 0.0), rss) for sec, rss, e in vals] for t, vals in results.items()}
    rows = common.summarize_tools(timed, base, f"{args.method} {size}", "mergekit", rate)
    for row in rows:
        vals = results[row["tool"]]
        row["wall_s"] = statistics.median(v[0] for v in vals)
        for key in ("sync_s", "disk_busy"):
            if all(key in v[2] for v in vals):
                row[key] = statistics.median(v[2][key] for v in vals)
        row["output_bytes"] = out_bytes
        row["load_avg"] = statistics.median(load)
    if floor:
        ref = next(r for r in rows if r["tool"] == "floor")
        for row in rows:
            row["time_vs_floor"] = row["seconds"] / ref["seconds"]
        print(f"floor {ref['seconds']:.2f} s: " + ", ".join(
            f"{r['tool']} {r['seconds']:.2f} s = {r['time_vs_floor']:.2f}x the floor" for r in rows
            if r["tool"] != "floor") + f" (load average {statistics.median(load):.1f})")  # fmt: skip
    stem = f"merge-{args.method}-{size}-{'cold-' if cold != 'warm' else ''}{common.machine_tag()}"
    csv_path, _ = common.write_rows(rows, args.out, stem)
    print(f"wrote {csv_path}")
    from plot import tools_chart

    png = tools_chart(
        rows, csv_path.with_suffix(".png"), f"{args.method} {size} ({cold}): wall + sync, peak RSS"
    )
    if png is not None:
        print(f"wrote {png}")
    return 0


def output_bytes(cfg: Path) -> int:
    """The bytes of the merged weights, from mergekit_fast's plan of the config (headers only)."""
    from mergekit_fast.config import load_config
    from mergekit_fast.engine import ShardLayout
    from mergekit_fast.plan import build_plan

    plan = build_plan(load_config(cfg), use_transformers=False)
    try:
        return ShardLayout.of(plan, SHARD_BYTES).total
    finally:
        for src in plan.sources.values():
            src.close()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raise SystemExit(main())
