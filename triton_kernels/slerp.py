"""SLERP in Triton, with mergekit 0.1.5's semantics (the spec is mergekit_fast.ops.slerp.slerp_ref).

Math, per tensor flattened to one vector of n elements:
  * S_aa = sum a_i^2, S_bb = sum b_i^2, S_ab = sum a_i b_i, accumulated in fp64 (squares of values
    near the bf16/fp32 max overflow fp32 accumulators);
  * (c_a, c_b) from the three sums in fp64 by the rule of csrc/common/slerp_math.h, then rounded to
    the compute dtype C (fp32; fp64 for fp64 inputs);
  * out_i = c_a a_i + c_b b_i in C with two roundings (every launch passes enable_fp_fusion=False,
    so no FMA contraction), cast to the input dtype (round to nearest even on the GPU).
  A NaN or Inf anywhere makes a sum non-finite, the dot NaN, both coefficients NaN, every output NaN.

Entry points (called by mergekit_fast.ops.slerp._run_triton, which validates the tensors):
  * slerp_two_phase: one large tensor. Kernel 1 reads a and b once and writes fp64 partial sums per
    fixed chunk of _PART elements; kernel 2 (one program) adds the partials in a fixed order and
    computes the coefficients on the device; kernel 3 reads a and b again and writes out.
    Traffic 5n elements, no host synchronisation, bit-reproducible (the partition depends on n only).
  * slerp_segments: many small tensors in one launch per dtype, one program per tensor, over a
    device table of addresses. A tensor of up to _SEG_BLOCK elements is read once and kept in
    registers (3n traffic); longer ones re-read their remaining tiles from L2 (3n DRAM traffic).

Two details make the kernels portable between the GPU and the CPU interpreter (TRITON_INTERPRET=1):
  * Python floats become fp32 kernel arguments, so t, eps and dot_threshold travel as the int64 bit
    patterns of their fp64 values and are bitcast back inside the kernels.
  * acos and sin come from series written with +, -, *, / and sqrt only (libdevice does not exist in
    the interpreter, and tl.math has no acos): the interpreter and the GPU evaluate the same IEEE
    operations in the same order and compute bit-identical coefficients from the same sums. Both
    functions are accurate to a few fp64 ulps (tests/test_slerp.py checks them against libm).

Segment tables hold raw addresses (tensor.data_ptr()) cast to typed pointers in the kernel
(`int64 -> tl.pointer_type`): this works in compiled Triton and in the interpreter alike, needs no
common base tensor, and lets a, b and out live anywhere. The price is that the compiler cannot prove
16-byte alignment of those pointers, so segment loads are not vectorised; for tensors of at most
SEGMENT_MAX_NUMEL elements the launch and the latency dominate, not the instruction count.
"""

from __future__ import annotations

import contextlib
import struct

import torch
import triton
import triton.language as tl

# Elements per program of the partial-sum kernel: _PART_BLOCK per step, _PART_ITERS steps. The
# partition depends on n only, so the fp64 sums are reproducible bit for bit.
_PART_BLOCK = 2048
_PART_ITERS = 8
_PART = _PART_BLOCK * _PART_ITERS
_REDUCE_BLOCK = 1024  # partials added per step by the single-program reduction
_INTERP_BLOCK = 4096  # elements per program of the interpolation kernel
# Elements per tile of the segmented kernel (8 warps, 4 per thread, ~57 registers: several programs
# per SM, as small tensors are latency-bound); the first tile stays in registers.
_SEG_BLOCK = 1024

# pi = _PI_HI + _PI_LO to about 2^-106: reductions by pi keep the full fp64 precision.
_PI_HI = tl.constexpr(3.141592653589793)
_PI_LO = tl.constexpr(1.2246467991473532e-16)
# Series lengths: the first omitted term is below 2^-60 relative on the reduced ranges.
_ASIN_TERMS = tl.constexpr(28)
_SIN_TERMS = tl.constexpr(13)


def _bits(x: float) -> int:
    """The IEEE-754 bit pattern of the fp64 value of x, as a signed int64."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _compute_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
              torch.float64: tl.float64}  # fmt: skip


def _on_device(t: torch.Tensor):
    """Launch on the tensors' GPU (Triton uses torch's current device and stream)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


# ----------------------------------------------------------------------------- fp64 math


@triton.jit
def _f64(x):
    """x (a bit-pattern argument, int32 or int64 by its value) as the fp64 it encodes."""
    return x.to(tl.int64).to(tl.float64, bitcast=True)


@triton.jit
def _asin_reduced(x):
    """asin(x) for |x| <= 0.5, fp64: x * sum_k c_k x^(2k) with c_0 = 1 and
    c_(k+1) / c_k = (2k+1)^2 / ((2k+2)(2k+3)), in Horner form; z = x^2 <= 1/4, so 28 terms leave a
    truncation error below 2^-60 relative. The ratios enter through tl.full(..., tl.float64): a bare
    float literal may be materialised in fp32 before it meets an fp64 operand."""
    z = x * x
    p = z * 0.0 + 1.0
    for k in tl.static_range(_ASIN_TERMS - 1, -1, -1):
        r = tl.full([], ((2 * k + 1) * (2 * k + 1)) / ((2 * k + 2) * (2 * k + 3)), tl.float64)
        p = 1.0 + z * r * p
    return x * p


@triton.jit
def _acos(x):
    """acos(x) for x in [-1, 1], fp64, with Cephes' argument reduction onto |u| <= 0.5:
    x > 1/2: 2 asin(sqrt((1-x)/2)); x < -1/2: pi - 2 asin(sqrt((1+x)/2)); else pi/2 - asin(x).
    1 - |x| is exact there (Sterbenz), and pi enters in two parts. NaN stays NaN."""
    ax = tl.abs(x)
    big = ax > 0.5
    u = tl.where(big, tl.sqrt((1.0 - ax) * 0.5), x)
    s = _asin_reduced(u)
    pi_hi = tl.full([], _PI_HI, tl.float64)
    pi_lo = tl.full([], _PI_LO, tl.float64)
    mid = (pi_hi * 0.5 - s) + pi_lo * 0.5
    neg = (pi_hi - 2.0 * s) + pi_lo
    return tl.where(big, tl.where(x > 0, 2.0 * s, neg), mid)


@triton.jit
def _sin_0_pi(x):
    """sin(x) for x in [0, pi], fp64: reflect onto [0, pi/2] (pi - x is exact for x >= pi/2, pi_lo
    added after), then x (1 - x^2/(2*3) (1 - x^2/(4*5) (1 - ...))), 13 terms (the next one is below
    2^-60 at pi/2); the factors 1/((2k)(2k+1)) as fp64 constants, as in _asin_reduced."""
    pi_hi = tl.full([], _PI_HI, tl.float64)
    pi_lo = tl.full([], _PI_LO, tl.float64)
    r = tl.where(x > pi_hi * 0.5, (pi_hi - x) + pi_lo, x)
    z = r * r
    p = z * 0.0 + 1.0
    for k in tl.static_range(_SIN_TERMS, 0, -1):
        p = 1.0 - z * tl.full([], 1.0 / ((2 * k) * (2 * k + 1)), tl.float64) * p
    return r * p


@triton.jit
def _slerp_coeffs(saa, sbb, sab, t, eps, thr):
    """(c_a, c_b) in fp64 from the fp64 sums: exactly the rule of csrc/common/slerp_math.h.
    Norms at or below eps count as 1 (`not >` keeps NaN -> 1); dot clamped to [-1, 1];
    |dot| > thr: (1 - t, t); else theta = acos(dot), sin((1-t) theta)/sin(theta), sin(t theta)/sin(theta).
    A NaN dot gives NaN coefficients."""
    na = tl.sqrt(saa)
    nb = tl.sqrt(sbb)
    na = tl.where(na > eps, na, 1.0)
    nb = tl.where(nb > eps, nb, 1.0)
    dot = sab / (na * nb)
    dot = tl.where(dot < -1.0, -1.0, tl.where(dot > 1.0, 1.0, dot))
    theta = _acos(dot)
    lerp = tl.abs(dot) > thr
    s = tl.where(lerp, 1.0, _sin_0_pi(theta))  # sin(theta) = 0 only at dot = +-1, always lerp
    ca = tl.where(lerp, 1.0 - t, _sin_0_pi((1.0 - t) * theta) / s)
    cb = tl.where(lerp, t, _sin_0_pi(t * theta) / s)
    is_nan = dot != dot
    return tl.where(is_nan, dot, ca), tl.where(is_nan, dot, cb)


@triton.jit(do_not_specialize=["t_bits", "eps_bits", "thr_bits"])
def _coeffs_kernel(sums_ptr, out_ptr, n, t_bits, eps_bits, thr_bits, BLOCK: tl.constexpr):
    """Test hook: (c_a, c_b) in fp64 for rows (S_aa, S_bb, S_ab) of sums_ptr, BLOCK rows per program,
    with the same code as the SLERP kernels (the helpers are elementwise)."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    saa = tl.load(sums_ptr + 3 * i, mask=m, other=0.0)
    sbb = tl.load(sums_ptr + 3 * i + 1, mask=m, other=0.0)
    sab = tl.load(sums_ptr + 3 * i + 2, mask=m, other=0.0)
    ca, cb = _slerp_coeffs(saa, sbb, sab, _f64(t_bits), _f64(eps_bits), _f64(thr_bits))
    tl.store(out_ptr + 2 * i, ca, mask=m)
    tl.store(out_ptr + 2 * i + 1, cb, mask=m)


def coefficients(sums: torch.Tensor, t: float, eps: float, dot_threshold: float) -> torch.Tensor:
    """(c_a, c_b) in fp64 exactly as the kernels compute them, for each row (S_aa, S_bb, S_ab) of the
    fp64 tensor ``sums`` (shape (rows, 3)); returns shape (rows, 2). For the tests."""
    sums = sums.to(torch.float64).contiguous()
    out = torch.empty(sums.shape[0], 2, dtype=torch.float64, device=sums.device)
    block = 256
    with _on_device(sums):
        _coeffs_kernel[(triton.cdiv(sums.shape[0], block),)](sums, out, sums.shape[0], _bits(t), _bits(eps),
                                                              _bits(dot_threshold), BLOCK=block,
                                                              enable_fp_fusion=False)  # fmt: skip
    return out


# ----------------------------------------------------------------------------- one large tensor


@triton.jit
def _slerp_partials_kernel(a_ptr, b_ptr, ws_ptr, n, n_parts, CDT: tl.constexpr, BLOCK: tl.constexpr,
                           ITERS: tl.constexpr):  # fmt: skip
    """Phase 1: program p sums a_i^2, b_i^2, a_i b_i over i in [p*BLOCK*ITERS, (p+1)*BLOCK*ITERS)
    in fp64 (BLOCK lanes, then one tree sum) and writes the three partials to ws[2 + p],
    ws[2 + n_parts + p], ws[2 + 2 n_parts + p]. Reads 2 elements per i, writes 24 bytes per program."""
    pid = tl.program_id(0)
    start = pid.to(tl.int64) * (BLOCK * ITERS)
    offs = tl.arange(0, BLOCK)
    acc_aa = tl.zeros([BLOCK], tl.float64)
    acc_bb = tl.zeros([BLOCK], tl.float64)
    acc_ab = tl.zeros([BLOCK], tl.float64)
    for it in range(ITERS):
        idx = start + it * BLOCK + offs
        m = idx < n
        x = tl.load(a_ptr + idx, mask=m, other=0.0).to(CDT).to(tl.float64)
        y = tl.load(b_ptr + idx, mask=m, other=0.0).to(CDT).to(tl.float64)
        acc_aa += x * x
        acc_bb += y * y
        acc_ab += x * y
    tl.store(ws_ptr + 2 + pid, tl.sum(acc_aa, axis=0))
    tl.store(ws_ptr + 2 + n_parts + pid, tl.sum(acc_bb, axis=0))
    tl.store(ws_ptr + 2 + 2 * n_parts + pid, tl.sum(acc_ab, axis=0))


@triton.jit(do_not_specialize=["t_bits", "eps_bits", "thr_bits"])
def _slerp_reduce_kernel(ws_ptr, n_parts, t_bits, eps_bits, thr_bits, CDT: tl.constexpr, BLOCK: tl.constexpr):
    """Phase 1b, one program: adds the partials in a fixed order (BLOCK lanes striding over them,
    then one tree sum), computes (c_a, c_b), rounds them to CDT and stores them to ws[0], ws[1]."""
    offs = tl.arange(0, BLOCK)
    acc_aa = tl.zeros([BLOCK], tl.float64)
    acc_bb = tl.zeros([BLOCK], tl.float64)
    acc_ab = tl.zeros([BLOCK], tl.float64)
    for s in range(0, n_parts, BLOCK):
        idx = s + offs
        m = idx < n_parts
        acc_aa += tl.load(ws_ptr + 2 + idx, mask=m, other=0.0)
        acc_bb += tl.load(ws_ptr + 2 + n_parts + idx, mask=m, other=0.0)
        acc_ab += tl.load(ws_ptr + 2 + 2 * n_parts + idx, mask=m, other=0.0)
    ca, cb = _slerp_coeffs(tl.sum(acc_aa, axis=0), tl.sum(acc_bb, axis=0), tl.sum(acc_ab, axis=0),
                           _f64(t_bits), _f64(eps_bits), _f64(thr_bits))  # fmt: skip
    tl.store(ws_ptr, ca.to(CDT).to(tl.float64))
    tl.store(ws_ptr + 1, cb.to(CDT).to(tl.float64))


@triton.jit
def _slerp_interp_kernel(a_ptr, b_ptr, out_ptr, ws_ptr, n, CDT: tl.constexpr, BLOCK: tl.constexpr):
    """Phase 2: out_i = c_a a_i + c_b b_i in CDT (coefficients from ws[0], ws[1]), cast to the
    output dtype. Reads 2 elements and writes 1 per i."""
    ca = tl.load(ws_ptr).to(CDT)
    cb = tl.load(ws_ptr + 1).to(CDT)
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = idx < n
    x = tl.load(a_ptr + idx, mask=m, other=0.0).to(CDT)
    y = tl.load(b_ptr + idx, mask=m, other=0.0).to(CDT)
    r = ca * x + cb * y
    tl.store(out_ptr + idx, r.to(out_ptr.dtype.element_ty), mask=m)


def slerp_two_phase(t: float, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, eps: float,
                    dot_threshold: float) -> None:  # fmt: skip
    """SLERP of one contiguous tensor pair into ``out`` (same shape and dtype, contiguous).

    Three launches on the current stream, 5n elements of traffic, an fp64 workspace of
    2 + 3 * ceil(n / 16384) values; the result does not depend on the device or on timing.
    """
    n = a.numel()
    if n == 0:
        return
    cdt = _compute_dtype(a.dtype)
    n_parts = triton.cdiv(n, _PART)
    ws = torch.empty(2 + 3 * n_parts, dtype=torch.float64, device=a.device)
    with _on_device(a):
        _slerp_partials_kernel[(n_parts,)](a, b, ws, n, n_parts, CDT=cdt, BLOCK=_PART_BLOCK, ITERS=_PART_ITERS,
                                           num_warps=8, enable_fp_fusion=False)  # fmt: skip
        _slerp_reduce_kernel[(1,)](ws, n_parts, _bits(t), _bits(eps), _bits(dot_threshold), CDT=cdt,
                                   BLOCK=_REDUCE_BLOCK, num_warps=4, enable_fp_fusion=False)  # fmt: skip
        _slerp_interp_kernel[(triton.cdiv(n, _INTERP_BLOCK),)](a, b, out, ws, n, CDT=cdt, BLOCK=_INTERP_BLOCK,
                                                               num_warps=8, enable_fp_fusion=False)  # fmt: skip


# ----------------------------------------------------------------------------- many small tensors


@triton.jit(do_not_specialize=["eps_bits", "thr_bits"])
def _slerp_segments_kernel(tab_ptr, count, eps_bits, thr_bits, DTYPE: tl.constexpr, CDT: tl.constexpr,
                           BLOCK: tl.constexpr):  # fmt: skip
    """One program per tensor s. The table holds 5 rows of `count` int64 values: addresses of a, b
    and out, numel, and the bits of t (fp64). Pass 1 sums over BLOCK-element tiles, keeping the
    first tile in registers; pass 2 writes that tile from registers and re-reads the others (from
    L2: they were just read). Traffic 3n for n <= BLOCK, 3n DRAM + 2(n - BLOCK) L2 otherwise."""
    s = tl.program_id(0)
    elem = tl.pointer_type(DTYPE)
    a_ptr = tl.load(tab_ptr + s).to(elem)
    b_ptr = tl.load(tab_ptr + count + s).to(elem)
    out_ptr = tl.load(tab_ptr + 2 * count + s).to(elem)
    n = tl.load(tab_ptr + 3 * count + s)
    t = tl.load(tab_ptr + 4 * count + s).to(tl.float64, bitcast=True)
    offs = tl.arange(0, BLOCK)
    m0 = offs < n
    x0 = tl.load(a_ptr + offs, mask=m0, other=0.0).to(CDT)
    y0 = tl.load(b_ptr + offs, mask=m0, other=0.0).to(CDT)
    xd = x0.to(tl.float64)
    yd = y0.to(tl.float64)
    acc_aa = xd * xd
    acc_bb = yd * yd
    acc_ab = xd * yd
    for start in range(BLOCK, n, BLOCK):
        idx = start + offs
        m = idx < n
        x = tl.load(a_ptr + idx, mask=m, other=0.0).to(CDT).to(tl.float64)
        y = tl.load(b_ptr + idx, mask=m, other=0.0).to(CDT).to(tl.float64)
        acc_aa += x * x
        acc_bb += y * y
        acc_ab += x * y
    ca, cb = _slerp_coeffs(tl.sum(acc_aa, axis=0), tl.sum(acc_bb, axis=0), tl.sum(acc_ab, axis=0), t,
                           _f64(eps_bits), _f64(thr_bits))  # fmt: skip
    ca = ca.to(CDT)
    cb = cb.to(CDT)
    tl.store(out_ptr + offs, (ca * x0 + cb * y0).to(DTYPE), mask=m0)
    for start in range(BLOCK, n, BLOCK):
        idx = start + offs
        m = idx < n
        x = tl.load(a_ptr + idx, mask=m, other=0.0).to(CDT)
        y = tl.load(b_ptr + idx, mask=m, other=0.0).to(CDT)
        tl.store(out_ptr + idx, (ca * x + cb * y).to(DTYPE), mask=m)


def slerp_segments(ts: list[float], As: list[torch.Tensor], Bs: list[torch.Tensor], outs: list[torch.Tensor],
                   eps: float, dot_threshold: float) -> None:  # fmt: skip
    """SLERP of many small contiguous tensor pairs (each its own t) on one device: one launch per dtype.

    The table is built on the host and, for CUDA tensors, copied from pinned memory without
    blocking the host; the caching allocator keeps it alive in stream order.
    """
    groups: dict[torch.dtype, list[int]] = {}
    for i, a in enumerate(As):
        groups.setdefault(a.dtype, []).append(i)
    for dtype, idx in groups.items():
        table = torch.tensor(
            [[As[i].data_ptr() for i in idx], [Bs[i].data_ptr() for i in idx], [outs[i].data_ptr() for i in idx],
             [As[i].numel() for i in idx]], dtype=torch.int64,
        )  # fmt: skip
        tbits = torch.tensor([float(ts[i]) for i in idx], dtype=torch.float64).view(torch.int64)
        table = torch.cat([table.reshape(-1), tbits])
        device = As[idx[0]].device
        if device.type == "cuda":
            table = table.pin_memory().to(device, non_blocking=True)
        with _on_device(As[idx[0]]):
            _slerp_segments_kernel[(len(idx),)](table, len(idx), _bits(eps), _bits(dot_threshold),
                                                DTYPE=_TL_DTYPES[dtype], CDT=_compute_dtype(dtype),
                                                BLOCK=_SEG_BLOCK, num_warps=8, enable_fp_fusion=False)  # fmt: skip
