"""The combine op in Triton: task_arithmetic, dare_linear and dare_ties (the task-arithmetic family
without a magnitude selection), with mergekit 0.1.5's rounding, bit for bit.

The spec is csrc/common/ta_math.h (the C++ kernels' element math) and its torch model,
mergekit_fast/methods/_task_arithmetic.merge. Per non-base input i and element j, in fp32 (the
arithmetic torch uses for bf16, fp16 and fp32), every step rounded to the input dtype D where torch
rounds (rD):
  d = rD(x - base); the DARE keep is Philox4x32-10 (common/philox.h: key = the seed, counter =
  (j / 4 as 64 bits, the stream hash of the tensor name and i), word j % 4; keep where
  (word >> 8) < thr); the sparsified delta s = rD(keep ? d : d * 0) times the rescale factor (bf16 and
  fp32; fp16 works in fp32 and rounds once, as mergekit's DARE does); v = rD(s * w); then the sign
  election (by sum or by count), the sums, the normalisation, lambda, and out = rD(base + mixed).

Two kernels: ``_l1_kernel`` (only with a rescale) writes the fp64 L1 norms of each input's deltas,
before and after the mask, per block of L1_BLOCK elements; the host adds them with math.fsum and
rounds the factor as the C++ kernel does (a device-to-host copy of 16 bytes per 4096 elements and
input). ``_combine_kernel`` reads the base and the inputs once and writes the output.

Portability between the GPU and the CPU interpreter (TRITON_INTERPRET=1): bf16 rounding is done on
the fp32 bit pattern (round to nearest even, NaN kept quiet), as the interpreter truncates bf16
casts; values reach bf16 stores already rounded, so the store is exact. Divisions use
``tl.math.div_rn`` (IEEE round to nearest; plain ``/`` is approximate on the GPU). Every launch
passes enable_fp_fusion=False: no FMA contraction. The Philox words are computed per element (four
times the arithmetic of one block per four elements; the GPU has it to spare, memory is the bound).

Not served here (``ops.combine.triton_plan`` says why; the other backends run): magnitude selections
(ties, breadcrumbs: no Triton select yet), DELLA, precise_sparsify, fp64, more than MAX_INPUTS models.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

MAX_INPUTS = 4
L1_BLOCK = 4096  # methods/_task_arithmetic.py L1_BLOCK: the fp64 block sums of an L1 norm
BLOCK = 1024
DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_MASK_ALL, _MASK_ZERO, _MASK_RANDOM = 0, 1, 4  # csrc/common/ta_math.h TaMask
_CONSENSUS = {None: 0, "sum": 1, "count": 2}


@triton.jit
def _rd(x, DT: tl.constexpr):
    """x (fp32) rounded to the dtype DT (0 fp32, 1 fp16, 2 bf16) and back to fp32."""
    if DT == 2:
        u = x.to(tl.uint32, bitcast=True)
        r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
        nan = (u & 0x7FFFFFFF) > 0x7F800000
        r = tl.where(nan, ((u >> 16) | 0x40) << 16, r)
        return r.to(tl.float32, bitcast=True)
    elif DT == 1:
        return x.to(tl.float16).to(tl.float32)
    else:
        return x


@triton.jit
def _keep(offs, hlo, hhi, klo, khi, thr):
    """The DARE keep of elements ``offs``: word offs % 4 of Philox block offs / 4, (word >> 8) < thr."""
    blk = offs // 4
    c0 = (blk & 0xFFFFFFFF).to(tl.uint32)
    c1 = (blk >> 32).to(tl.uint32)
    zero = tl.zeros_like(c0)
    c2 = zero + hlo.to(tl.uint32, bitcast=True)
    c3 = zero + hhi.to(tl.uint32, bitcast=True)
    k0 = klo.to(tl.uint32, bitcast=True)
    k1 = khi.to(tl.uint32, bitcast=True)
    r0, r1, r2, r3 = tl.random.philox_impl(c0, c1, c2, c3, k0, k1, 10)
    q = offs % 4
    w = tl.where(q == 0, r0, tl.where(q == 1, r1, tl.where(q == 2, r2, r3)))
    return (w >> 8) < thr.to(tl.uint32, bitcast=True)


@triton.jit
def _term(x_ptr, b, offs, inb, w, thr, hlo, hhi, klo, khi, f, MASK: tl.constexpr, HAS_F: tl.constexpr,
          WORK_C: tl.constexpr, DT: tl.constexpr):  # fmt: skip
    """v_i = rD(s_i * w_i) of one input (the module docstring)."""
    if MASK == 1:
        v = tl.zeros_like(b)
    else:
        x = tl.load(x_ptr + offs, mask=inb, other=0).to(tl.float32)
        d = _rd(x - b, DT)
        if MASK == 4:
            keep = _keep(offs, hlo, hhi, klo, khi, thr)
            s = tl.where(keep, d, d * 0.0)
            if HAS_F:
                s = s * f
                if not WORK_C:
                    s = _rd(s, DT)
            if WORK_C:
                s = _rd(s, DT)
            d = s
        v = _rd(d * w, DT)
    return v


@triton.jit
def _sign(v):
    return tl.where(v > 0, 1.0, tl.where(v < 0, -1.0, 0.0))


@triton.jit
def _sum(z, a, b, c, d, K: tl.constexpr):
    """z + a + b + c + d over the first K terms, in that order (torch's order for a stack of inputs)."""
    s = z + a
    if K > 1:
        s = s + b
    if K > 2:
        s = s + c
    if K > 3:
        s = s + d
    return s


@triton.jit
def _agreeing(v, w, maj):
    """(v, w) where v's sign is the majority's, else (v * 0, w * 0): the sign election's terms."""
    agree = _sign(v) == maj
    return tl.where(agree, v, v * 0.0), tl.where(agree, w, w * 0.0)


@triton.jit
def _combine_kernel(base_ptr, out_ptr, x0, x1, x2, x3, n,
                    w0, w1, w2, w3, t0, t1, t2, t3, hl0, hh0, hl1, hh1, hl2, hh2, hl3, hh3, klo, khi,
                    f0, f1, f2, f3, lam, wsum_div,
                    K: tl.constexpr, M0: tl.constexpr, M1: tl.constexpr, M2: tl.constexpr, M3: tl.constexpr,
                    F0: tl.constexpr, F1: tl.constexpr, F2: tl.constexpr, F3: tl.constexpr,
                    WORK_C: tl.constexpr, CONSENSUS: tl.constexpr, NORMALIZE: tl.constexpr,
                    SCALE: tl.constexpr, DT: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    inb = offs < n
    b = tl.load(base_ptr + offs, mask=inb, other=0).to(tl.float32)
    v0 = _term(x0, b, offs, inb, w0, t0, hl0, hh0, klo, khi, f0, M0, F0, WORK_C, DT)
    v1 = tl.zeros_like(b)
    v2 = tl.zeros_like(b)
    v3 = tl.zeros_like(b)
    if K > 1:
        v1 = _term(x1, b, offs, inb, w1, t1, hl1, hh1, klo, khi, f1, M1, F1, WORK_C, DT)
    if K > 2:
        v2 = _term(x2, b, offs, inb, w2, t2, hl2, hh2, klo, khi, f2, M2, F2, WORK_C, DT)
    if K > 3:
        v3 = _term(x3, b, offs, inb, w3, t3, hl3, hh3, klo, khi, f3, M3, F3, WORK_C, DT)
    zero = tl.zeros_like(b)
    if CONSENSUS != 0:
        if CONSENSUS == 1:
            vote = _sum(zero, v0, v1, v2, v3, K)
        else:
            vote = _sum(zero, _sign(v0), _sign(v1), _sign(v2), _sign(v3), K)
        maj = tl.where(_rd(vote, DT) >= 0, 1.0, -1.0)
        m0, d0 = _agreeing(v0, zero + w0, maj)
        m1, d1 = _agreeing(v1, zero + w1, maj)
        m2, d2 = _agreeing(v2, zero + w2, maj)
        m3, d3 = _agreeing(v3, zero + w3, maj)
        mixed = _rd(_sum(zero, m0, m1, m2, m3, K), DT)
        div = _rd(_sum(zero, d0, d1, d2, d3, K), DT)
        div = tl.where(div == 0, 1.0, div)
    else:
        mixed = _rd(_sum(zero, v0, v1, v2, v3, K), DT)
        div = zero + wsum_div
    if NORMALIZE:
        mixed = _rd(tl.math.div_rn(mixed, div), DT)
    if SCALE:
        mixed = _rd(mixed * lam, DT)
    r = _rd(b + mixed, DT)
    tl.store(out_ptr + offs, r.to(out_ptr.dtype.element_ty), mask=inb)


@triton.jit
def _l1_kernel(base_ptr, x_ptr, n, before_ptr, after_ptr, hlo, hhi, klo, khi, thr, DT: tl.constexpr,
               BLOCK: tl.constexpr):  # fmt: skip
    """fp64 sums of |d| and of |d| where kept over block program_id(0) of BLOCK elements."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    inb = offs < n
    b = tl.load(base_ptr + offs, mask=inb, other=0).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=inb, other=0).to(tl.float32)
    a = tl.abs(_rd(x - b, DT)).to(tl.float64)
    keep = _keep(offs, hlo, hhi, klo, khi, thr)
    a = tl.where(inb, a, 0.0)
    tl.store(before_ptr + pid, tl.sum(a, axis=0))
    tl.store(after_ptr + pid, tl.sum(tl.where(keep, a, a * 0.0), axis=0))


def _as_i32(u: int) -> int:
    """A 32-bit pattern as the signed int a Triton int32 argument carries."""
    u &= 0xFFFFFFFF
    return u - (1 << 32) if u >= 1 << 31 else u


def rescale_factor(before: float, after: float, dtype: torch.dtype) -> float | None:
    """mergekit's rescale factor ||d||_1 / ||d * keep||_1 rounded as the C++ kernel does (ta_math.h:
    each norm to the work dtype, compared with 1e-7 there, the quotient in fp32 rounded to D for bf16
    and fp32; fp16 works in fp32); None where a norm is below the epsilon (no rescale)."""

    def to_work(v: float) -> float:
        f = torch.tensor(v, dtype=torch.float64).to(torch.float32)
        if dtype == torch.bfloat16:
            f = f.to(torch.bfloat16).to(torch.float32)
        return float(f)

    rb, ra, eps = to_work(before), to_work(after), to_work(1e-7)
    if rb < eps or ra < eps:
        return None
    q = torch.tensor(rb, dtype=torch.float32) / torch.tensor(ra, dtype=torch.float32)
    if dtype == torch.bfloat16:
        q = q.to(torch.bfloat16).to(torch.float32)
    return float(q)


def ta_combine(base: torch.Tensor, others, *, weights, densities, random: bool, consensus, normalize: bool,
               rescale: bool, lam: float, seed: int, hashes, thresholds, out: torch.Tensor) -> None:  # fmt: skip
    """One output tensor (contiguous, one dtype of DTYPES, one device). ``weights`` are already values of
    the dtype; ``thresholds`` and ``hashes`` per input as ops.combine computes them for the C++ kernel."""
    k = len(others)
    n = base.numel()
    if n == 0:
        return
    dt = DTYPES[base.dtype]
    work_c = base.dtype == torch.float16
    masks, factors = [], []
    for i, x in enumerate(others):
        if not random or densities[i] >= 1:
            masks.append(_MASK_ALL)
            factors.append(None)
            continue
        masks.append(_MASK_RANDOM)
        f = None
        if rescale:
            nb = triton.cdiv(n, L1_BLOCK)
            before = torch.empty(nb, dtype=torch.float64, device=base.device)
            after = torch.empty_like(before)
            _l1_kernel[(nb,)](base, x, n, before, after, _as_i32(hashes[i]), _as_i32(hashes[i] >> 32),
                              _as_i32(seed), _as_i32(seed >> 32), _as_i32(thresholds[i]), DT=dt, BLOCK=L1_BLOCK,
                              enable_fp_fusion=False)  # fmt: skip
            f = rescale_factor(math.fsum(before.tolist()), math.fsum(after.tolist()), base.dtype)
        factors.append(f)
    pad = MAX_INPUTS - k
    xs = list(others) + [base] * pad
    ws = [float(w) for w in weights] + [0.0] * pad
    ts = [_as_i32(t) for t in thresholds] + [0] * pad
    hs = [h for i in range(k) for h in (_as_i32(hashes[i]), _as_i32(hashes[i] >> 32))] + [0, 0] * pad
    ms = masks + [_MASK_ZERO] * pad
    fs = [1.0 if f is None else f for f in factors] + [1.0] * pad
    has_f = [f is not None for f in factors] + [False] * pad
    acc = torch.zeros((), dtype=torch.float32)
    for w in weights:
        acc = acc + torch.tensor(float(w), dtype=torch.float32)
    s = float(acc.to(base.dtype).to(torch.float32))
    wsum = 1.0 if abs(s) < 1e-8 else s
    lam32 = float(torch.tensor(float(lam), dtype=torch.float32))
    grid = (triton.cdiv(n, BLOCK),)
    _combine_kernel[grid](base, out, *xs, n, *ws, *ts, *hs, _as_i32(seed), _as_i32(seed >> 32), *fs, lam32, wsum,
                          K=k, M0=ms[0], M1=ms[1], M2=ms[2], M3=ms[3], F0=has_f[0], F1=has_f[1], F2=has_f[2],
                          F3=has_f[3], WORK_C=work_c, CONSENSUS=_CONSENSUS[consensus], NORMALIZE=bool(normalize),
                          SCALE=float(lam) != 1.0, DT=dt, BLOCK=BLOCK, enable_fp_fusion=False)  # fmt: skip
