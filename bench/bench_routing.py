"""MoE top-k routing latency per backend, beside torch eager (softmax, topk, renormalise).

Grid: tokens T in {1, 128, 4096, 65536}, experts E in {8, 64, 256}, k in {2, 8} (k <= E), bf16 logits
(--dtype). Every available backend of mergekit_fast.topk_routing for the device is timed (Mixtral
routing: softmax, top-k, renormalise), side by side in the same run with torch eager doing the
same thing the way transformers does:
    p = softmax(logits.float()); w, ids = topk(p, k); w /= w.sum(-1)
On the CPU the Triton interpreter is not timed (it is not a speed path), nor the torch reference
backend unless --with-ref (it sorts whole rows: an oracle, not a fast path).

Bytes counted per call: the logits read once and the k fp32 weights + k int32 ids written. The
kernel is latency-bound for small T (a launch), so the time column matters more than GB/s there.

    python bench/bench_routing.py [--quick] [--device cpu|cuda] [--dtype bf16|fp16|fp32] [--threads N]
                                  [--out DIR]

Writes routing_<machine>.csv/.json and routing_<machine>.png to --out (default bench/results/).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import mergekit_fast as mk  # noqa: E402
from mergekit_fast import backends  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def torch_eager(logits: torch.Tensor, k: int):
    """transformers' Mixtral router after the linear layer."""
    p = torch.softmax(logits.float(), dim=-1)
    w, ids = torch.topk(p, k, dim=-1)
    w /= w.sum(dim=-1, keepdim=True)
    return w, ids


def providers(device: str, with_ref: bool) -> dict:
    out = {"torch-eager": torch_eager}
    dev = torch.device(device)
    for b in backends.BACKENDS:
        if backends.unavailable_reason(b, dev) is not None:
            continue
        if b == "triton" and dev.type == "cpu":
            continue  # the interpreter
        if b == "torch" and not with_ref:
            continue
        out[b] = lambda x, k, b=b: mk.topk_routing(x, k, backend=b)
    return out


def plot(rows: list[dict], path: Path, title: str) -> Path | None:
    """One panel per (E, k) (bench/plot.py draws it); None, and no file, without matplotlib."""
    from plot import routing_chart

    return routing_chart(rows, path, title)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="reduced grid: T in {1, 4096}, E in {8, 256}")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    ap.add_argument("--out", type=Path, default=common.RESULTS)
    ap.add_argument("--with-ref", action="store_true", help="also time the torch reference backend")
    ap.add_argument("--budget", type=float, default=0.3, help="seconds per measurement (CPU)")
    ap.add_argument(
        "--threads", type=int, default=0, help="CPU threads for torch and the C++ kernel (0: default)"
    )
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)  # the C++ kernel uses torch.get_num_threads() too

    dtype = DTYPES[args.dtype]
    Ts = [1, 4096] if args.quick else [1, 128, 4096, 65536]
    Es = [8, 256] if args.quick else [8, 64, 256]
    ks = [2, 8]
    provs = providers(args.device, args.with_ref)
    elem = torch.tensor([], dtype=dtype).element_size()
    rows = []
    gen = torch.Generator().manual_seed(0)
    for E in Es:
        for k in ks:
            if k > E:
                continue
            for T in Ts:
                x = torch.randn(T, E, generator=gen).to(dtype).to(args.device)
                nbytes = T * E * elem + T * k * 8
                ref_ids = mk.topk_routing(x, k, backend="torch")[1]
                for name, fn in provs.items():
                    if name != "torch-eager":  # sanity: every timed backend returns the reference's ids
                        assert torch.equal(fn(x, k)[1], ref_ids), f"{name}: ids differ from the reference"
                    sec = common.bench_time(
                        lambda fn=fn, x=x, k=k: fn(x, k), device=args.device, budget_s=args.budget
                    )
                    rows.append({"provider": name, "T": T, "E": E, "k": k, "dtype": args.dtype,
                                 "threads": torch.get_num_threads(), "us": sec * 1e6,
                                 "GBps": nbytes / sec / 1e9, "bytes": nbytes})  # fmt: skip

    tag = common.machine_tag()
    info = common.machine_info()
    title = f"top-k routing ({args.dtype} logits) on {info['gpu'] or info['cpu']}"
    if args.device == "cpu":
        tag += f"-t{torch.get_num_threads()}"
        title += f", {torch.get_num_threads()} threads"
    csv_path, _ = common.write_rows(rows, args.out, f"routing_{tag}", info)
    png = plot(rows, args.out / f"routing_{tag}.png", title)

    # Summary: each backend against torch eager, point by point.
    by = {(r["provider"], r["T"], r["E"], r["k"]): r["us"] for r in rows}
    print(f"{'T':>6} {'E':>4} {'k':>2}  " + "  ".join(f"{p:>12}" for p in provs) + "   (median us)")
    for E in Es:
        for k in ks:
            for T in Ts:
                if (("torch-eager", T, E, k)) not in by:
                    continue
                print(f"{T:>6} {E:>4} {k:>2}  " + "  ".join(f"{by[(p, T, E, k)]:>12.1f}" for p in provs))
    for p in provs:
        if p == "torch-eager":
            continue
        ratios = [by[("torch-eager", T, E, k)] / by[(p, T, E, k)] for (q, T, E, k) in by if q == p]
        gm = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
        print(f"{p}: speed-up over torch eager: geometric mean {gm:.2f}x, min {min(ratios):.2f}x, "
              f"max {max(ratios):.2f}x over {len(ratios)} points")  # fmt: skip
    print(
        f"wrote {csv_path}"
        + (f" and {png}" if png else f"; no plot (no matplotlib): python bench/plot.py {csv_path}")
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
