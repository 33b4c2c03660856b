"""The gram op (mergekit_fast/ops/gram.py) per backend, beside torch eager, in GB/s.

k bf16 tensors of n elements and a base: the k x k dot products of the deltas x_i - base. torch eager
is what the methods did before the op: one fp64 upcast of each delta and a matmul (the same fp64 sums,
another order). Bytes counted per call: one read of the k inputs and the base; the copy bandwidth
measured in the same run is the ceiling ("floor" time = bytes / (copy bandwidth / 2)).

    python bench/bench_gram.py [--quick] [--device cpu|cuda] [--out DIR]

Writes gram_<machine>.csv/.json to --out (default bench/results/). On a GPU the op has no CUDA or
Triton kernel yet: its torch backend (the reference) is timed there.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from mergekit_fast import backends  # noqa: E402
from mergekit_fast.ops.gram import gram  # noqa: E402


def torch_eager(xs, base):
    d = torch.stack([x.double() - base.double() for x in xs]).reshape(len(xs), -1)
    return d @ d.T


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=common.RESULTS)
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    sizes = [1 << 16, 1 << 20] if args.quick else [1 << 16, 1 << 20, 1 << 24]
    ks = [2, 3] if args.quick else [1, 2, 3, 4, 8]
    bw = common.copy_bandwidth(args.device)
    names = [b for b in ("cpp", "torch") if backends.unavailable_reason(b, dev) is None]
    rows = []
    for n in sizes:
        for k in ks:
            g = torch.Generator().manual_seed(n + k)
            base = torch.randn(n, generator=g).to(torch.bfloat16).to(dev)
            xs = [
                (base.float() + 0.02 * torch.randn(n, generator=g).to(dev)).to(torch.bfloat16)
                for _ in range(k)
            ]
            nbytes = (k + 1) * base.nbytes
            provs = {"torch-eager": lambda xs=xs, base=base: torch_eager(xs, base)}
            for b in names:
                provs[b] = lambda b=b, xs=xs, base=base: gram(xs, base, backend=b)
            line = []
            for name, fn in provs.items():
                sec = common.bench_time(fn, device=args.device, budget_s=0.2 if args.quick else 0.5)
                rows.append({"bench": "gram", "n": n, "k": k, "dtype": "bfloat16", "device": args.device,
                             "backend": name, "seconds": sec, "GBps": nbytes / sec / 1e9,
                             "copy_GBps": bw / 1e9, "floor_s": nbytes / (bw / 2)})  # fmt: skip
                line.append(f"{name} {nbytes / sec / 1e9:.2f} GB/s")
            print(f"gram bf16 n=2^{n.bit_length() - 1} k={k}: " + ", ".join(line), flush=True)
    print(f"(copy bandwidth {bw / 1e9:.1f} GB/s)")
    csv_path, _ = common.write_rows(rows, args.out, f"gram_{common.machine_tag()}")
    print(f"wrote {csv_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
