"""sce's native CPU passes (mergekit_fast/ops/sce.py: csrc/select sce_select_cpu, csrc/combine sce_squares_cpu
and sce_apply_cpu) against the torch reference (methods/sce.py, mergekit 0.1.5's ops in its dtypes;
tests/test_methods_other.py checks that against mergekit itself).

Criterion: the same bits, NaN for NaN, the sign of zero included, and the same selected positions as
torch.var + torch.topk. The selection has no tolerance to give: equal variances straddle the k-th on
nearly every 16-bit tensor, and which of them torch.topk keeps is libstdc++'s nth_element's (or
partial_sort's) choice, which the kernel reproduces move for move. The inputs below are built so that
the variances tie in large groups (deltas on a coarse grid), and in every order the sort's corners
care about.
"""

from __future__ import annotations

import pytest
import torch
from helpers import needs_native
from test_methods_pointwise import same_bits

from mergekit_fast.methods.base import Context
from mergekit_fast.methods.sce import METHOD as SCE
from mergekit_fast.methods.sce import _variance_mask
from mergekit_fast.ops import sce as ops

pytestmark = needs_native
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _grid_inputs(m: int, n: int, dtype, seed: int, levels: int = 5, specials: bool = False):
    """The base and m models whose deltas take ``levels`` values (multiples of 2^-6): the variances fall
    into a few large tie groups. With ``specials``, NaN, +-Inf and signed zeros here and there."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(n, generator=g) * 0.5).to(dtype)
    xs = [(base.float() + torch.randint(-levels // 2, levels - levels // 2, (n,), generator=g) / 64).to(dtype)
          for _ in range(m)]  # fmt: skip
    out = [base, *xs]
    if specials and n >= 16:
        values = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0]
        for j in range(min(30, n)):
            q = int(torch.randint(0, m + 1, (1,), generator=g))
            pos = int(torch.randint(0, n, (1,), generator=g))
            out[q][pos] = values[j % len(values)]
    return out


def _patterned(m: int, n: int, dtype, pattern: str):
    """Inputs whose variance keys come in the orders the partition's corners care about."""
    i = torch.arange(n)
    if pattern == "sorted":
        v = i * 4 // max(n, 1)
    elif pattern == "reversed":
        v = (n - 1 - i) * 4 // max(n, 1)
    elif pattern == "organ":
        v = torch.minimum(i, n - 1 - i) * 8 // max(n, 1)
    elif pattern == "mod3":
        v = i % 3
    elif pattern == "equal":
        v = torch.zeros(n, dtype=torch.long)
    else:
        raise ValueError(pattern)
    base = torch.zeros(n, dtype=dtype)
    xs = [(v.float() / 16 * (q + 1) / m).to(dtype) for q in range(m)]
    return [base, *xs]


def _keep_ref(inputs, density: float):
    base, models = inputs[0], inputs[1:]
    deltas = torch.stack([x - base for x in models])
    return _variance_mask(deltas, density, torch.bool)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("density", [0.1, 0.5, 0.9, 0.01, 1e-9, 0.0])
def test_selection_is_torch_topk(dtype, m, density):
    for n, seed, specials in [(1, 0, False), (7, 1, False), (1000, 2, True), (20011, 3, True)]:
        ins = _grid_inputs(m, n, dtype, seed=seed + 10 * m, specials=specials)
        want = _keep_ref(ins, density)
        got = ops.variance_keep(ins[0], ins[1:], density)
        assert torch.equal(got, want), (n, seed)


@pytest.mark.parametrize("pattern", ["sorted", "reversed", "organ", "mod3", "equal"])
@pytest.mark.parametrize("density", [0.3, 0.005])
def test_selection_on_ordered_keys(pattern, density):
    for n in (5, 64, 4099, 1 << 17):
        ins = _patterned(2, n, torch.bfloat16, pattern)
        assert torch.equal(ops.variance_keep(ins[0], ins[1:], density), _keep_ref(ins, density)), n


def test_selection_large_ties():
    # 2^21 positions, 3 tie groups of variance: the block-partitioned nth_element at its full block size
    ins = _grid_inputs(2, 1 << 21, torch.bfloat16, seed=5, levels=3)
    for density in (0.2, 0.7):
        assert torch.equal(ops.variance_keep(ins[0], ins[1:], density), _keep_ref(ins, density))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("topk", [1.0, 0.3, 0.0])
def test_merge_matches_reference(dtype, m, topk):
    if m > ops.max_models(str(dtype).removeprefix("torch.")):
        pytest.skip("served by the reference")
    for n, shape, seed in [(1, (1,), 0), (300, (20, 15), 1), (70001, (70001,), 2)]:
        ins = [x.reshape(shape) for x in _grid_inputs(m, n, dtype, seed=seed, levels=7, specials=True)]
        params = {"select_topk": topk, "int8_mask": seed == 1}
        want = SCE.reference(ins, params, Context())
        got = SCE.compute(ins, params, Context())
        assert same_bits(got, want), (n, seed)
        out = torch.empty_like(ins[0])
        assert SCE.compute(ins, params, Context(), out=out) is out and same_bits(out, want)
        # the engine's torch-free call, by address
        t = _planned(ins, params)
        if dtype == torch.float32:
            assert not SCE.native_ok(t)  # compute serves fp32
            continue
        assert SCE.native_ok(t)
        out2 = torch.full_like(ins[0], 7.0)
        (finite,) = SCE.native_cpu([t], [[x.data_ptr() for x in ins]], [out2.data_ptr()], 2)
        assert same_bits(out2, want) and finite == bool(torch.isfinite(want).all()), (n, seed)


def test_merge_weights_uniform_when_deltas_vanish():
    # every delta zero: the mean squares sum below 1e-6 and the weights are uniform, as in the reference
    base = torch.randn(4096).bfloat16()
    ins = [base, base.clone(), base.clone()]
    want = SCE.reference(ins, {"select_topk": 0.5}, Context())
    assert same_bits(SCE.compute(ins, {"select_topk": 0.5}, Context()), want)


def _planned(inputs, params):
    from types import SimpleNamespace

    from mergekit_fast import dtypes

    dt = dtypes.of(inputs[0].dtype)
    return SimpleNamespace(name="w", shape=tuple(inputs[0].shape), in_dtype=dt, out_dtype=dt,
                           inputs=[None] * len(inputs), params=tuple(params.items()))  # fmt: skip


def test_engine_native_path_equals_the_torch_path(tmp_path, monkeypatch):
    from fixtures_models import make_model
    from test_methods_other import fine_tune
    from test_methods_pointwise import native_path_equals_torch_path

    a = make_model(tmp_path / "a", seed=11, num_layers=1)
    b = fine_tune(a, tmp_path / "b", seed=1, density=0.5)
    c = fine_tune(a, tmp_path / "c", seed=2, density=0.3)
    config = (f"models:\n  - model: {b}\n  - model: {c}\nmerge_method: sce\nbase_model: {a}\n"
              "parameters: {select_topk: 0.3}\ndtype: bfloat16\n")  # fmt: skip
    native_path_equals_torch_path(config, tmp_path, monkeypatch, SCE)


def test_native_ready_limits():
    x = torch.zeros(8, dtype=torch.bfloat16)
    assert ops.native_ready([x, x])
    assert not ops.native_ready([x])  # the base alone
    assert not ops.native_ready([x.double(), x.double()])  # fp64: the reference
    assert not ops.native_ready([x] + [x] * 9)  # more models than the sums serve
    assert not ops.native_ready([x.float()] + [x.float()] * 5)
    assert not ops.native_ready([x, x], backend="torch")
    assert not ops.native_ready([x, x.float()])


def test_means_of_sums_is_torch_mean():
    # wherever the exact sums determine the mean in the dtype, it is torch's own mean of the squares
    # (rows past torch's 32768-element grain are summed by both threads)
    g = torch.Generator().manual_seed(7)
    decided = 0
    for trial in range(120):
        n = int(torch.randint(1, 400000, (1,), generator=g))
        dtype = (torch.bfloat16, torch.float16)[trial % 2]
        scale = 10.0 ** float(torch.randint(-3, 2, (1,), generator=g))
        sq = ((torch.randn(2, n, generator=g, dtype=torch.float64) * scale) ** 2).to(dtype)
        w = ops.means_of_sums(sq.double().sum(dim=1).tolist(), n, str(dtype).removeprefix("torch."))
        if w is not None:
            decided += 1
            assert same_bits(torch.tensor(w, dtype=dtype), sq.mean(dim=1)), (trial, n, dtype)
    assert decided >= 80  # bf16 means are nearly always decided, fp16 ones mostly


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_weights_are_torch_s(dtype):
    # the normalisation of the mean squares, replayed in Python, against the reference's torch ops;
    # magnitudes far apart, so that the order of the sum's additions shows
    g = torch.Generator().manual_seed(3)
    name = str(dtype).removeprefix("torch.")
    for trial in range(3000):
        m = int(torch.randint(1, 8, (1,), generator=g))
        exps = torch.randint(-30, 8, (m,), generator=g).double()
        means = (torch.rand(m, generator=g, dtype=torch.float64) * 2.0**exps).to(dtype)
        if trial % 10 == 0:
            means = (means * 1e-7).to(dtype)  # a total below 1e-6: uniform weights
        got = ops.weights(means.tolist(), name)
        assert got is not None
        assert same_bits(torch.tensor(got, dtype=dtype), ops._torch_weights(means)), (trial, means)


def test_merge_when_the_means_are_torch_s(monkeypatch):
    # no mean decided from the sums: the squares go to torch's mean, with the same result
    monkeypatch.setattr(ops, "_gamma", lambda n: 1.0)
    ins = _grid_inputs(3, 5000, torch.bfloat16, seed=9, levels=7, specials=True)
    for topk in (1.0, 0.4):
        params = {"select_topk": topk}
        assert same_bits(SCE.compute(ins, params, Context()), SCE.reference(ins, params, Context()))
