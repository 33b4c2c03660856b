"""The gram op (mergekit_fast/ops/gram.py): the C++ kernel against the plain torch reference.

Oracle: ``gram_ref`` (torch, fp64 products, a matmul or a sum per entry). Both add fp64 terms in
different orders, so an entry may differ by the two accumulation errors: each at most
n * 2^-53 * sum_e |term_e| (n terms, unit roundoff 2^-53), hence the bound 2 n 2^-53 sum |terms|
below. With 16-bit inputs every term is exact in fp64 (a product of two 8- or 11-bit significands),
and with small-integer inputs every partial sum is too: those cases are compared bit for bit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import needs_native

from mergekit_fast.ops.gram import gram, gram_many, gram_ref

pytestmark = needs_native
DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]


def _inputs(k, shape, dtype, seed=0, base=True):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(shape, generator=g).to(dtype) for _ in range(k)]
    b = torch.randn(shape, generator=g).to(dtype) if base else None
    return xs, b


def _bound(xs, b, row_len=0):
    """2 n 2^-53 sum |terms| per entry (module docstring)."""
    absx = [(x.double() - b.double()).abs() if b is not None else x.double().abs() for x in xs]
    n = row_len or max(xs[0].numel(), 1)
    return 2 * n * 2.0**-53 * gram_ref(absx, row_len=row_len)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", range(1, 9))
def test_matches_reference_within_the_accumulation_bound(dtype, k):
    xs, b = _inputs(k, (37, 61), dtype, seed=k)
    for base in (None, b):
        for rounding in ("fp64", "input"):
            got = gram(xs, base, rounding=rounding, backend="cpp")
            ref = gram_ref(xs, base, rounding=rounding)
            assert got.shape == (k, k) and got.dtype == torch.float64
            assert torch.equal(got, got.T)
            assert bool(((got - ref).abs() <= _bound(xs, base)).all()), (rounding, base is None)


@pytest.mark.parametrize("n", [1, 7, 8, 9, (1 << 14) - 1, (1 << 14) + 1, (1 << 18) + 3])
def test_odd_sizes(n):
    xs, b = _inputs(3, (n,), torch.bfloat16, seed=n)
    got = gram(xs, b, backend="cpp")
    assert bool(((got - gram_ref(xs, b)).abs() <= _bound(xs, b)).all())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_small_integers_are_exact(dtype):
    # integer values up to 8: every product and partial sum is an integer below 2^24, exact everywhere
    g = torch.Generator().manual_seed(1)
    xs = [torch.randint(-8, 9, (3, 50001), generator=g).to(dtype) for _ in range(4)]
    b = torch.randint(-8, 9, (3, 50001), generator=g).to(dtype)
    for rounding in ("fp64", "input"):
        assert torch.equal(gram(xs, b, rounding=rounding), gram_ref(xs, b, rounding=rounding))
        assert torch.equal(
            gram(xs, rounding=rounding, row_len=50001), gram_ref(xs, rounding=rounding, row_len=50001)
        )


def test_all_equal_inputs():
    x = torch.full((1000, 33), 0.375, dtype=torch.bfloat16)
    g = gram([x, x.clone(), x.clone()])
    assert torch.equal(g, torch.full((3, 3), 33000 * 0.375**2, dtype=torch.float64))
    assert torch.equal(gram([x, x], x), torch.zeros(2, 2, dtype=torch.float64))  # deltas vanish


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rows(dtype):
    xs, b = _inputs(3, (17, 129), dtype, seed=3)
    for rounding in ("fp64", "input"):
        got = gram(xs, b, row_len=129, rounding=rounding)
        ref = gram_ref(xs, b, row_len=129, rounding=rounding)
        assert got.shape == (17, 3, 3)
        assert bool(((got - ref).abs() <= _bound(xs, b, 129)).all())
    # one row is the whole tensor
    assert torch.equal(gram(xs, b, row_len=17 * 129), gram(xs, b)[None])


def test_input_rounding_is_the_sum_torch_takes():
    # the "input" terms are those of torch's (d_i * d_j).sum() and torch.norm(d_i) in the dtype
    xs, b = _inputs(2, (4096,), torch.bfloat16, seed=5)
    d0, d1 = xs[0] - b, xs[1] - b
    g = gram(xs, b, rounding="input")
    assert torch.equal(g[0, 1], (d0 * d1).double().sum())
    assert torch.equal(g[0, 0], d0.double().square().sum())
    # ... and rounded to bf16 they are torch's own bf16 results (fp32 accumulation) here
    assert torch.equal(g[0, 1].to(torch.bfloat16), (d0 * d1).sum())
    assert torch.equal(g[0, 0].sqrt().float().to(torch.bfloat16), torch.norm(d0))


def test_empty_tensors():
    for shape, row_len, want in (((0,), 0, (2, 2)), ((0, 5), 0, (2, 2)), ((0, 5), 5, (0, 2, 2))):
        xs = [torch.empty(shape, dtype=torch.bfloat16) for _ in range(2)]
        got = gram(xs, row_len=row_len)
        assert got.shape == want and not bool(got.any())
        assert gram_ref(xs, row_len=row_len).shape == want


def test_nan_and_inf():
    xs, b = _inputs(3, (5000,), torch.bfloat16, seed=9)
    xs[1][17] = float("nan")
    xs[2][4000] = float("inf")
    got, ref = gram(xs, b), gram_ref(xs, b)
    assert torch.equal(got.isnan(), ref.isnan()) and torch.equal(got.isinf(), ref.isinf())
    fin = got.isfinite()
    assert torch.equal(got[fin], ref[fin]) or bool(((got - ref)[fin].abs() <= _bound(xs, b)[fin]).all())
    assert bool(got[1].isnan().all()) and got[0, 0].isfinite() and got[2, 2] == float("inf")


def test_deterministic_across_thread_counts():
    xs, b = _inputs(3, (5 * (1 << 18) + 11,), torch.bfloat16, seed=2)
    ref = gram(xs, b, threads=1)
    for threads in (2, 3, 7, 16):
        assert torch.equal(gram(xs, b, threads=threads), ref), threads
    rows = gram(xs, b, row_len=(5 * (1 << 18) + 11), threads=1)
    assert torch.equal(rows[0], ref)


@pytest.mark.slow
def test_every_cpu_level_gives_the_same_bits():
    code = (
        "import json, torch; from mergekit_fast.ops.gram import gram; g = torch.Generator().manual_seed(4);"
        "xs = [torch.randn(300001, generator=g).bfloat16() for _ in range(4)];"
        "print(json.dumps([gram(xs[1:], xs[0], rounding=r).flatten().tolist() for r in ('fp64', 'input')]))"
    )
    outs = set()
    for level in ("baseline", "avx2", "avx512"):
        env = {**os.environ, "MERGEKIT_FAST_CPU_ISA": level}
        res = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        outs.add(json.dumps(json.loads(res.stdout.strip().splitlines()[-1])))
    assert len(outs) == 1


def test_many_in_one_call_equal_one_by_one():
    groups, bases = [], []
    for i, n in enumerate((1, 100, 4096, 70000)):
        xs, b = _inputs(2, (n,), torch.bfloat16, seed=i)
        groups.append(xs)
        bases.append(b)
    many = gram_many(groups, bases)
    for xs, b, g in zip(groups, bases, many):
        assert torch.equal(g, gram(xs, b))


def test_more_inputs_than_the_kernel_takes_use_the_reference():
    xs, _ = _inputs(17, (100,), torch.float32, base=False)
    assert torch.equal(gram(xs), gram_ref(xs))


def test_rejects_bad_inputs():
    a = torch.zeros(4, 6)
    with pytest.raises(ValueError, match="input 1"):
        gram([a, torch.zeros(4, 5)])
    with pytest.raises(ValueError, match="input 1"):
        gram([a, a.double()])
    with pytest.raises(ValueError, match="row_len"):
        gram([a], row_len=5)
    with pytest.raises(ValueError, match="rounding"):
        gram([a], rounding="fp32")
    with pytest.raises(ValueError, match="dtype"):
        gram([a.int()])
