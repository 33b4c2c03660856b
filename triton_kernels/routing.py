"""Triton kernels of the MoE top-k routing op (mergekit_fast/ops/routing.py is the spec).

``topk_routing``: one program per ROWS tokens, each row held in registers padded with NaN to the
next power of two BLOCK_E (padding never wins). Each expert gets a packed int64 rank key
(order-preserving value bits << 32 | inverted index), so one ``tl.max`` per pass picks the larger
value and, on ties, the lower index; k passes pick the k experts. The arithmetic is the one of
csrc/common/routing_select.h, operation for operation (exp_f32 from basic operations, exact
fixed-point softmax denominator, IEEE division via div_rn, FMA contraction disabled), so the
results are bit-identical to the C++ kernel and the torch reference.

``routing_counts``: per-expert counts and the stable expert-sorted slot order in four small
kernels (chunk ranks and histograms, per-expert scan over chunks, expert offsets, scatter).
"""

from __future__ import annotations

import contextlib

import triton
import triton.language as tl

_LOG2E = tl.constexpr(float.fromhex("0x1.715476p+0"))
_MAGIC = tl.constexpr(12582912.0)
_LN2_HI = tl.constexpr(float.fromhex("0x1.63p-1"))
_LN2_LO = tl.constexpr(float.fromhex("-0x1.bd0106p-13"))
_P0 = tl.constexpr(float.fromhex("0x1.a0d2cep-13"))
_P1 = tl.constexpr(float.fromhex("0x1.6e879cp-10"))
_P2 = tl.constexpr(float.fromhex("0x1.111210p-7"))
_P3 = tl.constexpr(float.fromhex("0x1.555382p-5"))
_P4 = tl.constexpr(float.fromhex("0x1.555554p-3"))
_P5 = tl.constexpr(0.5)
_FIXED_SCALE = tl.constexpr(2.0**40)
_FIXED_INV = tl.constexpr(2.0**-40)
_RENORM_EPS = tl.constexpr(float.fromhex("0x1.79ca1p-67"))
_LOW = tl.constexpr(0xFFFFFFFF)
_HALF = tl.constexpr(0x80000000)
_TAKEN = tl.constexpr(-(2**63))  # below every real packed key (a NaN expert's is -2**63 + low)

COUNT_CHUNK = 128


@triton.jit
def _pow2(n):
    return ((n + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _exp_f32(x):
    nan = x != x
    xc = tl.where(nan, 0.0, x)
    xc = tl.minimum(tl.maximum(xc, -104.0), 89.0)
    n = (xc * _LOG2E + _MAGIC) - _MAGIC
    r = xc - n * _LN2_HI
    r = r - n * _LN2_LO
    z = r * r
    p = r * _P0 + _P1
    p = p * r + _P2
    p = p * r + _P3
    p = p * r + _P4
    p = p * r + _P5
    p = (p * z + r) + 1.0
    ni = n.to(tl.int32)
    n1 = ni >> 1
    n2 = ni - n1
    y = (p * _pow2(n1)) * _pow2(n2)
    y = tl.where(x > 89.0, float("inf"), y)
    y = tl.where(x < -104.0, 0.0, y)
    return tl.where(nan, x, y)


@triton.jit
def _softmax_numerator(x, m):
    d = tl.where(x == m, 0.0, x - m)
    return tl.where(x != x, 0.0, _exp_f32(d))


@triton.jit
def _sigmoid(x):
    s = tl.math.div_rn(tl.zeros_like(x) + 1.0, 1.0 + _exp_f32(-x))
    return tl.where(x != x, 0.0, s)


@triton.jit
def _order_key(v):
    """int64 in [0, 2**32): routing_select.h's order_key (NaN -> 0, -0 -> +0)."""
    v = tl.where(v == 0.0, 0.0, v)
    u = v.to(tl.int32, bitcast=True).to(tl.int64) & _LOW
    key = tl.where(u >= _HALF, u ^ _LOW, u + _HALF)  # u ^ LOW == ~u in 32 bits
    return tl.where(v != v, 0, key)


@triton.jit
def _key_value(key):
    """Inverse of _order_key; key 0 reads as -inf."""
    u = tl.where(key >= _HALF, key - _HALF, key ^ _LOW)
    val = u.to(tl.int32).to(tl.float32, bitcast=True)
    return tl.where(key == 0, float("-inf"), val)


@triton.jit
def _pack(key, index):
    return ((key - _HALF) << 32) | (index.to(tl.int64) ^ _LOW)  # LOW - index


@triton.jit
def _packed_key(packed):
    return (packed >> 32) + _HALF


@triton.jit
def _routing_kernel(
    X, BIAS, W, IDS, T, E, k, num_groups, topk_groups, scaling,
    BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_G: tl.constexpr, ROWS: tl.constexpr,
    SIGMOID: tl.constexpr, RENORM: tl.constexpr, HAS_BIAS: tl.constexpr, GROUPS: tl.constexpr,
    GROUP_TOP2: tl.constexpr, ON_LOGITS: tl.constexpr, SM_STATS: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_E)
    rmask = rows < T
    cmask = cols < E
    ptrs = X + rows[:, None].to(tl.int64) * E + cols[None, :]
    x = tl.load(ptrs, mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
    x = tl.where(cmask[None, :], x, float("nan"))  # padding is invalid
    valid = x == x

    # Softmax statistics: row max of the valid logits, exact fixed-point denominator.
    m = tl.max(tl.where(valid, x, float("-inf")), axis=1)
    z = tl.zeros([ROWS], tl.float32)
    e = tl.zeros([ROWS, BLOCK_E], tl.float32)
    if SM_STATS:
        e = _softmax_numerator(x, m[:, None])
        q = tl.sum((e * _FIXED_SCALE).to(tl.int64), axis=1)
        z = q.to(tl.float32) * _FIXED_INV
    zsafe = tl.where(z > 0.0, z, 1.0)

    # Packed rank keys.
    if ON_LOGITS:
        key = _order_key(x)
    else:
        if SIGMOID:
            s = _sigmoid(x)
        else:
            s = tl.where(z[:, None] > 0.0, tl.math.div_rn(e, zsafe[:, None]), 0.0)
        if HAS_BIAS:
            b = tl.load(BIAS + cols, mask=cmask, other=0.0)
            s = s + b[None, :]
        key = tl.where(valid, _order_key(s), 0)
    packed = _pack(key, cols[None, :])
    packed = tl.where(cmask[None, :], packed, _TAKEN)

    # Group stage: group values from the best (and second-best) member keys, keep topk_groups.
    if GROUPS:
        gsize = E // num_groups
        gid = cols // gsize
        gcols = tl.arange(0, BLOCK_G)
        gval = tl.zeros([ROWS, BLOCK_G], tl.float32)
        for g in range(num_groups):
            ing = (gid == g)[None, :]
            best = tl.max(tl.where(ing, packed, _TAKEN), axis=1)
            val = _key_value(_packed_key(best))
            if GROUP_TOP2:
                second = tl.max(tl.where(ing & (packed != best[:, None]), packed, _TAKEN), axis=1)
                val = val + _key_value(_packed_key(second))
            gval = tl.where(gcols[None, :] == g, val[:, None], gval)
        gpacked = _pack(_order_key(gval), gcols[None, :])
        gpacked = tl.where(gcols[None, :] < num_groups, gpacked, _TAKEN)
        kept = tl.zeros([ROWS, BLOCK_G], tl.int32)
        for _ in range(topk_groups):
            gb = tl.max(gpacked, axis=1)
            ghit = gpacked == gb[:, None]
            kept = tl.where(ghit, 1, kept)
            gpacked = tl.where(ghit, _TAKEN, gpacked)
        keep = tl.zeros([ROWS, BLOCK_E], tl.int32)
        for g in range(num_groups):
            kg = tl.max(tl.where(gcols[None, :] == g, kept, 0), axis=1)
            keep = tl.where((gid == g)[None, :] & (kg[:, None] != 0), 1, keep)
        packed = tl.where(keep != 0, packed, _TAKEN)

    # k passes of argmax.
    kcols = tl.arange(0, BLOCK_K)
    sel_x = tl.zeros([ROWS, BLOCK_K], tl.float32)
    sel_id = tl.zeros([ROWS, BLOCK_K], tl.int32)
    for j in range(k):
        best = tl.max(packed, axis=1)
        idx = ((best & _LOW) ^ _LOW).to(tl.int32)
        hit = cols[None, :] == idx[:, None]
        xj = tl.sum(tl.where(hit, x, 0.0), axis=1)
        packed = tl.where(hit, _TAKEN, packed)
        sel_x = tl.where(kcols[None, :] == j, xj[:, None], sel_x)
        sel_id = tl.where(kcols[None, :] == j, idx[:, None], sel_id)

    # Weights from the chosen logits, in selection order.
    kmask = kcols[None, :] < k
    if SIGMOID:
        t = _sigmoid(sel_x)
    elif RENORM:
        m_sel = tl.max(tl.where((sel_x == sel_x) & kmask, sel_x, float("-inf")), axis=1)
        t = _softmax_numerator(sel_x, m_sel[:, None])
    else:
        t = tl.where(
            z[:, None] > 0.0, tl.math.div_rn(_softmax_numerator(sel_x, m[:, None]), zsafe[:, None]), 0.0
        )
    t = tl.where(kmask, t, 0.0)
    if RENORM:
        den = tl.zeros([ROWS], tl.float32)
        for j in range(k):
            den = den + tl.sum(tl.where(kcols[None, :] == j, t, 0.0), axis=1)
        den = den + _RENORM_EPS
        t = tl.math.div_rn(t, den[:, None])
    w = t * scaling

    out = rows[:, None].to(tl.int64) * k + kcols[None, :]
    omask = rmask[:, None] & kmask
    tl.store(W + out, w, mask=omask)
    tl.store(IDS + out, sel_id, mask=omask)


@contextlib.contextmanager
def _quiet_interpreter(tensor):
    """Under TRITON_INTERPRET (CPU tensors) numpy warns on the inf/NaN the kernel handles."""
    if tensor.is_cuda:
        yield
        return
    import numpy as np

    with np.errstate(all="ignore"):
        yield


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _launch_shape(E: int, k: int, on_gpu: bool) -> tuple[int, int, int]:
    """(BLOCK_E, ROWS, num_warps)."""
    block_e = max(16, _next_pow2(E))
    budget = 2048 if on_gpu else 16384  # elements per program; the interpreter likes fewer programs
    rows = max(1, min(64 if on_gpu else 256, budget // block_e))
    num_warps = 4 if block_e * rows <= 2048 else (8 if block_e * rows <= 8192 else 16)
    return block_e, rows, num_warps


def topk_routing(logits, bias, p, weights, ids) -> None:
    """Route ``logits`` [T, E] (contiguous) into ``weights`` fp32 / ``ids`` int32 [T, k]."""
    T, E, k = p.T, p.E, p.k
    if T == 0:
        return
    block_e, rows, num_warps = _launch_shape(E, k, logits.is_cuda)
    grid = (triton.cdiv(T, rows),)
    with _quiet_interpreter(logits):
        _routing_kernel[grid](
            logits, bias if bias is not None else weights, weights, ids, T, E, k,
            max(p.num_groups, 1), max(p.topk_groups, 1), float(p.scaling),
            BLOCK_E=block_e, BLOCK_K=max(2, _next_pow2(k)), BLOCK_G=max(2, _next_pow2(p.num_groups)), ROWS=rows,
            SIGMOID=p.scoring == "sigmoid", RENORM=p.renormalize, HAS_BIAS=p.has_bias, GROUPS=p.groups_active,
            GROUP_TOP2=p.group_score == "top2_sum", ON_LOGITS=p.select_on_logits, SM_STATS=p.need_softmax_stats,
            num_warps=num_warps, enable_fp_fusion=False,
        )  # fmt: skip


# ----------------------------------------------------------------------------- counts and order


@triton.jit
def _chunk_ranks_kernel(IDS, RANK, HIST, n, E, CHUNK: tl.constexpr):
    """Per chunk: each slot's rank among earlier slots of the chunk with the same expert, and the
    chunk's per-expert counts (written by the last slot of each expert: no atomics)."""
    c = tl.program_id(0)
    i = tl.arange(0, CHUNK)
    offs = c * CHUNK + i
    m = offs < n
    e = tl.load(IDS + offs, mask=m, other=-1)
    same = (e[:, None] == e[None, :]) & m[:, None] & m[None, :]
    before = tl.sum((same & (i[None, :] < i[:, None])).to(tl.int32), axis=1)
    after = tl.sum((same & (i[None, :] > i[:, None])).to(tl.int32), axis=1)
    tl.store(RANK + offs, before, mask=m)
    tl.store(HIST + c.to(tl.int64) * E + e, before + 1, mask=m & (after == 0))


@triton.jit
def _scan_chunks_kernel(HIST, COUNTS, n_chunks, E, BLOCK: tl.constexpr):
    """Per expert: exclusive prefix of the chunk counts (in place) and the total."""
    es = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    em = es < E
    run = tl.zeros([BLOCK], tl.int32)
    for c in range(n_chunks):
        ptr = HIST + c * E + es  # n_chunks * E < 2**31 (checked by the caller)
        h = tl.load(ptr, mask=em, other=0)
        tl.store(ptr, run, mask=em)
        run = run + h
    tl.store(COUNTS + es, run, mask=em)


@triton.jit
def _expert_base_kernel(COUNTS, BASE, E, BLOCK: tl.constexpr):
    """Exclusive cumsum of the counts (one program)."""
    carry = tl.zeros([1], tl.int32)
    for start in range(0, E, BLOCK):
        es = start + tl.arange(0, BLOCK)
        em = es < E
        cnt = tl.load(COUNTS + es, mask=em, other=0)
        inc = tl.cumsum(cnt, axis=0)
        tl.store(BASE + es, carry + inc - cnt, mask=em)
        carry = carry + tl.sum(cnt, axis=0)


@triton.jit
def _scatter_kernel(IDS, RANK, HIST, BASE, ORDER, n, E, CHUNK: tl.constexpr):
    c = tl.program_id(0)
    offs = c * CHUNK + tl.arange(0, CHUNK)
    m = offs < n
    e = tl.load(IDS + offs, mask=m, other=0)
    pos = tl.load(BASE + e, mask=m, other=0) + tl.load(HIST + c.to(tl.int64) * E + e, mask=m, other=0)
    pos = pos + tl.load(RANK + offs, mask=m, other=0)
    tl.store(ORDER + pos, offs, mask=m)


def routing_counts(ids, E: int, counts, order) -> None:
    """counts int32 [E] and order int32 [T*k] (see mergekit_fast/ops/routing.py) of ``ids``."""
    import torch

    n = ids.numel()
    if n == 0:
        counts.zero_()
        return
    n_chunks = triton.cdiv(n, COUNT_CHUNK)
    hist = torch.zeros((n_chunks, E), dtype=torch.int32, device=ids.device)
    rank = torch.empty(n, dtype=torch.int32, device=ids.device)
    base = torch.empty(E, dtype=torch.int32, device=ids.device)
    if n_chunks * E >= 2**31:
        raise ValueError(f"routing_counts: {n} slots x {E} experts is too large for the triton kernel")
    _chunk_ranks_kernel[(n_chunks,)](ids, rank, hist, n, E, CHUNK=COUNT_CHUNK)
    block = min(1024, max(16, _next_pow2(E)))
    _scan_chunks_kernel[(triton.cdiv(E, block),)](hist, counts, n_chunks, E, BLOCK=block)
    _expert_base_kernel[(1,)](counts, base, E, BLOCK=block)
    _scatter_kernel[(n_chunks,)](ids, rank, hist, base, order, n, E, CHUNK=COUNT_CHUNK)
