"""SLERP of two same-shaped tensors, with mergekit 0.1.5's semantics, on every backend.

Semantics (the spec is ``slerp_ref``; see also csrc/common/slerp_math.h):
  * the whole tensor is one vector (one angle per tensor); ``t = 0`` gives ``a``, ``t = 1`` gives ``b``;
  * |a|^2, |b|^2 and a.b are summed in fp64; norms at or below ``eps`` count as 1;
    dot = a.b / (|a||b|) clamped to [-1, 1];
  * |dot| > dot_threshold: lerp coefficients (1 - t, t); else theta = acos(dot),
    c_a = sin((1-t) theta) / sin(theta), c_b = sin(t theta) / sin(theta);
  * the coefficients are rounded to the compute dtype (fp32, fp64 for fp64 inputs) and the result
    c_a * a + c_b * b is computed in it, then cast to the input dtype (round to nearest even).
  * NaN or Inf anywhere in ``a`` or ``b``: every output element is NaN (as in mergekit 0.1.5).

mergekit itself normalises chunks in fp32 before the dot; the fp64 sums here agree with it to fp32
rounding and, unlike fp32 sums, do not overflow for bf16/fp32 values up to the dtype's max.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from mergekit_fast import _native, backends
from mergekit_fast.ops import SLERP_SEGMENT_MAX_NUMEL, _verify, check_slerp_t

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_CHUNK = 1 << 20
SEGMENT_MAX_NUMEL = SLERP_SEGMENT_MAX_NUMEL

# Tolerances for verify= and for the tests, in ulps of the output dtype measured against the
# scale |c_a a| + |c_b b| (see _verify). Sources of difference from the reference:
#  * fp64 sums in another order: relative 1e-16, far below an fp32 ulp of the coefficients;
#  * libm/CUDA acos and sin differ by an fp64 ulp, which can move a coefficient by 1 fp32 ulp;
#  * the Triton interpreter truncates bf16 stores instead of rounding: < 1 output ulp (the kernels
#    themselves never contract c_a*a + c_b*b into an FMA: nvcc --fmad=false, Triton fusion disabled);
#  * fp64 outputs also show the conditioning of the coefficients: near dot = -dot_threshold they move
#    by ~1/(1 - dot^2) = 1000 times the relative change of the dot, and fp64 sums added in another
#    order change the dot by a few 2^-53 (measured: C++ vs the reference, 4900 ulps at dot = -0.9995;
#    acos/sin from glibc, CUDA or the Triton series add a few ulps anywhere).
# So 16-bit outputs are within 1 ulp, fp32 within 2 ulps, and fp64 within 2^14 ulps (2^-38) of the scale.
MAX_ULPS = {torch.bfloat16: 1.0, torch.float16: 1.0, torch.float32: 2.0, torch.float64: 16384.0}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def slerp_coefficients(sum_aa: float, sum_bb: float, sum_ab: float, t: float, eps: float = 1e-8,
                       dot_threshold: float = 0.9995) -> tuple[float, float]:  # fmt: skip
    """(c_a, c_b) in fp64, exactly the math of csrc/common/slerp_math.h."""
    na, nb = math.sqrt(sum_aa), math.sqrt(sum_bb)
    na = na if na > eps else 1.0  # `not >` keeps NaN -> 1, as torch.where(norm > eps, norm, 1)
    nb = nb if nb > eps else 1.0
    dot = sum_ab / (na * nb)
    if math.isnan(dot):
        return math.nan, math.nan
    dot = min(1.0, max(-1.0, dot))
    if abs(dot) > dot_threshold:
        return 1.0 - t, t
    theta = math.acos(dot)
    s = math.sin(theta)
    return math.sin((1.0 - t) * theta) / s, math.sin(t * theta) / s


def _sums_ref(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    x, y = a.reshape(-1), b.reshape(-1)
    saa = sbb = sab = 0.0
    for s in range(0, x.numel(), _CHUNK):
        xc = x[s : s + _CHUNK].to(torch.float64)
        yc = y[s : s + _CHUNK].to(torch.float64)
        saa += float(torch.dot(xc, xc))
        sbb += float(torch.dot(yc, yc))
        sab += float(torch.dot(xc, yc))
    return saa, sbb, sab


def _round_to(value: float, dtype: torch.dtype) -> float:
    return float(torch.tensor(value, dtype=torch.float64).to(dtype))


def slerp_ref_coefficients(t: float, a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8,
                           dot_threshold: float = 0.9995) -> tuple[float, float]:  # fmt: skip
    """The coefficients the reference applies, rounded to the compute dtype."""
    ca, cb = slerp_coefficients(*_sums_ref(a, b), float(t), eps, dot_threshold)
    cdt = compute_dtype(a.dtype)
    return _round_to(ca, cdt), _round_to(cb, cdt)


def slerp_ref(t: float, a: torch.Tensor, b: torch.Tensor, *, eps: float = 1e-8,
              dot_threshold: float = 0.9995, out: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """Plain torch SLERP: the oracle for every backend and the fallback on any device."""
    ca, cb = slerp_ref_coefficients(t, a, b, eps, dot_threshold)
    cdt = compute_dtype(a.dtype)
    result = torch.empty_like(a, memory_format=torch.contiguous_format) if out is None else out
    x, y, r = a.reshape(-1), b.reshape(-1), result.view(-1)
    for s in range(0, x.numel(), _CHUNK):
        xc = x[s : s + _CHUNK].to(cdt)
        yc = y[s : s + _CHUNK].to(cdt)
        r[s : s + _CHUNK] = (ca * xc + cb * yc).to(a.dtype)
    return result


# ----------------------------------------------------------------------------- validation


def _check_t(t, where: str = "t") -> float:
    if isinstance(t, torch.Tensor):
        if t.numel() != 1:
            raise ValueError(f"slerp: {where} must be a scalar, got a tensor of shape {tuple(t.shape)}")
        t = t.item()
    return check_slerp_t(t, where)


def _check_pair(a: torch.Tensor, b: torch.Tensor, where: str = "") -> None:
    tag = f" ({where})" if where else ""
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise ValueError(f"slerp{tag}: a and b must be tensors")
    if a.shape != b.shape:
        raise ValueError(f"slerp{tag}: shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise ValueError(f"slerp{tag}: dtypes differ: {a.dtype} vs {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"slerp{tag}: devices differ: {a.device} vs {b.device}")
    if a.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"slerp{tag}: dtype {a.dtype} is not supported (float32, float16, bfloat16, float64)"
        )


def _check_out(out: torch.Tensor, a: torch.Tensor, where: str = "") -> None:
    tag = f" ({where})" if where else ""
    if out.shape != a.shape or out.dtype != a.dtype or out.device != a.device:
        raise ValueError(
            f"slerp{tag}: out must match the inputs (shape {tuple(a.shape)}, {a.dtype}, {a.device}); "
            f"got {tuple(out.shape)}, {out.dtype}, {out.device}"
        )
    if not out.is_contiguous():
        raise ValueError(f"slerp{tag}: out must be contiguous")


# ----------------------------------------------------------------------------- backends


def _run_cpp(ts, As, Bs, outs, eps, thr) -> None:
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, a in enumerate(As):
        by_dtype.setdefault(a.dtype, []).append(i)
    for dtype, idx in by_dtype.items():
        _native.slerp_cpu_many(
            _native.dtype_tag(dtype), [ts[i] for i in idx], [As[i].data_ptr() for i in idx],
            [Bs[i].data_ptr() for i in idx], [outs[i].data_ptr() for i in idx], [As[i].numel() for i in idx],
            eps, thr, torch.get_num_threads(),
        )  # fmt: skip


def _run_cuda(ts, As, Bs, outs, eps, thr) -> None:
    C = _native.C
    device = As[0].device
    stream = torch.cuda.current_stream(device).cuda_stream
    small: dict[torch.dtype, list[int]] = {}
    for i, a in enumerate(As):
        n = a.numel()
        if n <= SEGMENT_MAX_NUMEL:
            small.setdefault(a.dtype, []).append(i)
            continue
        ws = torch.empty(C.slerp_cuda_workspace_bytes(n), dtype=torch.uint8, device=device)
        C.slerp_cuda(_native.dtype_tag(a.dtype), a.data_ptr(), Bs[i].data_ptr(), outs[i].data_ptr(), n,
                     ts[i], eps, thr, ws.data_ptr(), stream)  # fmt: skip
    for dtype, idx in small.items():
        # One pinned table (a, b, out pointers, numels, t as fp64 bits) and one asynchronous copy:
        # no host synchronisation. The caching host allocator keeps the pinned block until the copy ran.
        tvals = torch.tensor([ts[i] for i in idx], dtype=torch.float64).view(torch.int64)
        host = torch.tensor([[As[i].data_ptr(), Bs[i].data_ptr(), outs[i].data_ptr(), As[i].numel()] for i in idx],
                            dtype=torch.int64).t()  # fmt: skip
        host = torch.cat([host, tvals[None]]).contiguous().pin_memory()
        tab = host.to(device, non_blocking=True)
        C.slerp_segments_cuda(_native.dtype_tag(dtype), len(idx), tab[0].data_ptr(), tab[1].data_ptr(),
                              tab[2].data_ptr(), tab[3].data_ptr(), tab[4].data_ptr(), eps, thr, stream)  # fmt: skip
        tab.record_stream(torch.cuda.current_stream(device))  # keep it alive until the kernel has read it


def _run_triton(ts, As, Bs, outs, eps, thr) -> None:
    from mergekit_fast.triton_kernels import slerp as tk

    small = [i for i, a in enumerate(As) if a.numel() <= SEGMENT_MAX_NUMEL]
    for i, a in enumerate(As):
        if a.numel() > SEGMENT_MAX_NUMEL:
            tk.slerp_two_phase(ts[i], a, Bs[i], outs[i], eps, thr)
    if small:
        tk.slerp_segments([ts[i] for i in small], [As[i] for i in small], [Bs[i] for i in small],
                          [outs[i] for i in small], eps, thr)  # fmt: skip


def _run_torch(ts, As, Bs, outs, eps, thr) -> None:
    for t, a, b, o in zip(ts, As, Bs, outs):
        slerp_ref(t, a, b, eps=eps, dot_threshold=thr, out=o)


_RUNNERS = {"cpp": _run_cpp, "cuda": _run_cuda, "triton": _run_triton, "torch": _run_torch}


def _verify_all(backend, ts, As, Bs, outs, eps, thr) -> None:
    for i, (t, a, b, o) in enumerate(zip(ts, As, Bs, outs)):
        ac, bc = a.detach().cpu(), b.detach().cpu()
        ca, cb = slerp_ref_coefficients(t, ac, bc, eps, thr)
        ref = slerp_ref(t, ac, bc, eps=eps, dot_threshold=thr)
        cdt = compute_dtype(a.dtype)
        scale = (abs(ca) * ac.to(cdt).abs() + abs(cb) * bc.to(cdt).abs()) if math.isfinite(ca) else None
        label = f"slerp[{backend}]" + (f" tensor {i}" if len(As) > 1 else "")
        _verify.check(label, o, ref, max_ulps=MAX_ULPS[a.dtype], scale=scale)


def slerp_batched(ts: Sequence[float], As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor], *,
                  eps: float = 1e-8, dot_threshold: float = 0.9995, backend: str = "auto",
                  outs: Sequence[torch.Tensor] | None = None, verify: bool = False) -> list[torch.Tensor]:  # fmt: skip
    """SLERP of many independent tensor pairs, each with its own t, in as few launches as possible.

    All tensors must be on one device. Small tensors (<= SEGMENT_MAX_NUMEL elements) go through
    one segmented kernel per dtype on the GPU backends.
    """
    if not (len(ts) == len(As) == len(Bs)) or (outs is not None and len(outs) != len(As)):
        raise ValueError("slerp_batched: ts, As, Bs (and outs) must have the same length")
    if not As:
        return []
    tvals = [_check_t(t, f"ts[{i}]") for i, t in enumerate(ts)]
    device = As[0].device
    for i, (a, b) in enumerate(zip(As, Bs)):
        _check_pair(a, b, f"pair {i}")
        if a.device != device:
            raise ValueError(f"slerp_batched: pair {i} is on {a.device}, pair 0 on {device}")
    As = [a.contiguous() for a in As]
    Bs = [b.contiguous() for b in Bs]
    if outs is None:
        outs = [torch.empty_like(a) for a in As]
    else:
        for i, (o, a) in enumerate(zip(outs, As)):
            _check_out(o, a, f"pair {i}")
    name = backends.select("slerp", device, backend)
    _RUNNERS[name](tvals, As, Bs, list(outs), float(eps), float(dot_threshold))
    if _verify.verify_enabled(verify):
        _verify_all(name, tvals, As, Bs, outs, eps, dot_threshold)
    return list(outs)


def slerp(t, a: torch.Tensor, b: torch.Tensor, *, eps: float = 1e-8, dot_threshold: float = 0.9995,
          backend: str = "auto", out: torch.Tensor | None = None, verify: bool = False) -> torch.Tensor:  # fmt: skip
    """mergekit 0.1.5's SLERP of two tensors of any shape (whole tensor flattened, one angle).

    Arguments:
        t: interpolation factor in [0, 1]; 0 gives ``a`` (the base model), 1 gives ``b``.
        a, b: same shape, dtype (bf16, fp16, fp32, fp64) and device.
        eps: norms at or below it count as 1.
        dot_threshold: above it (in |cos|) the coefficients are linear, (1 - t, t).
        backend: "auto", "cuda", "triton", "cpp" or "torch" (default from MERGEKIT_FAST_BACKEND).
        out: optional contiguous output of the inputs' shape and dtype.
        verify: recompute with the torch reference on the CPU and raise VerificationError beyond
            the dtype's tolerance (also enabled by MERGEKIT_FAST_VERIFY=1).
    Returns:
        A tensor of ``a``'s shape and dtype.
    """
    _check_pair(a, b)
    outs = None if out is None else [out]
    return slerp_batched([t], [a], [b], eps=eps, dot_threshold=dot_threshold, backend=backend,
                         outs=outs, verify=verify)[0]  # fmt: skip
