"""The combine op: ``base + lambda * sum_i w_i * mask_i * (x_i - base) / divisor``, native on the CPU.

``ta_merge_cpu`` runs one output tensor of the task-arithmetic family (task_arithmetic, ties, dare_ties,
dare_linear, breadcrumbs, breadcrumbs_ties, della, della_linear) by address, with no torch: the masks are
built inside the kernel (select's threshold rules and tie bitmaps, ``ops/select.py``; the Philox
Bernoulli draws of ``methods/rng.py``, bit for bit; DELLA's keep bitmaps, ``della_keep_cpu``: per-row
ranks in the order of torch's CPU argsort, one std::sort per row, each rank's keep probability in the
work dtype, and the draws), then mergekit's L1 rescale, the sign election and the normalisation,
every step rounded to the input dtype where torch rounds (csrc/common/ta_math.h). ``linear_cpu`` is
mergekit's linear merge (fp32 accumulation). The reference is the methods' torch path
(``methods/_task_arithmetic.merge``, ``methods/linear.Linear.compute``): the kernels equal it bit for
bit on the CPU (tests/test_ops_combine.py), with one documented exception: an L1 norm's fp64 block
sums are added in the kernel's order, not torch's, which can move a rescale factor by one ulp of the
work dtype only when the norm sits on a rounding boundary (probability about 2^-29 for fp32 deltas,
none seen in the tests; bf16/fp16 block sums are exact in fp64 whatever the order for all but extreme
magnitude ranges).

Not served natively (``native_plan`` says why, and the torch path runs): DELLA in fp64 (its ranks sort
fp64 magnitudes) or on tensors of more than 2 dims (strided rows), precise_sparsify, more
than ``MAX_INPUTS`` non-base models, tensors of 2^31 elements or more with a magnitude selection, and
fp64 tensors of ties/breadcrumbs with rescale (the factor is fp64 there, so the order of torch's fp64
block sums shows). NaN outputs are NaN where torch's are, but their sign and payload bits are not
reproduced (torch's own depend on the position: its vectorised bf16 conversion writes 0xFFFF, its tail
loop 0x7FC0).

``ta_merge`` is the op on torch tensors with the backends cpp (these kernels), triton
(triton_kernels/combine.py: task_arithmetic and DARE, no magnitude selection yet; ``triton_plan``) and
torch (``ta_merge_ref``, the methods' own arithmetic), and ``verify=`` against the reference.
"""

from __future__ import annotations

import math
from array import array

from mergekit_fast import _native, dtypes
from mergekit_fast.ops import select as _select

# csrc/common/ta_math.h
MASK_ALL, MASK_ZERO, MASK_RULE, MASK_BITMAP, MASK_RANDOM = 0, 1, 2, 3, 4
WORK_D, WORK_C, WORK_32 = 0, 1, 2
CONSENSUS = {None: 0, "sum": 1, "count": 2}
# stacks of up to this many non-base inputs are summed in torch's order (kTaSeqSumMax)
MAX_INPUTS = 4
LINEAR_MAX_INPUTS = 8  # csrc/combine/combine.h kCombineMaxInputs

_BF16, _F16, _F32, _F64 = 2, 1, 0, 3  # mkf::DType tags
DELLA = "della_magprune"


def _f32(x: float) -> float:
    """x rounded to fp32 (round to nearest even)."""
    return dtypes.round_f32(x)


def _bf16(x: float) -> float:
    """x rounded to bf16 the way torch converts a Python float: to fp32, then to bf16 (nearest even)."""
    return dtypes.round_to("bfloat16", x)


def draw_key(density: float, bf16: bool, name: str, i: int) -> tuple[int, int]:
    """The DARE draw of input ``i`` as the kernels take it (csrc/common/ta_math.h ta_draw_keep): the
    Bernoulli threshold ceil(p * 2^24) of the density p as mergekit holds it (bf16 for bf16 tensors,
    else fp32), and the Philox stream hash of the tensor name (methods/rng.py)."""
    from mergekit_fast.methods import rng

    p = _bf16(density) if bf16 else _f32(density)
    return math.ceil(_f32(p) * 2.0**24), rng.stream_hash(name, i)


def della_cols(shape) -> int | None:
    """The row length of DELLA's ranks (dim 1; a tensor of fewer than 2 dims is one row), or None where
    the kernel does not serve the shape (more than 2 dims: the rows are strided)."""
    shape = tuple(shape)
    if len(shape) > 2:
        return None
    return shape[1] if len(shape) == 2 else math.prod(shape)


def native_plan(sparsification: str | None, params: dict, n: int, count: int, tag: int | None, shape=None):
    """Whether the kernels serve this tensor (see the module docstring); a reason string when not.
    ``shape``: the tensor's shape (DELLA's rows; default: one row of n elements)."""
    if tag is None:
        return "dtype without native kernels"
    if not 1 <= count <= MAX_INPUTS:
        return f"{count} non-base models (the kernel sums up to {MAX_INPUTS} in torch's order)"
    if sparsification not in (None, "magnitude", "magnitude_outliers", "random", DELLA):
        return f"sparsification {sparsification} has no native kernel"
    if params.get("precise_sparsify"):
        return "precise_sparsify has no native kernel"
    if sparsification == DELLA:
        cols = della_cols((n,) if shape is None else shape)
        if tag == _F64:
            return "fp64 DELLA (its ranks sort fp64 magnitudes)"
        if cols is None:
            return "DELLA ranks of a tensor of more than 2 dims"
        if cols < 2 and n:
            return "DELLA rows of one element (the torch path names the error)"
        if cols >= 1 << 31:
            return "DELLA rows of 2^31 elements or more"
    if sparsification in ("magnitude", "magnitude_outliers") and n > _select.MAX_NUMEL:
        return "more than 2^31 elements"
    if tag == _F64 and params.get("rescale") and sparsification in ("magnitude", "magnitude_outliers"):
        # the factor stays in fp64, so it shows the order of torch's fp64 block sums, which the kernel
        # does not reproduce (every other work dtype rounds the norms to fp32 or less)
        return "fp64 with a rescaled magnitude selection"
    return None


def ta_merge_cpu(tag: int, n: int, base: int, xs: list[int], out: int, params: dict,
                 sparsification: str | None, consensus: str | None, *, name: str = "",
                 seed: int | None = None, threads: int = 0, shape=None) -> bool:  # fmt: skip
    """One tensor of the task-arithmetic family: ``base`` and the non-base inputs ``xs`` (addresses of n
    elements of dtype ``tag``) into ``out``; ``params`` as the method's planned parameters (per non-base
    tuples); ``shape`` the tensor's (DELLA ranks along dim 1; default one row). Returns whether every
    output element is finite."""
    count = len(xs)
    why = native_plan(sparsification, params, n, count, tag, shape)
    if why is not None:
        raise ValueError(f"ta_merge_cpu: {why}")
    if n == 0:
        return True
    densities = [float(d) for d in params.get("density", (1.0,) * count)]
    masks, works, thrs, hashes = [MASK_ALL] * count, [WORK_D] * count, [0] * count, [0] * count
    sel_idx, modes, sa, sb = [], [], [], []
    della_bits: dict[int, array] = {}  # DELLA's keep bitmaps by input, alive until the combine has run
    for i, density in enumerate(densities):
        if sparsification is None or density >= 1:
            continue
        if sparsification == "magnitude":
            if density <= 0:
                masks[i] = MASK_ZERO
                continue
            masks[i] = MASK_RULE
            sel_idx.append(i)
            modes.append(_select.SELECT_TOP)
            sa.append(max(1, int(density * n)))
            sb.append(n)
        elif sparsification == "magnitude_outliers":
            target = int(density * n)
            top = int(float(params["gamma"][i]) * n)
            bot = max(0, n - target - top)
            start, stop, _ = slice(bot, bot + target).indices(n)
            masks[i] = MASK_RULE
            sel_idx.append(i)
            modes.append(_select.SELECT_RANGE)
            sa.append(start)
            sb.append(stop)
        else:  # random, della
            if seed is None:
                raise ValueError(f"{name}: a random merge method needs a seed (the engine always passes one)")
            works[i] = {_BF16: WORK_D, _F32: WORK_D, _F16: WORK_C, _F64: WORK_32}[tag]
            if sparsification == "random":
                masks[i] = MASK_RANDOM
                thrs[i], hashes[i] = draw_key(density, tag == _BF16, name, i)
            elif density <= 0:
                masks[i] = MASK_ZERO
            else:
                masks[i] = MASK_BITMAP
                cols = della_cols((n,) if shape is None else shape)
                eps = float(params["epsilon"][i])
                della_bits[i] = della_keep_cpu(
                    tag, n, cols, base, xs[i], density, eps, seed, name, i, threads
                )
    rules = [(0, 0, 0)] * count
    bitmaps = [0] * count
    for i, bits in della_bits.items():
        bitmaps[i] = bits.buffer_info()[0]
    keep = None
    if sel_idx:
        sel = _select.ta_select_cpu(tag, n, base, [xs[i] for i in sel_idx], modes, sa, sb, threads)
        keep = sel
        for q, i in enumerate(sel_idx):
            rules[i] = sel.rules[q]
            bitmaps[i] = sel.bitmaps[q]
    tables = [
        array("Q", xs),
        array("I", masks),
        array("I", works),
        array("I", [v for r in rules for v in r]),
        array("Q", bitmaps),
        array("I", thrs),
        array("Q", hashes),
        array("d", [float(w) for w in params["weight"]]),
    ]
    addr = [t.buffer_info()[0] for t in tables]
    ok = _native.C.ta_combine_cpu(
        tag, n, base, out, count, *addr, int(seed or 0) & 0xFFFFFFFFFFFFFFFF, CONSENSUS[consensus],
        int(bool(params.get("normalize"))), int(bool(params.get("rescale"))), float(params.get("lambda", 1.0)),
        threads,
    )  # fmt: skip
    del keep, della_bits
    return bool(ok)


def della_keep_cpu(tag: int, n: int, cols: int, base: int, x: int, density: float, epsilon: float, seed: int,
                   name: str, stream: int, threads: int = 0) -> array:  # fmt: skip
    """DELLA's keep bitmap of one input (addresses of n elements of dtype ``tag``, rows of ``cols``): bit j
    set where mergekit 0.1.5's della_magprune keeps element j, with the Philox draws of stream
    (``seed``, ``name``, ``stream``) (methods/_task_arithmetic.py, ``della_probabilities`` and ``_draw``)."""
    from mergekit_fast.methods import rng

    bits = array("Q", bytes(8 * ((n + 63) // 64)))
    if n:
        _native.C.della_keep_cpu(tag, n, cols, base, x, float(density), float(epsilon),
                                 int(seed) & 0xFFFFFFFFFFFFFFFF, rng.stream_hash(name, stream), bits.buffer_info()[0],
                                 threads)  # fmt: skip
    return bits


def linear_cpu(tag: int, n: int, xs: list[int], out: int, weights, normalize: bool, threads: int = 0) -> bool:
    """mergekit's linear merge of the inputs ``xs`` into ``out`` (addresses, dtype ``tag``); whether every
    output element is finite."""
    if not 1 <= len(xs) <= LINEAR_MAX_INPUTS:
        raise ValueError(f"linear_cpu: 1 to {LINEAR_MAX_INPUTS} inputs")
    if n == 0:
        return True
    tx, tw = array("Q", xs), array("d", [float(w) for w in weights])
    return bool(_native.C.linear_cpu(tag, n, len(xs), tx.buffer_info()[0], out, tw.buffer_info()[0],
                                     int(bool(normalize)), threads))  # fmt: skip


# -- torch conveniences (tests, benchmarks): the kernels on contiguous CPU tensors


def ta_merge_tensors(base, others, params: dict, sparsification, consensus, *, name="", seed=None, threads=0,
                     out=None):  # fmt: skip
    """``ta_merge_cpu`` on torch CPU tensors; returns the output tensor (``out``, a contiguous tensor like
    ``base``, when given)."""
    import torch

    base = base.contiguous()
    others = [o.contiguous() for o in others]
    out = torch.empty_like(base) if out is None else out
    ta_merge_cpu(_native.dtype_tag(base.dtype), base.numel(), base.data_ptr(), [o.data_ptr() for o in others],
                 out.data_ptr(), params, sparsification, consensus, name=name, seed=seed, threads=threads,
                 shape=tuple(base.shape))  # fmt: skip
    return out


def linear_tensors(inputs, weights, normalize=True, threads=0, out=None):
    """``linear_cpu`` on torch CPU tensors; returns the output tensor (``out`` when given)."""
    import torch

    inputs = [x.contiguous() for x in inputs]
    out = torch.empty_like(inputs[0]) if out is None else out
    linear_cpu(_native.dtype_tag(inputs[0].dtype), inputs[0].numel(), [x.data_ptr() for x in inputs],
               out.data_ptr(), weights, normalize, threads)  # fmt: skip
    return out


# -- the op on torch tensors, every backend: cpp (the kernels above), triton, torch (the reference)


def triton_plan(sparsification: str | None, params: dict, count: int, dtype) -> str | None:
    """Whether the Triton kernel (triton_kernels/combine.py) serves this tensor; a reason string when not."""
    import torch

    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {dtype} has no Triton kernel"
    if not 1 <= count <= MAX_INPUTS:
        return f"{count} non-base models (the kernel takes 1 to {MAX_INPUTS})"
    if sparsification not in (None, "random"):
        return f"sparsification {sparsification} has no Triton kernel (no Triton select yet)"
    if params.get("precise_sparsify"):
        return "precise_sparsify has no Triton kernel"
    return None


def _run_triton(base, others, params, sparsification, consensus, name, seed, out):
    import torch

    from mergekit_fast.triton_kernels import combine as tk

    count = len(others)
    random = sparsification == "random"
    if random and seed is None:
        raise ValueError(f"{name}: a random merge method needs a seed")
    densities = [float(d) for d in params.get("density", (1.0,) * count)]
    keys = [
        draw_key(d, base.dtype == torch.bfloat16, name, i) if random else (0, 0)
        for i, d in enumerate(densities)
    ]
    thrs, hashes = [k[0] for k in keys], [k[1] for k in keys]
    weights = torch.tensor([float(w) for w in params["weight"]], dtype=base.dtype).float().tolist()
    tk.ta_combine(base, others, weights=weights, densities=densities, random=random, consensus=consensus,
                  normalize=bool(params.get("normalize")), rescale=bool(params.get("rescale")),
                  lam=float(params.get("lambda", 1.0)), seed=int(seed or 0) & 0xFFFFFFFFFFFFFFFF, hashes=hashes,
                  thresholds=thrs, out=out)  # fmt: skip


def ta_merge_ref(base, others, params: dict, sparsification, consensus, *, name="", seed=None):
    """The torch reference: ``methods._task_arithmetic.merge`` (mergekit 0.1.5's arithmetic), on the CPU."""
    from mergekit_fast.methods import _task_arithmetic as ta
    from mergekit_fast.methods.base import Context

    inputs = [base.detach().cpu(), *[o.detach().cpu() for o in others]]
    return ta.merge(
        inputs, dict(params), sparsification, consensus, Context(name=name, seed=seed), fast=False
    )


def ta_merge(base, others, params: dict, sparsification: str | None = None, consensus: str | None = None, *,
             name: str = "", seed: int | None = None, backend: str = "auto", verify: bool = False, out=None):  # fmt: skip
    """One output tensor of the task-arithmetic family on any backend: ``base`` and the non-base ``others``
    (same shape, dtype and device), ``params`` as the methods plan them (per-input tuples ``weight``,
    ``density``, ``gamma``; shared ``normalize``, ``rescale``, ``lambda``), ``sparsification`` None,
    "magnitude", "magnitude_outliers" or "random", ``consensus`` None, "sum" or "count"; ``name`` and
    ``seed`` key the random draws. Every backend gives mergekit 0.1.5's bits (the module docstring's
    one documented exception aside); ``verify=True`` (or MERGEKIT_FAST_VERIFY=1) checks the result
    against the torch reference, element for element, and raises VerificationError where it differs.
    "auto" takes the fastest backend that serves the tensor (cpp on the CPU; triton on CUDA), else torch.
    """
    import torch

    from mergekit_fast import backends
    from mergekit_fast.ops import _verify, verify_requested

    for i, o in enumerate(others):
        if o.shape != base.shape or o.dtype != base.dtype or o.device != base.device:
            raise ValueError(f"ta_merge: input {i + 1} is {tuple(o.shape)} {o.dtype} on {o.device}; the base is "
                             f"{tuple(base.shape)} {base.dtype} on {base.device}")  # fmt: skip
    name_b = backends.select("combine", base.device, backend, implemented=("cpp", "triton", "torch"))
    count = len(others)
    why = None
    if name_b == "cpp":
        why = native_plan(sparsification, params, base.numel(), count, _native.dtype_tag(base.dtype),
                          tuple(base.shape))  # fmt: skip
    elif name_b == "triton":
        why = triton_plan(sparsification, params, count, base.dtype)
    if why is not None:
        if (backend or "auto") != "auto":
            raise backends.BackendUnavailable(
                f"ta_merge: the {name_b} backend does not serve this tensor: {why}"
            )
        name_b = "torch"
    if name_b == "torch":
        result = ta_merge_ref(base, others, params, sparsification, consensus, name=name, seed=seed).to(
            base.device
        )
        result = out.copy_(result) if out is not None else result
    else:
        base_c = base.contiguous()
        others_c = [o.contiguous() for o in others]
        result = torch.empty_like(base_c) if out is None or not out.is_contiguous() else out
        if name_b == "cpp":
            ta_merge_tensors(
                base_c, others_c, params, sparsification, consensus, name=name, seed=seed, out=result
            )
        else:
            _run_triton(base_c, others_c, params, sparsification, consensus, name, seed, result)
        if out is not None and result is not out:
            result = out.copy_(result)
    if verify_requested(verify) and name_b != "torch":  # exact: every backend computes torch's roundings
        ref = ta_merge_ref(base, others, params, sparsification, consensus, name=name, seed=seed)
        _verify.check(f"ta_merge[{name_b}]", result, ref, max_ulps=0.0)
    return result
