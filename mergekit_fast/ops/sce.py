"""sce's native CPU passes (mergekit 0.1.5 merge_methods/sce.py; the math: ``methods/sce.py``).

``run(...)`` gives ``methods.sce.Sce.reference``'s bits for one tensor given by address, with three kernels:
``sce_select_cpu`` (csrc/select/select_cpu.cpp: the positions of the top-k variances, as torch.var and
torch.topk pick them), ``sce_squares_cpu`` (the selected deltas squared: their exact per-model sums, from
which the dtype's mean follows wherever torch's fp32 sum cannot round it two ways, ``means_of_sums``;
elsewhere the squares themselves, whose mean torch takes) and ``sce_apply_cpu`` (the sign consensus and
the weighted mean; both csrc/combine/pointwise_cpu.cpp). The few scalar ops between them (the weights'
normalisation) are replayed in Python with torch's roundings (``weights``). Nothing here imports torch
unless a mean is left to it: the engine's by-address path (``Sce.native_cpu``) merges without torch.
``sce_merge`` runs the same on torch tensors, ``variance_keep`` is the selection alone as a bool tensor
(the tests compare it with torch.topk's).
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Sequence

from mergekit_fast import _native, dtypes

DTYPE_NAMES = ("bfloat16", "float16", "float32")
MAX_NUMEL = (1 << 31) - 1  # positions are 32-bit in the selection kernel


def max_models(dtype_name: str) -> int:
    """The most models besides the base the kernels serve: the sums over the models are torch's (model by
    model from +0) up to 8 rows of a 16-bit tensor and 4 of an fp32 one (csrc/combine/combine.h)."""
    return 8 if dtype_name in ("bfloat16", "float16") else 4


def kernels_built() -> bool:
    return _native.C is not None and hasattr(_native.C, "sce_apply_cpu")


# ---------------------------------------------------------------------------- roundings, as torch's


_f32 = dtypes.round_f32
_bits32 = dtypes.f32_bits
_from_bits32 = dtypes.f32_from_bits
_round_to = dtypes.round_to


def _div32(a: float, b: float) -> float:
    """a / b in fp32 for fp32 values a and b, b != 0 (the double quotient rounded to fp32 is the correctly
    rounded fp32 quotient: 53 >= 2 * 24 + 2 bits)."""
    return _f32(a / b)


def _next32(v: float, up: bool) -> float:
    """The fp32 value next to the (finite, non-negative) fp32 value v, up or down."""
    if not up and v == 0:
        return -_from_bits32(1)
    return _from_bits32(_bits32(v) + (1 if up else -1))


# The mean of a 16-bit tensor's row on the CPU is torch's fp32 sum (cascade_sum, aten/src/ATen/native/cpu/
# SumKernel.cpp), divided by the row length in fp32, rounded to the dtype. Its fp32 sum of n non-negative
# terms is within gamma(D) = D u / (1 - D u) of the exact sum (u = 2^-24), D the most additions on any path
# from a term to the result. With ILP 4 and no vector lanes (the longest chains; lanes only shorten them),
# each accumulator's size = ceil(n / 4) terms go through the cascade's levels of step = 2^p additions each,
# p = max(4, ceil_log2(size) // 4), three of them carried at most step times and the top one taking at
# most ceil(size / step^3); then the ILP and lane folds, the tails and the threads' partials.
_FP32_MAX = 3.4028234663852886e38


def _sum_depth(n: int) -> int:
    """A bound, with a 3x margin, on the additions along any path of torch's fp32 sum of n terms."""
    import os

    size = max(1, -(-n // 4))
    p = max(4, (size - 1).bit_length() // 4)
    step = 1 << p
    chain = 3 * step + -(-size // step**3) + 32 + (os.cpu_count() or 1)
    return min(n, 3 * chain)


def _gamma(n: int) -> float:
    d = _sum_depth(n) * 2.0**-24
    return d / (1 - d) + 2.0**-30  # + our own fp64 sum's error (blocks of 2^14, then the blocks in order)


def means_of_sums(sums: Sequence[float], n: int, dtype_name: str) -> list[float] | None:
    """torch's ``squares.mean(dim=1)`` (16-bit squares, one row per model) from each row's sum (fp64, of
    the exact terms), where every fp32 sum torch may have formed gives one and the same mean in the dtype;
    None where some row's mean is not determined (then torch computes it). The candidate sums go through
    the ops the reference applies to torch's sum: ``div_(n)`` in fp32, then the cast to the dtype."""
    if dtype_name not in ("bfloat16", "float16"):
        return None
    nf = _f32(float(n))
    gamma = _gamma(n)
    out = []
    for s in sums:
        if not (0.0 <= s and s * (1 + gamma) < _FP32_MAX):  # NaN, Inf, or an fp32 sum that may overflow
            return None
        lo, hi = max(0.0, s * (1 - gamma) - 1e-42), s * (1 + gamma) + 1e-42
        lo32, hi32 = _f32(lo), _f32(hi)  # then the fp32 values at or outside [lo, hi]
        if lo32 > lo:
            lo32 = _next32(lo32, up=False)
        if hi32 < hi:
            hi32 = _next32(hi32, up=True)
        a = _round_to(dtype_name, _div32(lo32, nf))
        b = _round_to(dtype_name, _div32(hi32, nf))
        if _bits32(a) != _bits32(b):  # (-0 and +0 differ too)
            return None
        out.append(a)
    return out


def _torch_row_sum(values: Sequence[float]) -> float:
    """torch's CPU sum of a short contiguous fp32-accumulated row (SumKernel.cpp row_sum): four interleaved
    accumulators over whole groups of four, the rest added to the first, then the four added in order."""
    rows = len(values) // 4
    acc = [0.0] * 4
    for r in range(rows):
        for k in range(4):
            acc[k] = _f32(acc[k] + values[4 * r + k])
    for v in values[4 * rows :]:
        acc[0] = _f32(acc[0] + v)
    s = acc[0]
    for k in range(1, 4):
        s = _f32(s + acc[k])
    return s


def weights(means: Sequence[float], dtype_name: str) -> list[float] | None:
    """The reference's ``total = torch.sum(w).item()`` and ``ones_like(w) / n if abs(total) < 1e-6 else
    w / total`` on the dtype's values ``means``, op for op: the sum as torch's row_sum adds 1 to 7 values
    (8 and more are left to torch: an 8-lane vector build may add them its own way), the divisions in fp32
    (a Python scalar taken as fp32), each rounded to the dtype. None: left to torch."""
    m = len(means)
    if not 1 <= m <= 7 or any(not math.isfinite(v) for v in means):
        return None
    total = _round_to(dtype_name, _torch_row_sum(means))
    if abs(total) < 1e-6:
        return [_round_to(dtype_name, _div32(1.0, float(m)))] * m
    t32 = _f32(total)
    return [_round_to(dtype_name, _div32(v, t32)) for v in means]


def _torch_weights(means_tensor):
    import torch

    w = means_tensor
    total = torch.sum(w).item()
    return torch.ones_like(w) / len(w) if abs(total) < 1e-6 else w / total


# ---------------------------------------------------------------------------- the passes


def run(dtype_name: str, n: int, base: int, models: Sequence[int], out: int, select_topk: float,
        threads: int = 0) -> bool:  # fmt: skip
    """sce on one tensor by address: ``n`` elements of the dtype at ``base`` and each of ``models``, the
    result at ``out``. Returns whether every output element is finite."""
    tag = _native.dtype_tag(dtype_name)
    m = len(models)
    xs = array("Q", models)
    keep = None
    if select_topk < 1:
        keep = array("Q", bytes(8 * ((n + 63) // 64)))
        k = _native.C.sce_select_cpu(tag, n, base, m, xs.buffer_info()[0], float(select_topk),
                                     keep.buffer_info()[0], threads)  # fmt: skip
        if k < 0:
            raise ValueError(f"sce_select_cpu: {n} elements; the kernel takes at most {MAX_NUMEL}")
    kp = keep.buffer_info()[0] if keep is not None else 0
    w = None
    if dtype_name in ("bfloat16", "float16"):
        sums = array("d", [0.0] * m)
        _native.C.sce_squares_cpu(tag, n, m, base, xs.buffer_info()[0], kp, 0, sums.buffer_info()[0], threads)
        means = means_of_sums(list(sums), n, dtype_name)
        w = weights(means, dtype_name) if means is not None else None
        if w is None and means is not None:
            import torch

            w = _torch_weights(torch.tensor(means, dtype=getattr(torch, dtype_name))).tolist()
    if w is None:  # torch's mean of the squares, then its weights
        import torch

        squares = torch.empty((m, n), dtype=getattr(torch, dtype_name))
        _native.C.sce_squares_cpu(tag, n, m, base, xs.buffer_info()[0], kp, squares.data_ptr(), 0, threads)
        w = _torch_weights(squares.mean(dim=1)).tolist()
        del squares
    w64 = array("d", w)
    return bool(_native.C.sce_apply_cpu(tag, n, m, base, xs.buffer_info()[0], kp, w64.buffer_info()[0], out,
                                        threads))  # fmt: skip


# ---------------------------------------------------------------------------- on torch tensors


def native_ready(tensors, backend: str = "auto") -> bool:
    """Whether the kernels serve these tensors (the base first): CPU, one supported dtype, one shape, at
    least one and at most ``max_models`` models, the native module built, ``backend`` auto or cpp."""
    if len(tensors) < 2 or (backend or "auto") not in ("auto", "cpp") or not kernels_built():
        return False
    x0 = tensors[0]
    name = dtypes.of(x0.dtype).name
    return (
        x0.device.type == "cpu"
        and name in DTYPE_NAMES
        and 0 < x0.numel() <= MAX_NUMEL
        and len(tensors) - 1 <= max_models(name)
        and all(x.dtype == x0.dtype and x.device == x0.device and x.shape == x0.shape for x in tensors)
    )


def _contiguous(tensors):
    return [x.contiguous() for x in tensors]


def variance_keep(base, models, density: float, threads: int = 0):
    """Bool tensor of base's shape: the positions mergekit's sce keeps for ``select_topk=density`` < 1."""
    import torch

    base, *models = _contiguous([base, *models])
    n = base.numel()
    words = torch.empty((n + 63) // 64, dtype=torch.uint64)
    xs = array("Q", [x.data_ptr() for x in models])
    tag = _native.dtype_tag(base.dtype)
    _native.C.sce_select_cpu(tag, n, base.data_ptr(), len(models), xs.buffer_info()[0], float(density),
                             words.data_ptr(), threads)  # fmt: skip
    bits = (words.view(torch.uint8).unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1
    return bits.reshape(-1)[:n].bool().reshape(base.shape)


def sce_merge(base, models, select_topk: float, *, out=None, threads: int = 0):
    """mergekit's sce on CPU tensors that ``native_ready`` accepts (the base first)."""
    import torch

    base, *models = _contiguous([base, *models])
    target = out
    if target is None or not (
        target.is_contiguous() and target.dtype == base.dtype and target.shape == base.shape
    ):
        target = torch.empty_like(base)
    run(dtypes.of(base.dtype).name, base.numel(), base.data_ptr(), [x.data_ptr() for x in models],
        target.data_ptr(), select_topk, threads)  # fmt: skip
    if out is not None and target is not out:
        return out.copy_(target)
    return target
