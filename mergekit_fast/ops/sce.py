"""sce's native CPU passes (mergekit 0.1.5 merge_methods/sce.py; the math: ``methods/sce.py``).

``sce_merge(base, models, select_topk)`` gives ``methods.sce.Sce.reference``'s bits with three kernels:
``sce_select_cpu`` (csrc/select/select_cpu.cpp: the positions of the top-k variances, as torch.var and
torch.topk pick them), ``sce_squares_cpu`` (the selected deltas squared: their exact per-model sums, from
which the dtype's mean follows wherever torch's fp32 sum cannot round it two ways, ``_means_of_sums``;
elsewhere the squares themselves, whose mean torch takes) and ``sce_apply_cpu`` (the sign consensus and
the weighted mean; both csrc/combine/pointwise_cpu.cpp).
``variance_keep`` is the selection alone, as a bool tensor (the tests compare it with torch.topk's).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergekit_fast import _native

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_NUMEL = (1 << 31) - 1  # positions are 32-bit in the selection kernel


def max_models(dtype) -> int:
    """The most models besides the base the kernels serve: the sums over the models are torch's (model by
    model from +0) up to 8 rows of a 16-bit tensor and 4 of an fp32 one (csrc/combine/combine.h)."""
    return 8 if dtype in (torch.bfloat16, torch.float16) else 4


def native_ready(tensors: Sequence[torch.Tensor], backend: str = "auto") -> bool:
    """Whether the kernels serve these tensors (the base first): CPU, one supported dtype, one shape, at
    least one and at most ``max_models`` models, the native module built, ``backend`` auto or cpp."""
    if len(tensors) < 2 or (backend or "auto") not in ("auto", "cpp") or _native.C is None:
        return False
    if not hasattr(_native.C, "sce_apply_cpu"):
        return False
    x0 = tensors[0]
    return (
        x0.device.type == "cpu"
        and x0.dtype in SUPPORTED_DTYPES
        and 0 < x0.numel() <= MAX_NUMEL
        and len(tensors) - 1 <= max_models(x0.dtype)
        and all(x.dtype == x0.dtype and x.device == x0.device and x.shape == x0.shape for x in tensors)
    )


# The mean of a 16-bit tensor's row on the CPU is torch's fp32 sum (cascade_sum, aten/src/ATen/native/cpu/
# SumKernel.cpp), divided by the row length in fp32, rounded to the dtype. Its fp32 sum of non-negative terms
# is within gamma(D) = D u / (1 - D u) of the exact sum (u = 2^-24), D the most additions on any path from a
# term to the result: four levels of at most 2^7 each, the top level's at most 2^8 more, the lane and ILP
# folds, the threads' partials: under 700 for any row below 2^31 elements. D = 2048 leaves a 3x margin.
_SUM_DEPTH = 2048
_GAMMA = _SUM_DEPTH * 2.0**-24 / (1 - _SUM_DEPTH * 2.0**-24) + 2.0**-30  # + our own fp64 sum's error
_FP32_MAX = 3.4028234663852886e38


def _means_of_sums(sums: Sequence[float], n: int, dtype) -> torch.Tensor | None:
    """torch's ``squares.mean(dim=1)`` (16-bit squares, one row per model) from each row's sum (fp64, of
    the exact terms), where every fp32 sum torch may have formed gives one and the same mean in the dtype;
    None where some row's mean is not determined (then torch computes it). The candidate sums go through
    the ops the reference applies to torch's sum: ``div_(n)`` in fp32, then the cast to the dtype."""
    lo, hi = [], []
    for s in sums:
        if not (0.0 <= s and s * (1 + _GAMMA) < _FP32_MAX):  # NaN, Inf, or an fp32 sum that may overflow
            return None
        lo.append(max(0.0, s * (1 - _GAMMA) - 1e-42))
        hi.append(s * (1 + _GAMMA) + 1e-42)
    lo64, hi64 = torch.tensor(lo, dtype=torch.float64), torch.tensor(hi, dtype=torch.float64)
    lo32, hi32 = lo64.to(torch.float32), hi64.to(torch.float32)
    # the fp32 values at or outside the interval: torch's sum is an fp32 value within it
    lo32 = torch.where(lo32.double() > lo64, torch.nextafter(lo32, torch.tensor(-1.0)), lo32)
    hi32 = torch.where(hi32.double() < hi64, torch.nextafter(hi32, torch.tensor(float("inf"))), hi32)
    a = lo32.clone().div_(n).to(dtype)
    b = hi32.clone().div_(n).to(dtype)
    if not torch.equal(a.view(torch.int16), b.view(torch.int16)):
        return None
    return a


def _addresses(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.tensor([x.data_ptr() for x in tensors], dtype=torch.uint64)


def _select(base: torch.Tensor, models: Sequence[torch.Tensor], density: float, threads: int) -> torch.Tensor:
    """The keep bitmap ((n + 63) // 64 uint64 words, bit j: position j) of the variance selection."""
    n = base.numel()
    bitmap = torch.empty((n + 63) // 64, dtype=torch.uint64)
    xs = _addresses(models)
    k = _native.C.sce_select_cpu(_native.dtype_tag(base.dtype), n, base.data_ptr(), len(models), xs.data_ptr(),
                                 float(density), bitmap.data_ptr(), threads)  # fmt: skip
    if k < 0:
        raise ValueError(f"sce_select_cpu: {n} elements; the kernel takes at most {MAX_NUMEL}")
    return bitmap


def variance_keep(base: torch.Tensor, models: Sequence[torch.Tensor], density: float, threads: int = 0):
    """Bool tensor of base's shape: the positions mergekit's sce keeps for ``select_topk=density`` < 1."""
    base = base.contiguous()
    models = [x.contiguous() for x in models]
    words = _select(base, models, density, threads)
    bits = (words.view(torch.uint8).unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1
    return bits.reshape(-1)[: base.numel()].bool().reshape(base.shape)


def sce_merge(base: torch.Tensor, models: Sequence[torch.Tensor], select_topk: float, *,
              out: torch.Tensor | None = None, threads: int = 0) -> torch.Tensor:  # fmt: skip
    """mergekit's sce on CPU tensors that ``native_ready`` accepts (the base first)."""
    base = base.contiguous()
    models = [x.contiguous() for x in models]
    n, m, tag = base.numel(), len(models), _native.dtype_tag(base.dtype)
    keep = _select(base, models, select_topk, threads) if select_topk < 1 else None
    kp = keep.data_ptr() if keep is not None else 0
    xs = _addresses(models)
    # the reference's weights: per-model mean squares (from the exact sums where they determine torch's
    # value, else torch's own mean of the squares), normalised by their (host) sum, op for op
    w = None
    if base.dtype in (torch.bfloat16, torch.float16):
        sums = torch.zeros(m, dtype=torch.float64)
        _native.C.sce_squares_cpu(tag, n, m, base.data_ptr(), xs.data_ptr(), kp, 0, sums.data_ptr(), threads)
        w = _means_of_sums(sums.tolist(), n, base.dtype)
    if w is None:
        squares = torch.empty((m, n), dtype=base.dtype)
        _native.C.sce_squares_cpu(
            tag, n, m, base.data_ptr(), xs.data_ptr(), kp, squares.data_ptr(), 0, threads
        )
        w = squares.mean(dim=1)
        del squares
    total = torch.sum(w).item()
    w = torch.ones_like(w) / m if abs(total) < 1e-6 else w / total
    w64 = w.to(torch.float64).contiguous()
    target = out
    if target is None or not (
        target.is_contiguous() and target.dtype == base.dtype and target.shape == base.shape
    ):
        target = torch.empty_like(base)
    _native.C.sce_apply_cpu(tag, n, m, base.data_ptr(), xs.data_ptr(), kp, w64.data_ptr(), target.data_ptr(),
                            threads)  # fmt: skip
    if out is not None and target is not out:
        return out.copy_(target)
    return target
