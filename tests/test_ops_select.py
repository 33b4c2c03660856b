"""The select op's native CPU kernel (csrc/select, ops/select.py) against torch's own sort.

The oracle is what mergekit 0.1.5 calls on the CPU: ``torch.argsort(|delta|.float(), descending=True)[:k]``
(TIES) and ``torch.sort(|delta|.float()).indices[start:stop]`` (breadcrumbs), and mergekit's own
``sparsify.magnitude`` / ``magnitude_outliers`` functions. The kernel's rule plus tie bitmap must keep
exactly the same elements: selection is integer math, so the comparison is exact (no tolerance).
"""

from __future__ import annotations

import ctypes

import pytest
import torch
from helpers import needs_native

from mergekit_fast import _native
from mergekit_fast.methods import _task_arithmetic as ta
from mergekit_fast.ops import select as sel

pytestmark = needs_native

DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def decode(selection, i: int, delta) -> torch.Tensor:
    """The keep mask (flat bool) that combine's ta_rule_keep gives for input i of a selection."""
    keys = ta.sort_keys(delta.abs()).to(torch.int64) & 0xFFFFFFFF
    lo, hi, flags = selection.rules[i]
    n = keys.numel()
    if selection.bitmaps[i]:
        words = (n + 63) // 64
        raw = (ctypes.c_int64 * words).from_address(selection.bitmaps[i])
        bits = torch.tensor(list(raw), dtype=torch.int64)
        idx = torch.arange(n)
        tie = ((bits[idx // 64] >> (idx % 64)) & 1).bool()
    else:
        tie = torch.zeros(n, dtype=torch.bool)
    above = (keys > lo) | ((keys == lo) & (bool(flags & 1) | tie))
    below = (keys < hi) | ((keys == hi) & (bool(flags & 2) | tie))
    return above & below


def native_masks(base, xs, modes, a, b):
    tag = _native.dtype_tag(base.dtype)
    s = sel.ta_select_cpu(tag, base.numel(), base.data_ptr(), [x.data_ptr() for x in xs], modes, a, b, 2)
    return [decode(s, i, (x - base).reshape(-1)) for i, x in enumerate(xs)]


def top_ref(delta, k):
    keep = torch.zeros(delta.numel(), dtype=torch.bool)
    keep[torch.argsort(delta.abs().reshape(-1).float(), descending=True)[:k]] = True
    return keep


def range_ref(delta, start, stop):
    keep = torch.zeros(delta.numel(), dtype=torch.bool)
    keep[torch.sort(delta.abs().reshape(-1).float()).indices[start:stop]] = True
    return keep


def inputs(kind: str, n: int, dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g).to(dtype)
    if kind == "ties":  # few distinct magnitudes: ties straddle almost every cut
        x = base + torch.randint(-3, 4, (n,), generator=g).to(dtype) * 0.125
    elif kind == "equal":  # x == base: every delta is 0
        x = base.clone()
    elif kind == "nonfinite":
        x = (base.float() + 0.01 * torch.randn(n, generator=g)).to(dtype)
        x[:: max(1, n // 5)] = float("nan")
        x[1 :: max(1, n // 3)] = float("inf")
        x[2 :: max(1, n // 4)] = float("-inf")
    else:
        x = (base.float() + 0.01 * torch.randn(n, generator=g)).to(dtype)
    return base, x


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["random", "ties", "equal", "nonfinite"])
@pytest.mark.parametrize("n", [1, 2, 16, 17, 33, 1000, 4099, 70_001])
def test_top_k_equals_torch_argsort(dtype, kind, n):
    base, x = inputs(kind, n, dtype, seed=n)
    delta = x - base
    for k in sorted({1, max(1, n // 7), n // 2, n - 1, n} - {0}):
        (got,) = native_masks(base, [x], [sel.SELECT_TOP], [k], [n])
        assert torch.equal(got, top_ref(delta, k)), (k, int((got != top_ref(delta, k)).sum()))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["random", "ties", "equal", "nonfinite"])
@pytest.mark.parametrize("n", [1, 17, 1000, 70_001])
def test_range_equals_torch_sort(dtype, kind, n):
    base, x = inputs(kind, n, dtype, seed=n + 1)
    delta = x - base
    cuts = [(0, n), (0, n // 2), (n // 3, n), (n // 5, n - n // 7), (n // 2, n // 2), (n - 1, n), (n, n)]
    for start, stop in cuts:
        (got,) = native_masks(base, [x], [sel.SELECT_RANGE], [start], [stop])
        assert torch.equal(got, range_ref(delta, start, stop)), (start, stop)


def test_many_inputs_in_one_call():
    base, x = inputs("ties", 5000, torch.bfloat16, 3)
    _, y = inputs("random", 5000, torch.bfloat16, 4)
    _, z = inputs("ties", 5000, torch.bfloat16, 5)
    got = native_masks(base, [x, y, z], [sel.SELECT_TOP, sel.SELECT_RANGE, sel.SELECT_TOP], [100, 50, 4000],
                       [5000, 4900, 5000])  # fmt: skip
    assert torch.equal(got[0], top_ref(x - base, 100))
    assert torch.equal(got[1], range_ref(y - base, 50, 4900))
    assert torch.equal(got[2], top_ref(z - base, 4000))


def test_bf16_threshold_ties_at_a_large_cut():
    # 2^18 elements (the parallel histogram and pair building) with 7 distinct magnitudes
    base, x = inputs("ties", 1 << 18, torch.bfloat16, 9)
    delta = x - base
    for k in (1 << 10, 100_003, 200_000):
        (got,) = native_masks(base, [x], [sel.SELECT_TOP], [k], [1 << 18])
        assert torch.equal(got, top_ref(delta, k))


@pytest.mark.mergekit
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_mergekit_sparsify_functions_as_oracle(dtype, density):
    """mergekit 0.1.5's own magnitude and magnitude_outliers keep the elements the kernel keeps."""
    from mergekit import sparsify as mk

    base, x = inputs("ties", 3001, dtype, 7)
    delta = x - base
    n = delta.numel()
    k = max(1, int(density * n))
    (got,) = native_masks(base, [x], [sel.SELECT_TOP], [k], [n])
    theirs = mk.magnitude(delta, density=density, rescale_norm=None)
    assert torch.equal(delta * got, theirs)
    target, top = int(density * n), int(0.05 * n)
    bot = max(0, n - target - top)
    start, stop, _ = slice(bot, bot + target).indices(n)
    (got,) = native_masks(base, [x], [sel.SELECT_RANGE], [start], [stop])
    theirs = mk.magnitude_outliers(delta, density=density, rescale_norm=None, gamma=0.05)
    assert torch.equal(delta * got, theirs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_weight_like_deltas_at_scale(dtype):
    """2^22 elements shaped like a fine-tune's deltas (base ~ N(0, 0.02), x - base ~ N(0, 0.002)): the
    16-bit magnitudes tie by the thousand at every cut, so the kernel's block partitions (many full
    blocks per range, the scalar end game, both sides of a two-cut range) decide every kept element."""
    n = 1 << 22
    g = torch.Generator().manual_seed(11)
    base = (torch.randn(n, generator=g) * 0.02).to(dtype)
    x = (base.float() + torch.randn(n, generator=g) * 0.002).to(dtype)
    delta = x - base
    for k in (n // 2, int(0.3 * n)):
        (got,) = native_masks(base, [x], [sel.SELECT_TOP], [k], [n])
        assert torch.equal(got, top_ref(delta, k)), k
    start, stop = n // 10, n // 10 + int(0.8 * n)
    (got,) = native_masks(base, [x], [sel.SELECT_RANGE], [start], [stop])
    assert torch.equal(got, range_ref(delta, start, stop))
