"""Per merge method: the native select/combine kernels against mergekit 0.1.5's own method, one tensor.

One 14336 x 4096 bf16 tensor (an MLP projection of a 7B model), a base plus 2 (or 3) inputs, built once;
for every method the native CPU kernel (``mergekit_fast.ops.combine``: select + combine, by address,
all cores) and mergekit 0.1.5's own ``merge_group`` of that method on the same tensors, measured side by
side in this run (median of repeats; mergekit's slow methods run once). Also the memory-traffic floor:
the bytes the method must move at the least (passes x arrays x n x 2 bytes) over the measured copy
bandwidth, and how far the kernel is from it.

    flock /tmp/mkf-bench.lock python bench/bench_methods.py [--quick] [--inputs 2 3] [--methods ties ...]

Writes bench/results/methods-<machine>.csv (and .json with the machine's facts).
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from mergekit_fast.ops import combine  # noqa: E402

POINTWISE = "pointwise"  # not a sparsification: a method of its own kernel (its compute on the tensors)

# method: (sparsification, consensus, shared params, per-input params, arrays moved at the least)
# arrays: the reads and writes of one pass each, n elements of 2 bytes: k inputs + base read and the
# output written once (combine), plus base + inputs read once more where the method must see every
# delta before it can write (the magnitude histogram, the L1 norms of a rescale).
METHODS = {
    "linear": (None, None, {"normalize": True}, {"weight": (0.5, 0.3, 0.2, 0.1)}, lambda k: (k + 1) + 1),
    "task_arithmetic": (None, None, {"normalize": False, "rescale": False}, {"weight": (0.6, 0.4, 0.3)},
                        lambda k: (k + 1) + 1),
    "ties": ("magnitude", "sum", {"normalize": True, "rescale": False},
             {"weight": (0.6, 0.4, 0.3), "density": (0.5, 0.3, 0.4)}, lambda k: 2 * (k + 1) + 1),
    "breadcrumbs": ("magnitude_outliers", None, {"normalize": False, "rescale": False},
                    {"weight": (0.6, 0.4, 0.3), "density": (0.8, 0.7, 0.9), "gamma": (0.01, 0.02, 0.01)},
                    lambda k: 2 * (k + 1) + 1),
    "breadcrumbs_ties": ("magnitude_outliers", "sum", {"normalize": False, "rescale": False},
                         {"weight": (0.6, 0.4, 0.3), "density": (0.8, 0.7, 0.9), "gamma": (0.01, 0.02, 0.01)},
                         lambda k: 2 * (k + 1) + 1),
    "dare_linear": ("random", None, {"normalize": False, "rescale": True},
                    {"weight": (0.6, 0.4, 0.3), "density": (0.5, 0.3, 0.4)}, lambda k: 2 * (k + 1) + 1),
    "dare_ties": ("random", "sum", {"normalize": True, "rescale": True},
                  {"weight": (0.6, 0.4, 0.3), "density": (0.5, 0.3, 0.4)}, lambda k: 2 * (k + 1) + 1),
    # DELLA: per input, the rank pass reads base and input (2k arrays), then the combine's two passes
    "della": ("della_magprune", "sum", {"normalize": True, "rescale": True},
              {"weight": (0.6, 0.4, 0.3), "density": (0.5, 0.3, 0.4), "epsilon": (0.15, 0.1, 0.1)},
              lambda k: 2 * k + 2 * (k + 1) + 1),
    "della_linear": ("della_magprune", None, {"normalize": False, "rescale": True},
                     {"weight": (0.6, 0.4, 0.3), "density": (0.5, 0.3, 0.4), "epsilon": (0.15, 0.1, 0.1)},
                     lambda k: 2 * k + 2 * (k + 1) + 1),
    # the pointwise methods (csrc/combine/pointwise_cpu.cpp, through the method's compute); nearswap takes
    # the base and the first input only; ramplus_tl reads everything twice (its per-model counts first)
    "nearswap": (POINTWISE, None, {"t": 1e-3}, {}, lambda k: 3),
    "ram": (POINTWISE, None, {"epsilon": 1e-5}, {}, lambda k: (k + 1) + 1),
    "ramplus_tl": (POINTWISE, None, {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5}, {}, lambda k: 2 * (k + 1) + 1),
    # sce (ops/sce.py): the variance selection reads base + inputs, the mean squares pass reads them again,
    # the apply reads them a third time and writes the output
    "sce": (POINTWISE, None, {"select_topk": 0.1}, {}, lambda k: 3 * (k + 1) + 1),
}  # fmt: skip
NAME, SEED = "model.layers.0.mlp.down_proj.weight", 42


def tensors(shape, k: int):
    g = torch.Generator().manual_seed(0)
    base = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
    xs = [(base.float() + torch.randn(shape, generator=g) * 0.002).to(torch.bfloat16) for _ in range(k)]
    return base, xs


def _inputs_of(method: str, xs):
    return xs[:1] if method == "nearswap" else xs


def mergekit_fn(method: str, base, xs, shared: dict, per: dict):
    """mergekit 0.1.5's own merge_group of ``method`` on these tensors (None without mergekit)."""
    try:
        from mergekit import merge_methods as mk
        from mergekit.merge_methods.base import TensorGroup
    except ImportError:
        return None
    impl = mk.get(method)
    names = [p.name for p in impl.spec.parameters]
    xs = _inputs_of(method, xs)
    k = len(xs)
    if method == "linear":  # a batched method: one output of shape [1, ...], the weights [1, inputs]
        from mergekit.merge_methods.base import TensorBatch

        batch = TensorBatch(tuple(t.unsqueeze(0) for t in (base, *xs)))
        weight = torch.tensor([per["weight"][: k + 1]], dtype=torch.float32)
        return lambda: impl.merge_batch(batch, weight=weight, normalize=shared["normalize"])[0]
    else:
        ids = ["base"] + [f"m{i}" for i in range(k)]
        group = TensorGroup.from_tensors([base, *xs], ids=ids, base_index=0, name=NAME)
        params = {"int8_mask": False, "lambda": 1.0, **shared}
        params["density"] = dict.fromkeys(ids[1:], 1.0)
        for key, vals in per.items():
            params[key] = dict(zip(ids[1:], vals))
    params = {key: v for key, v in params.items() if key in names}
    return lambda: impl.merge_group(group, **params)


def native_fn(method: str, base, xs, shared: dict, per: dict):
    """The kernel, writing into one output buffer allocated and touched before the timing (as the copy
    that sets the floor does): the merge engine's output is a mapping of the output file, whose page
    faults are I/O, not the kernel's work. mergekit's times include its own allocations."""
    sp, cons = METHODS[method][0], METHODS[method][1]
    k = len(xs)
    out = torch.zeros_like(base)
    if sp == POINTWISE:
        from mergekit_fast import methods
        from mergekit_fast.methods.base import Context

        ins = [base, *_inputs_of(method, xs)]
        return lambda: methods.get(method).compute(ins, shared, Context(), out)
    if method == "linear":
        ins = [base, *xs]
        return lambda: combine.linear_tensors(ins, per["weight"][: k + 1], shared["normalize"], out=out)
    params = {**shared, "lambda": 1.0, **{key: tuple(v[:k]) for key, v in per.items()}}
    return lambda: combine.ta_merge_tensors(base, xs, params, sp, cons, name=NAME, seed=SEED, out=out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a 1024 x 4096 tensor")
    p.add_argument("--inputs", type=int, nargs="+", default=[2], help="non-base inputs (2, 3)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--skip-mergekit", action="store_true")
    p.add_argument("--out", type=Path, default=common.RESULTS)
    args = p.parse_args(argv)
    shape = (1024, 4096) if args.quick else (14336, 4096)
    n = shape[0] * shape[1]
    bw = common.copy_bandwidth()
    print(
        f"copy bandwidth {bw / 1e9:.2f} GB/s; tensor {shape[0]} x {shape[1]} bf16, {torch.get_num_threads()} threads"
    )
    rows = []
    for k in args.inputs:
        base, xs = tensors(shape, k)
        for method in args.methods:
            sp, cons, shared, per, arrays = METHODS[method]
            nat = native_fn(method, base, xs, shared, per)
            t_nat = common.bench_time(nat, budget_s=2.0, min_reps=3)
            row = {
                "method": method,
                "inputs": len(_inputs_of(method, xs)),
                "numel": n,
                "dtype": "bfloat16",
                "native_s": round(t_nat, 4),
            }
            traffic = arrays(k) * n * 2
            row["traffic_GB"] = round(traffic / 1e9, 3)
            row["floor_s"] = round(traffic / bw, 4)
            row["native_over_floor"] = round(t_nat / (traffic / bw), 2)
            row["native_GBps"] = round(traffic / t_nat / 1e9, 2)
            mkf = None if args.skip_mergekit else mergekit_fn(method, base, xs, shared, per)
            if mkf is not None:
                t0 = time.perf_counter()
                theirs = mkf()
                first = time.perf_counter() - t0
                t_mk = first if first > 5 else common.bench_time(mkf, budget_s=2.0, min_reps=2)
                row["mergekit_s"] = round(t_mk, 4)
                row["speedup"] = round(t_mk / t_nat, 1)
                if sp != "random":  # mergekit's draws come from its own generator
                    ours = nat()
                    row["equal_to_mergekit"] = bool(torch.equal(ours, theirs.to(ours.dtype)))
                del theirs
            rows.append(row)
            print(", ".join(f"{key}={v}" for key, v in row.items()), flush=True)
    stem = f"methods-{common.machine_tag()}" + ("-quick" if args.quick else "")
    csv_path, _ = common.write_rows(rows, args.out, stem)
    print(f"wrote {csv_path}")
    return 0


def triton_main(method_names: list[str], quick: bool, device: str, out_dir: Path) -> int:
    """The combine op's Triton kernels on ``device`` (a GPU): GB/s against the device's copy bandwidth,
    and the result against the C++ kernel's on the CPU, byte for byte."""
    shape = (1024, 4096) if quick else (14336, 4096)
    n = shape[0] * shape[1]
    bw = common.copy_bandwidth(device)
    print(f"{device} copy bandwidth {bw / 1e9:.1f} GB/s; tensor {shape[0]} x {shape[1]} bf16")
    base, xs = tensors(shape, 2)
    gbase, gxs = base.to(device), [x.to(device) for x in xs]
    rows = []
    for method in method_names:
        sp, cons, shared, per, arrays = METHODS[method]
        params = {**shared, "lambda": 1.0, **{key: tuple(v[:2]) for key, v in per.items()}}
        if method == "linear" or sp == POINTWISE:
            why = "linear has its own op" if method == "linear" else "no Triton kernel yet"
        else:
            why = combine.triton_plan(sp, params, 2, base.dtype)
        if why:
            print(f"{method}: no Triton kernel ({why})")
            continue
        out = torch.empty_like(gbase)

        run = functools.partial(combine.ta_merge, gbase, gxs, params, sp, cons, name=NAME, seed=SEED,
                                backend="triton", out=out)  # fmt: skip

        t = common.bench_time(run, device=device, budget_s=1.0)
        traffic = arrays(2) * n * 2
        ref = combine.ta_merge_tensors(base, xs, params, sp, cons, name=NAME, seed=SEED)
        row = {"method": method, "backend": "triton", "device": device, "numel": n, "seconds": round(t, 6),
               "GBps": round(traffic / t / 1e9, 1), "of_copy_bandwidth": round(traffic / t / bw, 3),
               "equal_to_cpp": bool(torch.equal(run().cpu(), ref))}  # fmt: skip
        rows.append(row)
        print(", ".join(f"{key}={v}" for key, v in row.items()), flush=True)
    stem = f"combine-triton-{common.machine_tag()}" + ("-quick" if quick else "")
    csv_path, _ = common.write_rows(rows, out_dir, stem)
    print(f"wrote {csv_path}")
    return 0


def op_main(op: str, method_names: list[str], doc: str, argv=None) -> int:
    """The per-op kernel benchmark that bench/gpu_check.sh runs (bench_<op>.py): these methods' kernels.
    On a GPU the combine op runs its Triton kernels (the others measure their C++ CPU kernels, as
    they have no GPU kernels yet)."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=common.RESULTS)
    args = p.parse_args(argv)
    if args.device != "cpu" and op == "combine":
        return triton_main(method_names, args.quick, args.device, args.out)
    if args.device != "cpu":
        print(f"{op}: no {args.device} kernels yet; measuring the C++ CPU kernels")
    extra = ["--quick", "--skip-mergekit"] if args.quick else []
    return main([*extra, "--methods", *method_names, "--out", str(args.out)])


if __name__ == "__main__":
    raise SystemExit(main())
