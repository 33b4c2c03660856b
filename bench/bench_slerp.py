"""SLERP kernel throughput per backend and tensor size, beside mergekit 0.1.5's own slerp.

Throughput counts the minimum bytes a SLERP must move: 5n elements for a tensor that does not fit
on chip (read a and b for the sums, read them again and write the result), 3n for the segmented
kernel (read once, write once). The mergekit provider is mergekit.merge_methods.slerp.slerp when
mergekit is installed (else the same three-pass torch code restated here), measured in the same run.

    python bench/bench_slerp.py [--quick] [--device cpu|cuda] [--out bench/results]
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import mergekit_fast as mk  # noqa: E402
from mergekit_fast import backends  # noqa: E402


def mergekit_style_slerp():
    """mergekit 0.1.5's slerp: three chunked passes, fp32 conversions in torch."""
    try:
        from mergekit.merge_methods.slerp import slerp

        return "mergekit-0.1.5", slerp
    except ImportError:
        pass

    def slerp(t, v0, v1, dot_threshold=0.9995, eps=1e-8):  # the same code, restated
        chunk = 1 << 20
        a, b = v0.reshape(1, -1), v1.reshape(1, -1)
        t = t.reshape(-1, 1).float()
        na = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(a[:, s : s + chunk].float(), dim=1)
                                                   for s in range(0, a.shape[1], chunk)]), dim=0)  # fmt: skip
        nb = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(b[:, s : s + chunk].float(), dim=1)
                                                   for s in range(0, b.shape[1], chunk)]), dim=0)  # fmt: skip
        na = torch.where(na > eps, na, 1)
        nb = torch.where(nb > eps, nb, 1)
        dot = sum((a[:, s : s + chunk].float() / na * (b[:, s : s + chunk].float() / nb)).sum(1)
                  for s in range(0, a.shape[1], chunk)).clamp(-1, 1)  # fmt: skip
        lin = dot.abs() > dot_threshold
        th = torch.acos(torch.where(lin, 0, dot))
        ca = torch.where(lin, 1 - t, torch.sin((1 - t) * th) / torch.sin(th))
        cb = torch.where(lin, t, torch.sin(t * th) / torch.sin(th))
        out = torch.empty_like(a)
        for s in range(0, a.shape[1], chunk):
            out[:, s : s + chunk] = ca * a[:, s : s + chunk].float() + cb * b[:, s : s + chunk].float()
        return out.reshape(v0.shape)

    return "mergekit-style", slerp


def _providers(names, mk_name, mk_slerp, As, Bs, *, batched: bool) -> dict:
    """name -> zero-argument callable, for each backend and for mergekit (a per-tensor loop)."""
    ts = [0.3] * len(As)
    tt = torch.tensor([0.3], device=As[0].device)
    outs = [torch.empty_like(a) for a in As]  # preallocated: time the kernel, not the allocator
    suffix = "-segmented" if batched else ""
    provs = {
        f"{n}{suffix}": functools.partial(mk.slerp_batched, ts, As, Bs, backend=n, outs=outs) for n in names
    }
    provs[mk_name + ("-loop" if batched else "")] = lambda: [
        mk_slerp(tt, x[None], y[None]) for x, y in zip(As, Bs)
    ]
    return provs


def run(quick: bool, device: str, out_dir: Path) -> list[dict]:
    dev = torch.device(device)
    names = [b for b in ("cuda", "triton", "cpp") if backends.unavailable_reason(b, dev) is None]
    if dev.type == "cpu" and "triton" in names:
        names.remove("triton")  # the interpreter is a correctness tool, not a speed path
    mk_name, mk_slerp = mergekit_style_slerp()
    dtypes = [torch.bfloat16] if quick else [torch.bfloat16, torch.float32]
    if dev.type == "cuda":
        exps = [12, 16, 20, 24, 26] if quick else list(range(10, 29, 2))
    else:
        exps = [12, 16, 20, 24] if quick else [10, 12, 14, 16, 18, 20, 22, 24, 25]
    budget = 0.3 if quick else 1.0
    rows = []
    for dtype in dtypes:
        for e in exps:
            n = 1 << e
            a = torch.randn(n, device=dev).to(dtype)
            b = torch.randn(n, device=dev).to(dtype)
            traffic = 5 * n * a.element_size()
            provs = _providers(names, mk_name, mk_slerp, [a], [b], batched=False)
            times = {p: common.bench_time(f, device=device, budget_s=budget) for p, f in provs.items()}
            for p, sec in times.items():
                rows.append({
                    "bench": "slerp", "backend": p, "device": dev.type, "dtype": str(dtype).replace("torch.", ""),
                    "numel": n, "tensors": 1, "seconds": sec, "bytes": traffic, "GBps": traffic / sec / 1e9,
                    "speedup_vs_mergekit": times[mk_name] / sec,
                })  # fmt: skip
            best = min(names, key=times.__getitem__) if names else mk_name
            print(f"slerp {dtype} n=2^{e}: " + ", ".join(f"{p} {traffic / s / 1e9:.2f} GB/s" for p, s in times.items())
                  + f"  (best {best}: {times[mk_name] / times[best]:.1f}x mergekit)")  # fmt: skip
    # Segmented: many small tensors (norms, biases) in one call, against a per-tensor loop.
    count = 512 if quick else 2048
    for size in [1024, 4096] if quick else [256, 1024, 4096, 16384]:
        As = [torch.randn(size, device=dev).bfloat16() for _ in range(count)]
        Bs = [torch.randn(size, device=dev).bfloat16() for _ in range(count)]
        traffic = 3 * size * count * 2
        provs = _providers(names, mk_name, mk_slerp, As, Bs, batched=True)
        times = {p: common.bench_time(f, device=device, budget_s=budget) for p, f in provs.items()}
        for p, sec in times.items():
            rows.append({
                "bench": "slerp_segments", "backend": p, "device": dev.type, "dtype": "bfloat16", "numel": size,
                "tensors": count, "seconds": sec, "bytes": traffic, "GBps": traffic / sec / 1e9,
                "speedup_vs_mergekit": times[mk_name + "-loop"] / sec,
            })  # fmt: skip
        print(
            f"segments {count} x {size}: "
            + ", ".join(f"{p} {traffic / s / 1e9:.2f} GB/s" for p, s in times.items())
        )
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=common.RESULTS)
    args = p.parse_args(argv)
    rows = run(args.quick, args.device, args.out)
    stem = f"slerp-{common.machine_tag()}"
    ceiling = common.copy_bandwidth(args.device) / 1e9
    for r in rows:
        r["copy_GBps"] = ceiling
        r["frac_of_copy"] = r["GBps"] / ceiling
    csv_path, _ = common.write_rows(rows, args.out, stem)
    big = [r for r in rows if r["bench"] == "slerp" and r["dtype"] == "bfloat16"]
    png = common.plot_throughput(big, args.out / f"{stem}.png", x="numel", ceiling=ceiling,
                                 title=f"SLERP bf16 on {args.device} ({common.machine_tag()})")  # fmt: skip
    plotted = f" and {png}" if png else f"; no plot (no matplotlib): python bench/plot.py {csv_path}"
    print(f"wrote {csv_path}{plotted} (copy bandwidth {ceiling:.1f} GB/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
