"""End to end: mergekit-moe (0.1.5) against `mergekit-fast moe` on the same config and models.

A 4-expert Mixtral built from random Mistral-shaped models with ``gate_mode: cheap_embed`` (the gates need
the base model's embedding only, so the run measures the MoE build itself: reading four experts, fusing
their MLP weights, writing the output). Each run is a fresh process (so peak RSS is that tool's own), runs
alternate between the tools, and the report gives the median wall time, peak RSS and their ratios. Models
are built once and cached under bench/cache/ (generated, never downloaded); the base model is expert 0
plus a word-level tokenizer (a directory of links to its files).

    python bench/bench_moe.py              # four ~0.85B bf16 models (hidden 2048, 16 layers, intermediate 5632)
    python bench/bench_moe.py --quick      # four ~0.1B models, one run each
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
from bench_merge import SIZES  # noqa: E402

NUM_EXPERTS = 4


def models(size: str) -> tuple[Path, list[Path]]:
    """(base, experts): experts are mistral-<size>-{a,b,c,d} (a and b shared with bench_merge)."""
    h, n, i, v, heads, kv = SIZES[size]
    kw = dict(arch="mistral", num_layers=n, hidden_size=h, intermediate_size=i, vocab_size=v, num_heads=heads,
              num_kv_heads=kv)  # fmt: skip
    experts = [common.cached_model(f"mistral-{size}-{tag}", seed=s + 1, **kw) for s, tag in enumerate("abcd")]
    base = experts[0].parent / f"moe-base-{size}"
    if not (base / "tokenizer.json").exists():
        from mergekit_fast.testing import write_tokenizer

        tmp = base.with_name(base.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for f in experts[0].iterdir():
            (tmp / f.name).symlink_to(f.resolve())
        write_tokenizer(tmp, v)
        shutil.rmtree(base, ignore_errors=True)
        tmp.rename(base)
    return base, experts


def moe_config(base: Path, experts: list[Path]) -> str:
    lines = [
        f"base_model: {base}",
        "gate_mode: cheap_embed",
        "dtype: bfloat16",
        "experts_per_token: 2",
        "experts:",
    ]
    for k, e in enumerate(experts):
        prompts = ", ".join(f'"w{10 + 20 * k + j} w{11 + 20 * k + j} w{12 + 20 * k + j}"' for j in range(3))
        lines += [f"  - source_model: {e}", f"    positive_prompts: [{prompts}]"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small models, one run each")
    p.add_argument("--size", choices=sorted(SIZES), default=None)
    p.add_argument("--runs", type=int, default=None, help="runs per tool (default 3, quick 1)")
    p.add_argument(
        "--warmup", type=int, default=None, help="untimed runs per tool first (default 1, quick 0)"
    )
    p.add_argument("--device", default="cpu", help="mergekit-fast's --device (mergekit runs on the CPU)")
    p.add_argument("--skip-mergekit", action="store_true")
    p.add_argument("--verify", default="0", help="mergekit-fast --verify N|all")
    p.add_argument("--out", type=Path, default=common.RESULTS)
    args = p.parse_args(argv)
    size = args.size or ("0.1b" if args.quick else "0.85b")
    runs = args.runs or (1 if args.quick else 3)
    args.warmup = args.warmup if args.warmup is not None else (0 if args.quick else 1)
    base, experts = models(size)
    bindir = Path(sys.executable).parent
    work = Path(tempfile.mkdtemp(prefix="mkf-bench-moe-"))
    cfg = work / "moe.yml"
    cfg.write_text(moe_config(base, experts))
    tools = {"mergekit_fast": [str(bindir / "mergekit-fast"), "moe", str(cfg), str(work / "out_fast"), "--force",
                                "--device", args.device, "--no-progress", "-q", "--verify", args.verify]}  # fmt: skip
    if not args.skip_mergekit:
        tools["mergekit"] = [str(bindir / "mergekit-moe"), str(cfg), str(work / "out_mk"), "--no-write-model-card",
                             "--quiet"]  # fmt: skip
    outs = {"mergekit_fast": work / "out_fast", "mergekit": work / "out_mk"}
    out_bytes = 0

    def measure_output(tool: str, out: Path) -> None:
        nonlocal out_bytes
        out_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))

    try:
        results = common.alternate({t: (cmd, outs[t]) for t, cmd in tools.items()}, runs, args.warmup,
                                   env={"HF_HUB_OFFLINE": "1"}, after=measure_output)  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    in_bytes = sum(f.stat().st_size for e in experts for f in e.glob("*.safetensors"))
    base = {"bench": "moe_cheap_embed", "model": size, "experts": NUM_EXPERTS, "input_bytes": in_bytes,
            "output_bytes": out_bytes, "device": args.device}  # fmt: skip
    rows = common.summarize_tools(
        results, base, f"moe {NUM_EXPERTS}x{size}", "mergekit", ("output_GBps", out_bytes)
    )
    csv_path, _ = common.write_rows(rows, args.out, f"moe-{size}-{common.machine_tag()}")
    print(f"wrote {csv_path}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raise SystemExit(main())
