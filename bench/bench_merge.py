"""End to end: mergekit-yaml (0.1.5) against mergekit-fast on the same config and models.

Each run is a fresh process (so peak RSS is that tool's own), runs alternate between the tools,
and the report gives the median wall time, peak RSS and their ratios. Models are random
Mistral-shaped checkpoints built once and cached under bench/cache/ (generated, never downloaded).

    python bench/bench_merge.py                 # two ~0.85B bf16 models (hidden 2048, 16 layers)
    python bench/bench_merge.py --quick         # two ~0.1B models
    python bench/bench_merge.py --method dus    # depth up-scaling instead of the gradient SLERP
    python bench/bench_merge.py --method ties   # any method with a config in bench/method_configs.py
    python bench/bench_merge.py --size 8x0.3b   # MoE inputs: Mixtral-shaped, 8 experts, fused layout
"""

from __future__ import annotations

import argparse
import os
import shutil
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
}
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


def models(size: str, synthetic: bool = False) -> tuple[Path, Path, Path, int]:
    if size in MOE_SIZES:
        return moe_models(size)
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
                   help="model size; the 8x... sizes are Mixtral-shaped MoE inputs (8 experts per layer)")  # fmt: skip
    p.add_argument("--method", choices=method_configs.methods(), default="slerp")
    p.add_argument("--runs", type=int, default=None, help="runs per tool (default 3, quick 1)")
    p.add_argument(
        "--warmup", type=int, default=None, help="untimed runs per tool first (default 1, quick 0)"
    )
    p.add_argument("--device", default="cpu", help="mergekit-fast's --device (mergekit runs on the CPU)")
    p.add_argument("--skip-mergekit", action="store_true")
    p.add_argument(
        "--synthetic", action="store_true", help="models written with torch alone (no transformers)"
    )
    p.add_argument("--verify", default="0", help="mergekit-fast --verify N|all")
    p.add_argument("--out", type=Path, default=common.RESULTS)
    args = p.parse_args(argv)
    size = args.size or ("0.1b" if args.quick else "0.85b")
    runs = args.runs or (1 if args.quick else 3)
    args.warmup = args.warmup if args.warmup is not None else (0 if args.quick else 1)
    a, b, c, n = models(size, args.synthetic)
    bindir = Path(sys.executable).parent
    work = Path(tempfile.mkdtemp(prefix="mkf-bench-"))
    cfg = work / "config.yml"
    cfg.write_text(method_configs.config(args.method, a, b, c, n))
    tools = {"mergekit_fast": [str(bindir / "mergekit-fast"), "merge", str(cfg), str(work / "out_fast"), "--force",
                                "--device", args.device, "--no-progress", "-q", "--verify", args.verify]}  # fmt: skip
    if not args.skip_mergekit:
        # --clone-tensors is mergekit's fastest setting here (2 x 0.85B SLERP: 17.5-18.7 s with it, 22-27 s
        # without, 2026-11-29), and DUS needs it anyway (duplicated layers share storage).
        tools["mergekit"] = [str(bindir / "mergekit-yaml"), str(cfg), str(work / "out_mk"), "--no-write-model-card",
                             "--clone-tensors", "--quiet"]  # fmt: skip
    outs = {"mergekit_fast": work / "out_fast", "mergekit": work / "out_mk"}
    try:
        results = common.alternate(
            {t: (cmd, outs[t]) for t, cmd in tools.items()}, runs, args.warmup, env={"HF_HUB_OFFLINE": "1"}
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    size_bytes = sum(f.stat().st_size for f in a.glob("*.safetensors"))
    base = {"bench": f"merge_{args.method}", "model": size, "model_bytes": size_bytes, "device": args.device}
    rate = ("input_GBps", method_configs.inputs(args.method) * size_bytes)
    rows = common.summarize_tools(results, base, f"{args.method} {size}", "mergekit", rate)
    csv_path, _ = common.write_rows(rows, args.out, f"merge-{args.method}-{size}-{common.machine_tag()}")
    print(f"wrote {csv_path}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raise SystemExit(main())
