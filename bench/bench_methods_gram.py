"""The gram-based methods on one tensor: mergekit-fast's compute against mergekit 0.1.5's own method.

Per method, one bf16 tensor (default 14336 x 4096, an MLP projection of a 7B model) as a base and two
inputs (karcher, which takes no base, merges the three), random and correlated like fine-tunes. Both
tools run on the same tensors in the same process, alternating, and the report gives the median time
of each, their ratio, and the memory-traffic floor: the bytes the math has to move at least (passes
over the inputs and one write of the output) over the measured copy bandwidth. Our compute's own
result is checked against mergekit's (bit-identical, or the share of elements that differ).

    flock /tmp/mkf-bench.lock python bench/bench_methods_gram.py            # every gram method
    flock /tmp/mkf-bench.lock python bench/bench_methods_gram.py --method model_stock --shape 4096 4096
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from mergekit_fast import methods  # noqa: E402
from mergekit_fast.methods.base import Context  # noqa: E402

# name: (our planned parameters, mergekit's parameters, the inputs' reads the math needs at least
# (in tensors), whether the base is an input (karcher: no base, three inputs))
SETUPS = {
    # one pass for the norms and dots, one for the result
    "model_stock": ({"filter_wise": False}, {"filter_wise": False}, 6, True),
    # norms, the dot of the normalised vectors, the result
    "nuslerp": ({"t": 0.5, "weights": (0.5, 0.5), "row_wise": False, "flatten": True},
                {"weight": (0.5, 0.5), "nuslerp_row_wise": False, "nuslerp_flatten": True}, 9, True),
    # norms, the mean's dots, the tangent step's norm, the result
    "multislerp": ({"weights": (0.5, 0.5), "normalize_weights": True, "eps": 1e-8},
                   {"weight": (0.5, 0.5), "normalize_weights": True, "eps": 1e-8}, 12, True),
    # norms, then per iteration the dots (the step's and mean's norms fold in): 3 + 10 x 4 reads
    "karcher": ({"max_iter": 10, "tol": 1e-5}, {"max_iter": 10, "tol": 1e-5}, 43, False),
}  # fmt: skip


def mergekit_fn(name: str, inputs: list[torch.Tensor], params: dict):
    import importlib

    from mergekit.merge_methods import base as mkbase

    module, attr = {
        "model_stock": ("model_stock", "model_stock_merge_method"),
        "nuslerp": ("nuslerp", "nuslerp_merge_method"),
        "multislerp": ("multislerp", "multislerp"),
        "karcher": ("karcher", "karcher_merge_method"),
    }[name]
    fn = getattr(importlib.import_module(f"mergekit.merge_methods.{module}"), attr)
    has_base = SETUPS[name][3]
    group = mkbase.TensorGroup.from_tensors(inputs, base_index=0 if has_base else None)
    kw = dict(params)
    if "weight" in kw:
        kw["weight"] = mkbase.PerInputValues(list(zip(range(1, len(inputs)), kw["weight"])))
    return lambda: fn.merge_group(group, **kw)


def tensors(shape, seed=0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    common_dir = torch.randn(shape, generator=g)
    xs = [base + 0.02 * (0.5 * common_dir + torch.randn(shape, generator=g)) for _ in range(2)]
    return [t.to(torch.bfloat16) for t in (base, *xs)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", action="append", choices=sorted(SETUPS), help="default: every one")
    p.add_argument("--shape", type=int, nargs=2, default=(14336, 4096))
    p.add_argument("--runs", type=int, default=2, help="timed runs per tool, after one untimed")
    p.add_argument("--out", type=Path, default=common.RESULTS)
    args = p.parse_args(argv)
    inputs = tensors(tuple(args.shape))
    nbytes = inputs[0].nbytes
    bw = common.copy_bandwidth()
    rows = []
    for name in args.method or list(SETUPS):
        ours_params, mk_params, reads, _ = SETUPS[name]
        m = methods.get(name)
        ctx = Context(name=name)
        tools = {"mergekit_fast": lambda m=m, p=ours_params, c=ctx: m.compute(list(inputs), p, c),
                 "mergekit": mergekit_fn(name, list(inputs), mk_params)}  # fmt: skip
        results = {t: fn() for t, fn in tools.items()}  # untimed, and the results to compare
        times: dict[str, list[float]] = {t: [] for t in tools}
        for _ in range(args.runs):
            for t, fn in tools.items():
                t0 = time.perf_counter()
                fn()
                times[t].append(time.perf_counter() - t0)
        a, b = results["mergekit_fast"], results["mergekit"]
        differ = float((a != b).double().mean()) if a.shape == b.shape else float("nan")
        floor = (reads + 1) * nbytes / (bw / 2)  # bw counts read + write bytes
        med = {t: statistics.median(v) for t, v in times.items()}
        row = {"bench": "method_gram", "method": name, "shape": "x".join(map(str, args.shape)), "dtype": "bfloat16",
               "inputs": len(inputs), "mergekit_fast_s": med["mergekit_fast"], "mergekit_s": med["mergekit"],
               "speedup": med["mergekit"] / med["mergekit_fast"], "floor_s": floor,
               "vs_floor": med["mergekit_fast"] / floor, "copy_GBps": bw / 1e9, "differing_elements": differ}  # fmt: skip
        rows.append(row)
        print(f"{name:12s} ours {med['mergekit_fast']:.3f} s  mergekit {med['mergekit']:.3f} s  "
              f"x{row['speedup']:.2f}  floor {floor:.3f} s (ours {row['vs_floor']:.1f}x)  differ {differ:.2e}",
              flush=True)  # fmt: skip
    csv_path, _ = common.write_rows(
        rows, args.out, f"methods-gram-{'x'.join(map(str, args.shape))}-{common.machine_tag()}"
    )
    print(f"wrote {csv_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
