"""SLERP: the reference against mergekit 0.1.5, every backend against the reference."""

from __future__ import annotations

import math
import random

import pytest
import torch
from helpers import HAS_GPU, runnable_backends

import mergekit_fast as mk
from mergekit_fast.ops import _verify
from mergekit_fast.ops.slerp import (
    MAX_ULPS,
    SEGMENT_MAX_NUMEL,
    slerp_coefficients,
    slerp_ref,
    slerp_ref_coefficients,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _pair(kind: str, shape, dtype):
    a = torch.randn(shape, dtype=torch.float64)
    if kind == "random":
        b = torch.randn(shape, dtype=torch.float64)
    elif kind == "zero":
        a = torch.zeros(shape, dtype=torch.float64)
        b = torch.zeros(shape, dtype=torch.float64)
    elif kind == "one_zero":
        b = torch.zeros(shape, dtype=torch.float64)
    elif kind == "colinear":
        b = 2.5 * a
    elif kind == "antiparallel":
        b = -0.5 * a
    elif kind == "near":  # |dot| just below the threshold: the slerp branch with a small angle
        b = a + 0.05 * torch.randn(shape, dtype=torch.float64)
    else:
        raise AssertionError(kind)
    return a.to(dtype), b.to(dtype)


def _scale(t, a, b):
    ca, cb = slerp_ref_coefficients(t, a, b)
    cdt = torch.float64 if a.dtype == torch.float64 else torch.float32
    return abs(ca) * a.to(cdt).abs() + abs(cb) * b.to(cdt).abs()


# ----------------------------------------------------------------------------- reference vs mergekit


@pytest.mark.mergekit
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["random", "zero", "one_zero", "colinear", "antiparallel", "near"])
@pytest.mark.parametrize("t", [0.0, 0.3, 1.0, 1.5, -0.25])  # t outside [0, 1] extrapolates, as in mergekit
def test_reference_matches_mergekit(dtype, kind, t):
    from mergekit.merge_methods.slerp import slerp as mergekit_slerp

    a, b = _pair(kind, (67, 129), dtype)
    # mergekit's BatchParameter coefficients are fp32, fp64 for fp64 inputs.
    tt = torch.tensor([t], dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    theirs = mergekit_slerp(tt, a[None], b[None])[0]
    ours = slerp_ref(t, a, b)
    assert ours.dtype == theirs.dtype == dtype and ours.shape == theirs.shape
    if dtype in (torch.float32, torch.float64):
        # mergekit sums normalised fp32 chunks, we sum fp64: the coefficients agree to ~1e-7
        # relative, so elements agree to 1e-6 of the terms' magnitude.
        scale = _scale(t, a, b).to(torch.float64) + 1e-30
        rel = ((ours.double() - theirs.double()).abs() / scale).max().item()
        assert rel <= 1e-6, rel
    else:
        # 16-bit outputs: a coefficient 1 fp32 ulp apart flips the rounding of a few elements.
        _, max_ulp, _ = _verify.max_errors(ours, theirs, _scale(t, a, b))
        assert max_ulp <= 1.0
        frac = (ours != theirs).float().mean().item()
        assert frac <= 1e-3, frac


def test_reference_endpoints_and_semantics():
    a, b = torch.randn(5, 7), torch.randn(5, 7)
    assert torch.equal(slerp_ref(0.0, a, b), a)
    assert torch.equal(slerp_ref(1.0, a, b), b)
    # Whole-tensor angle: orthogonal unit vectors, t = 0.5 -> both coefficients sin(pi/4)/1.
    x = torch.tensor([1.0, 0.0])
    y = torch.tensor([0.0, 1.0])
    out = slerp_ref(0.5, x, y)
    assert torch.allclose(out, torch.tensor([math.sqrt(0.5)] * 2))
    # Colinear -> lerp on the unnormalised inputs.
    assert torch.allclose(slerp_ref(0.25, x, 3 * x), torch.tensor([1.5, 0.0]))


# ----------------------------------------------------------------------------- backends vs reference

SHAPES = [(1,), (7,), (13, 17), (3, 5, 7), (SEGMENT_MAX_NUMEL + 1,), (1 << 16, 3), (4099, 65)]


def _check_backend(backend, t, a, b):
    out = mk.slerp(t, a, b, backend=backend)
    ref = slerp_ref(t, a.cpu(), b.cpu())
    assert out.dtype == a.dtype and out.shape == a.shape and out.device == a.device
    _verify.check(
        f"slerp[{backend}]", out.cpu(), ref, max_ulps=MAX_ULPS[a.dtype], scale=_scale(t, a.cpu(), b.cpu())
    )


# CPU backends: triton runs under the interpreter (tests/conftest.py sets TRITON_INTERPRET=1 when no
# GPU is visible); all of SHAPES take about 6 s there.
CPU_BACKENDS = ("cpp", "torch", "triton")


@pytest.mark.parametrize("backend", runnable_backends("cpu", CPU_BACKENDS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_cpu_backends(backend, dtype, shape):
    a, b = _pair("random", shape, dtype)
    _check_backend(backend, 0.37, a, b)


@pytest.mark.parametrize("backend", runnable_backends("cpu", ("cpp",)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpp_is_bit_exact_with_reference(backend, dtype):
    # Same fp64 sums (up to order), same coefficient rounding, no FMA contraction (-ffp-contract=off):
    # the C++ kernel reproduces the reference bit for bit.
    a, b = _pair("random", (1000, 333), dtype)
    assert torch.equal(mk.slerp(0.6, a, b, backend=backend), slerp_ref(0.6, a, b))


@pytest.mark.parametrize("backend", runnable_backends("cpu", CPU_BACKENDS))
@pytest.mark.parametrize("t", [1.5, -0.25, 3.0])
def test_extrapolation_on_every_backend(backend, t):
    a, b = _pair("random", (4099, 65), torch.bfloat16)
    _check_backend(backend, t, a, b)
    a, b = _pair("colinear", (31, 9), torch.float32)  # the lerp branch: (1 - t, t)
    _check_backend(backend, t, a, b)


@pytest.mark.parametrize("backend", runnable_backends("cpu", CPU_BACKENDS))
@pytest.mark.parametrize("kind", ["zero", "one_zero", "colinear", "antiparallel", "near"])
def test_special_pairs(backend, kind):
    a, b = _pair(kind, (31, 9), torch.bfloat16)
    _check_backend(backend, 0.3, a, b)


@pytest.mark.parametrize("backend", runnable_backends("cpu", CPU_BACKENDS))
def test_batched_many_segments(backend):
    sizes = [1, 2, 17, 64, 1000, 4097, SEGMENT_MAX_NUMEL, SEGMENT_MAX_NUMEL + 3, 300_000] + [5] * 40
    dtypes = [torch.bfloat16, torch.float32]
    ts = [(i % 11) / 10 for i in range(len(sizes))]
    As, Bs = [], []
    for i, n in enumerate(sizes):
        a, b = _pair("random", (n,), dtypes[i % 2])
        As.append(a)
        Bs.append(b)
    outs = mk.slerp_batched(ts, As, Bs, backend=backend)
    for t, a, b, o in zip(ts, As, Bs, outs):
        _verify.check("batched", o, slerp_ref(t, a, b), max_ulps=MAX_ULPS[a.dtype], scale=_scale(t, a, b))


@pytest.mark.parametrize("backend", runnable_backends("cpu", CPU_BACKENDS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_large_finite_values_do_not_overflow(backend, dtype):
    # Squares of values near the dtype's max overflow fp32 accumulators; fp64 sums must not.
    big = torch.finfo(dtype).max
    a = torch.full((1000,), big, dtype=dtype)
    a[::2] = -big
    b = torch.randn(1000, dtype=torch.float64).to(dtype) * (big / 8)
    out = mk.slerp(0.5, a, b, backend=backend)
    assert torch.isfinite(out).all()
    ca, cb = slerp_ref_coefficients(0.5, a, b)
    assert math.isfinite(ca) and 0.4 < ca < 0.8 and 0.4 < cb < 0.8


@pytest.mark.parametrize("backend", runnable_backends("cpu", CPU_BACKENDS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_make_all_nan(backend, bad):
    # Documented: NaN or Inf anywhere in a or b -> every output element is NaN (mergekit agrees).
    a, b = torch.randn(100), torch.randn(100)
    a[37] = bad
    out = mk.slerp(0.5, a, b, backend=backend)
    assert torch.isnan(out).all()
    out = mk.slerp(0.5, b, a, backend=backend)
    assert torch.isnan(out).all()


def _backend_device_params(cpu=CPU_BACKENDS, gpu=("cuda", "triton")):
    """(backend, device) pytest params over both devices, skipped where a backend cannot run."""
    params = []
    for device, names in (("cpu", cpu), ("cuda", gpu)):
        for p in runnable_backends(device, names):
            params.append(pytest.param(p.values[0], device, marks=p.marks, id=p.id))
    return params


# Sizes that go through the two-phase kernels (> SEGMENT_MAX_NUMEL): just past the limit, and
# several 16384-element chunks plus a ragged tail.
TWO_PHASE_SIZES = [SEGMENT_MAX_NUMEL + 1, 3 * 16384 + 5]


@pytest.mark.parametrize("backend, device", _backend_device_params())
def test_views_at_odd_offsets_and_no_out_of_bounds_writes(backend, device):
    # Every pair is a slice of a larger buffer at an offset of 0..4 elements, so a, b and out are
    # aligned, misaligned by the same amount (vectorised after a scalar head on CUDA) or by different
    # amounts (scalar); the output buffers are filled with a sentinel that must survive around each
    # slice. Sizes straddle vector widths, the 1024-element tiles and the two-phase limit; dtypes,
    # special pairs and t vary per tensor, all in one batched call.
    sizes = [1, 2, 3, 7, 8, 9, 15, 16, 17, 255, 1023, 1024, 1025, 2049, 4096, 8193, 12345,
             SEGMENT_MAX_NUMEL, *TWO_PHASE_SIZES]  # fmt: skip
    kinds = ["random", "zero", "one_zero", "colinear", "antiparallel", "near"]
    sentinel = 7.0
    ts, As, Bs, outs, bufs, cpu_pairs = [], [], [], [], [], []
    for i, n in enumerate(sizes):
        dtype = DTYPES[i % len(DTYPES)]
        a, b = _pair(kinds[i % len(kinds)] if n < SEGMENT_MAX_NUMEL else "random", (n,), dtype)
        offs = (i % 5, (i + i // 5) % 5, (i * 3) % 5)
        abuf = torch.zeros(n + 8, dtype=dtype, device=device)
        bbuf = torch.zeros(n + 8, dtype=dtype, device=device)
        obuf = torch.full((n + 8,), sentinel, dtype=dtype, device=device)
        abuf[offs[0] : offs[0] + n] = a.to(device)
        bbuf[offs[1] : offs[1] + n] = b.to(device)
        As.append(abuf[offs[0] : offs[0] + n])
        Bs.append(bbuf[offs[1] : offs[1] + n])
        outs.append(obuf[offs[2] : offs[2] + n])
        bufs.append((obuf, offs[2], n))
        ts.append([0.0, 1.0, 0.37, 0.5, 0.9][i % 5])
        cpu_pairs.append((a, b))
    mk.slerp_batched(ts, As, Bs, outs=outs, backend=backend)
    for t, (a, b), o, (obuf, off, n) in zip(ts, cpu_pairs, outs, bufs):
        label = f"slerp[{backend}] n={n} {a.dtype} offset {off}"
        _verify.check(label, o.cpu(), slerp_ref(t, a, b), max_ulps=MAX_ULPS[a.dtype], scale=_scale(t, a, b))
        around = torch.cat([obuf[:off], obuf[off + n :]]).cpu().double()
        assert (around == sentinel).all(), f"{label}: wrote outside its slice"


@pytest.mark.parametrize("backend, device", _backend_device_params(cpu=("cpp", "triton")))
def test_two_phase_is_reproducible(backend, device):
    # Fixed partition and fixed-order reduction: the same inputs at other addresses, and repeated
    # calls, give bit-identical results (a wrong or racy reduction would also fail the tolerance).
    n = TWO_PHASE_SIZES[1]
    a = torch.randn(n, device=device)
    b = torch.randn(n, device=device) + 0.3 * a
    first = mk.slerp(0.3, a, b, backend=backend)
    assert torch.equal(first, mk.slerp(0.3, a, b, backend=backend))
    assert torch.equal(first, mk.slerp(0.3, a.clone(), b.clone(), backend=backend))
    _check_backend(backend, 0.3, a, b)


@pytest.mark.parametrize("backend, device", _backend_device_params())
@pytest.mark.parametrize("n", TWO_PHASE_SIZES)
def test_two_phase_huge_values_and_non_finite(backend, device, n):
    # The two-phase kernels' fp64 sums must not overflow for bf16 values near the dtype's max, and
    # a NaN or Inf anywhere (here in the last chunk or the very first element) poisons every output.
    big = torch.finfo(torch.bfloat16).max
    a = torch.full((n,), big, dtype=torch.bfloat16)
    a[::2] = -big
    # |b| <= max / 4, so |c_a a + c_b b| stays below the max (c_a, c_b ~ 0.7 here).
    b = (torch.randn(n, dtype=torch.float64).clamp(-3, 3) * (big / 12)).to(torch.bfloat16)
    out = mk.slerp(0.5, a.to(device), b.to(device), backend=backend).cpu()
    assert torch.isfinite(out).all()
    _verify.check("huge", out, slerp_ref(0.5, a, b), max_ulps=MAX_ULPS[a.dtype], scale=_scale(0.5, a, b))
    x, y = torch.randn(n, device=device), torch.randn(n, device=device)
    for where, bad in ((n - 1, float("nan")), (0, float("inf"))):
        xb = x.clone()
        xb[where] = bad
        assert torch.isnan(mk.slerp(0.5, xb, y, backend=backend)).all()
        assert torch.isnan(mk.slerp(0.5, y, xb, backend=backend)).all()


TRITON_DEVICES = [
    pytest.param(d, marks=p.marks, id=p.id)
    for d in ("cpu", "cuda")
    for p in runnable_backends(d, ("triton",))
]


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_coefficients_match_libm(device):
    # The Triton kernels compute acos and sin with their own fp64 series (no libdevice in the
    # interpreter); compare their coefficients with the reference's (libm) on exact sums.
    # Bound: 8 fp64 ulps, times 1/sin(theta) where theta = acos(dot) is ill-conditioned (dot near -1:
    # one ulp of theta near pi moves sin(theta) by ulp/sin(theta)). The lerp branch is exact.
    from mergekit_fast.triton_kernels import slerp as tk

    thr = 0.9995
    rng = random.Random(0)
    specials = [1.0, -1.0, 0.0, 0.5, -0.5, thr, -thr, math.nextafter(thr, 0), math.nextafter(-thr, 0),
                math.nextafter(thr, 2), math.nextafter(0.5, 1), math.nextafter(-0.5, -1), 1.5, -3.0]  # fmt: skip
    rows = [(1.0, 1.0, d) for d in [rng.uniform(-1, 1) for _ in range(3000)] + specials]
    rows += [(4.0, 9.0, 6.0 * rng.uniform(-1, 1)) for _ in range(200)]  # norms 2 and 3
    rows += [(0.0, 0.0, 0.0), (0.0, 4.0, 0.0), (1e-17, 1.0, 1e-9), (1e-300, 1e-300, 1e-300)]  # norms <= eps
    rows += [(math.nan, 1.0, 0.0), (math.inf, 1.0, 1.0), (1.0, 1.0, math.nan), (math.inf, math.inf, math.inf)]
    sums = torch.tensor(rows, dtype=torch.float64, device=device)
    for t in (0.0, 0.3, 0.37, 0.9, 1.0):
        got = tk.coefficients(sums, t, 1e-8, thr).cpu().tolist()
        same32 = 0
        for (saa, sbb, sab), (ca, cb) in zip(rows, got):
            ra, rb = slerp_coefficients(saa, sbb, sab, t, 1e-8, thr)
            if math.isnan(ra):
                assert math.isnan(ca) and math.isnan(cb), (saa, sbb, sab, t)
                continue
            na = math.sqrt(saa) if math.sqrt(saa) > 1e-8 else 1.0
            nb = math.sqrt(sbb) if math.sqrt(sbb) > 1e-8 else 1.0
            dot = min(1.0, max(-1.0, sab / (na * nb)))
            if abs(dot) > thr:
                assert (ca, cb) == (ra, rb) == (1.0 - t, t)
                continue
            bound = 8 * 2.0**-52 / math.sqrt(1.0 - dot * dot)
            for g, r in ((ca, ra), (cb, rb)):
                assert abs(g - r) <= bound * abs(r) + 1e-300, (saa, sbb, sab, t, g, r)
            f32 = torch.tensor([ca, cb, ra, rb], dtype=torch.float64).float()
            same32 += int(torch.equal(f32[:2], f32[2:]))
            _, ulp32, _ = _verify.max_errors(f32[:2], f32[2:])
            assert ulp32 <= 1.0
        # Rounded to fp32 (what the kernels apply), the coefficients almost always agree exactly.
        assert same32 >= 0.999 * (len(rows) - 12), same32


def test_out_and_verify():
    a, b = torch.randn(100, 3, dtype=torch.bfloat16), torch.randn(100, 3, dtype=torch.bfloat16)
    out = torch.empty_like(a)
    res = mk.slerp(0.2, a, b, out=out, verify=True)
    assert res is out
    assert torch.equal(out, slerp_ref(0.2, a, b))


def test_verify_catches_a_wrong_result(monkeypatch):
    from mergekit_fast.ops import slerp as slerp_mod

    def broken(ts, As, Bs, outs, eps, thr):
        for o, a in zip(outs, As):
            o.copy_(a)

    monkeypatch.setitem(slerp_mod._RUNNERS, "torch", broken)
    a, b = torch.randn(64), torch.randn(64)
    with pytest.raises(mk.VerificationError, match="max ulp error"):
        mk.slerp(0.5, a, b, backend="torch", verify=True)


def test_non_contiguous_inputs():
    a = torch.randn(40, 30).t()
    b = torch.randn(40, 30).t()
    out = mk.slerp(0.4, a, b)
    assert torch.equal(out, slerp_ref(0.4, a.contiguous(), b.contiguous()))
    assert out.shape == (30, 40)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: (0.5, torch.randn(3), torch.randn(4)), "shapes differ"),
        (lambda: (0.5, torch.randn(3), torch.randn(3).double()), "dtypes differ"),
        (lambda: (0.5, torch.ones(3, dtype=torch.int32), torch.ones(3, dtype=torch.int32)), "not supported"),
        (lambda: ("x", torch.randn(3), torch.randn(3)), "must be a number"),
    ],
)
def test_bad_input(make, match):
    with pytest.raises(ValueError, match=match):
        mk.slerp(*make())


def test_explicit_unavailable_backend_raises():
    if HAS_GPU:
        pytest.skip("cuda is available here")
    with pytest.raises(mk.BackendUnavailable, match="cuda"):
        mk.slerp(0.5, torch.randn(3), torch.randn(3), backend="cuda")


def test_env_backend(monkeypatch):
    monkeypatch.setenv("MERGEKIT_FAST_BACKEND", "torch")
    from mergekit_fast import backends

    assert backends.select("slerp", torch.device("cpu"), None) == "torch"
    monkeypatch.setenv("MERGEKIT_FAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="MERGEKIT_FAST_BACKEND"):
        backends.select("slerp", torch.device("cpu"), None)


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("backend", runnable_backends("cuda", ("cuda", "triton")))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES + [(4096, 4096)], ids=str)
def test_gpu_backends(backend, dtype, shape):
    a, b = _pair("random", shape, dtype)
    _check_backend(backend, 0.37, a.cuda(), b.cuda())


@pytest.mark.gpu
@pytest.mark.parametrize("backend", runnable_backends("cuda", ("cuda", "triton")))
def test_gpu_batched_and_special(backend):
    sizes = [1, 17, 1000, SEGMENT_MAX_NUMEL, SEGMENT_MAX_NUMEL + 3, 300_000] + [5] * 300
    ts = [(i % 11) / 10 for i in range(len(sizes))]
    pairs = [
        _pair(["random", "zero", "colinear", "antiparallel"][i % 4], (n,), torch.bfloat16)
        for i, n in enumerate(sizes)
    ]
    As = [a.cuda() for a, _ in pairs]
    Bs = [b.cuda() for _, b in pairs]
    outs = mk.slerp_batched(ts, As, Bs, backend=backend)
    for t, (a, b), o in zip(ts, pairs, outs):
        _verify.check("gpu batched", o.cpu(), slerp_ref(t, a, b), max_ulps=1.0, scale=_scale(t, a, b))
    a = torch.full((5000,), torch.finfo(torch.bfloat16).max, dtype=torch.bfloat16, device="cuda")
    assert torch.isfinite(mk.slerp(0.5, a, -a * 0.5, backend=backend)).all()
    a = torch.randn(70000, device="cuda")
    a[123] = float("nan")
    assert torch.isnan(mk.slerp(0.5, a, torch.randn_like(a), backend=backend)).all()
