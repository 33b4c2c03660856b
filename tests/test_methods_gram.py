"""The gram-based methods' compute (gram op + native apply) against their torch references, which
perform mergekit 0.1.5's ops in mergekit's dtypes (tests/test_methods_other.py checks those against
mergekit itself).

Criterion: bit-identical, except where a 16-bit input's norm or dot product, summed exactly here and
in fp32 by torch, rounds to the neighbouring value of the dtype (torch's fp32 rounding error crossing
a rounding boundary: about 1e-5 of the sums at these sizes). Such a case moves a coefficient by an
ulp of the dtype and so most elements by at most an ulp of the output; the tests allow it for at
most one case in each batch and check the ulp bound there.
"""

from __future__ import annotations

import pytest
import torch
from helpers import needs_native

from mergekit_fast import methods
from mergekit_fast.methods.base import Context
from mergekit_fast.ops._verify import ulp

pytestmark = needs_native
DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]


def _models(k, shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    common = torch.randn(shape, generator=g)
    xs = [base + 0.02 * (0.5 * common + torch.randn(shape, generator=g)) for _ in range(k)]
    return [base.to(dtype)] + [x.to(dtype) for x in xs]


def _compare(method, inputs, params, *, ctx=None):
    ctx = ctx or Context(name="t")
    got = method.compute([x.clone() for x in inputs], params, ctx)
    ref = method.reference([x.clone() for x in inputs], params, ctx)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    if torch.equal(got, ref):
        return True
    scale = sum(x.double().abs() for x in inputs)
    assert bool(((got.double() - ref.double()).abs() <= ulp(scale, got.dtype)).all())
    return False


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock(dtype, filter_wise):
    m = methods.get("model_stock")
    equal = []
    for k, shape in ((2, (64, 96)), (3, (33, 17)), (4, (5, 7, 40)), (2, (300,)), (3, (1, 1))):
        equal.append(_compare(m, _models(k, shape, dtype, seed=k + len(shape)), {"filter_wise": filter_wise}))
    assert sum(not e for e in equal) <= 1, equal


def test_model_stock_into_an_output_buffer_and_odd_cases():
    m = methods.get("model_stock")
    inputs = _models(2, (40, 50), torch.bfloat16, seed=3)
    out = torch.empty(40, 50, dtype=torch.bfloat16)
    got = m.compute(inputs, {"filter_wise": True}, Context(), out=out)
    assert got.data_ptr() == out.data_ptr() and torch.equal(
        out, m.reference(inputs, {"filter_wise": True}, Context())
    )
    # models equal to the base (zero task vectors), models that cancel out, a NaN
    b = inputs[0]
    for xs in ([b, b.clone(), b.clone()], [b, b + 0.5, b - 0.5], [b, inputs[1], inputs[2]]):
        xs = [x.clone() for x in xs]
        ref = m.reference(xs, {"filter_wise": False}, Context())
        assert torch.equal(m.compute(xs, {"filter_wise": False}, Context()), ref)
    xs = [x.clone() for x in inputs]
    xs[1][3, 4] = float("nan")
    got, ref = (f(xs, {"filter_wise": True}, Context()) for f in (m.compute, m.reference))
    assert torch.equal(got.isnan(), ref.isnan()) and torch.equal(got.nan_to_num(), ref.nan_to_num())


def test_model_stock_torch_backend_is_the_reference():
    m = methods.get("model_stock")
    inputs = _models(2, (8, 8), torch.bfloat16, seed=1)
    ctx = Context(backend="torch")
    assert torch.equal(m.compute(inputs, {}, ctx), m.reference(inputs, {}, ctx))


def test_torch_dot_adds_unrounded_products_in_fp32():
    # what karcher's _GramSums assumes: torch.dot of bf16 vectors is the fp32 sum of the exact products
    g = torch.Generator().manual_seed(0)
    differ = same = 0
    for _ in range(300):
        n = int(torch.randint(2, 3000, (1,), generator=g))
        a, b = torch.randn(n, generator=g).bfloat16(), (torch.randn(n, generator=g) + 1).bfloat16()
        exact = (a.double() * b.double()).sum().float().bfloat16()
        rounded = (a * b).double().sum().float().bfloat16()
        if exact != rounded:
            differ += 1
            same += bool(torch.dot(a, b) == exact)
    assert differ > 50 and same == differ


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_karcher(dtype):
    m = methods.get("karcher")
    equal = []
    for k, shape, params in ((2, (64, 96), {}), (3, (33, 17), {"max_iter": 3}), (4, (300,), {"tol": 1e-3})):
        equal.append(
            _compare(m, _models(k, shape, dtype, seed=k)[1:], {"max_iter": 10, "tol": 1e-5, **params})
        )
    assert sum(not e for e in equal) <= 1, equal
    # a zero input, an input equal to the mean
    x = _models(2, (50,), dtype, seed=9)
    assert _compare(m, [x[0], torch.zeros_like(x[0]), x[1]], {"max_iter": 10, "tol": 1e-5})
    assert _compare(m, [x[0], x[0].clone()], {"max_iter": 10, "tol": 1e-5})


def _native_stock(inputs, filter_wise):
    """model_stock's torch-free path (native_cpu) on torch tensors, as the engine calls it."""
    from types import SimpleNamespace

    from mergekit_fast import dtypes

    m = methods.get("model_stock")
    t = SimpleNamespace(name="w", shape=tuple(inputs[0].shape), in_dtype=dtypes.of(inputs[0].dtype),
                        inputs=[None] * len(inputs), params=(("filter_wise", filter_wise),))  # fmt: skip
    assert m.native_ok(t)
    out = torch.empty_like(inputs[0])
    (ok,) = m.native_cpu([t], [[x.data_ptr() for x in inputs]], [out.data_ptr()], 2)
    return out, ok


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_without_torch_equals_the_reference(dtype, filter_wise):
    m = methods.get("model_stock")
    equal = []
    for k, shape in ((2, (64, 96)), (3, (33, 17)), (4, (5, 7, 40)), (2, (300,)), (3, (1, 1)), (5, (20, 30))):
        inputs = _models(k, shape, dtype, seed=k + len(shape))
        got, ok = _native_stock(inputs, filter_wise)
        ref = m.reference(inputs, {"filter_wise": filter_wise}, Context())
        assert ok
        if not torch.equal(got, ref):
            scale = sum(x.double().abs() for x in inputs)
            assert bool(((got.double() - ref.double()).abs() <= ulp(scale, dtype)).all())
        equal.append(torch.equal(got, ref))
    assert sum(not e for e in equal) <= 1, equal


def test_model_stock_without_torch_odd_cases():
    m = methods.get("model_stock")
    b = _models(2, (40, 50), torch.bfloat16, seed=3)
    for xs in ([b[0], b[0].clone(), b[0].clone()], [b[0], b[0] + 0.5, b[0] - 0.5], b):
        for fw in (False, True):
            got, ok = _native_stock([x.clone() for x in xs], fw)
            assert ok and torch.equal(
                got, m.reference([x.clone() for x in xs], {"filter_wise": fw}, Context())
            )
    xs = [x.clone() for x in b]
    xs[1][3, 4] = float("nan")
    got, ok = _native_stock(xs, True)
    ref = m.reference(xs, {"filter_wise": True}, Context())
    assert (
        not ok and torch.equal(got.isnan(), ref.isnan()) and torch.equal(got.nan_to_num(), ref.nan_to_num())
    )


@pytest.mark.parametrize("filter_wise", [False, True])
def test_engine_native_path_equals_the_torch_path(tmp_path, monkeypatch, filter_wise):
    from fixtures_models import make_model
    from helpers import read_model, run_ours
    from test_methods_other import fine_tune

    from mergekit_fast.methods.model_stock import ModelStock

    a = make_model(tmp_path / "a", seed=11, num_layers=1)
    b = fine_tune(a, tmp_path / "b", seed=1, density=0.5)
    c = fine_tune(a, tmp_path / "c", seed=2, density=0.3)
    config = (f"models:\n  - model: {b}\n  - model: {c}\nmerge_method: model_stock\nbase_model: {a}\n"
              f"parameters: {{filter_wise: {str(filter_wise).lower()}}}\ndtype: bfloat16\n")  # fmt: skip
    calls = []
    native = ModelStock.native_cpu

    def counting(*args, **kw):
        calls.append(len(args[0]))
        return native(*args, **kw)

    monkeypatch.setattr(ModelStock, "native_cpu", staticmethod(counting))
    ours = read_model(run_ours(config, tmp_path / "native"))
    assert sum(calls) > 0
    torch_path = read_model(run_ours(config, tmp_path / "torch", "--backend", "torch"))
    assert sorted(ours) == sorted(torch_path)
    for name in ours:
        assert torch.equal(ours[name], torch_path[name]), name


def _native_method(name, inputs, params):
    """A method's torch-free path (native_cpu) on torch tensors, as the engine calls it."""
    from types import SimpleNamespace

    from mergekit_fast import dtypes

    m = methods.get(name)
    t = SimpleNamespace(name="w", shape=tuple(inputs[0].shape), in_dtype=dtypes.of(inputs[0].dtype),
                        inputs=[None] * len(inputs), params=tuple(params.items()))  # fmt: skip
    assert m.native_ok(t)
    out = torch.empty_like(inputs[0])
    (ok,) = m.native_cpu([t], [[x.data_ptr() for x in inputs]], [out.data_ptr()], 2)
    return out, ok


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("flatten", [True, False])
@pytest.mark.parametrize("with_base", [True, False])
def test_nuslerp(dtype, flatten, with_base):
    m = methods.get("nuslerp")
    equal = []
    for k, (shape, t) in enumerate((((64, 96), 0.3), ((33, 17), 0.5), ((300,), 1.4), ((5, 7, 40), -0.2))):
        inputs = _models(2, shape, dtype, seed=k)
        inputs = inputs if with_base else inputs[1:]
        params = {"t": t, "weights": (1 - t, t), "row_wise": False, "flatten": flatten}
        equal.append(_compare(m, inputs, params))
        got, ok = _native_method("nuslerp", inputs, params)
        ref = m.reference([x.clone() for x in inputs], params, Context())
        assert ok and (torch.equal(got, ref) or not equal[-1])
    assert sum(not e for e in equal) <= 1, equal
    # colinear vectors (the lerp), zero task vectors, a NaN
    x = _models(2, (20, 30), dtype, seed=7)
    params = {"t": 0.3, "weights": (0.7, 0.3), "row_wise": False, "flatten": flatten}
    for xs in ([x[0], x[1], x[1].clone()], [x[0], x[0].clone(), x[0].clone()], [x[0], x[1], 2 * x[1]]):
        assert _compare(m, xs, params)
    xs = [y.clone() for y in x]
    xs[1][2, 3] = float("nan")
    got, ref = m.compute(xs, params, Context()), m.reference(xs, params, Context())
    assert torch.equal(got.isnan(), ref.isnan()) and torch.equal(got.nan_to_num(), ref.nan_to_num())


def test_nuslerp_columns_use_the_reference():
    m = methods.get("nuslerp")
    inputs = _models(2, (16, 24), torch.bfloat16, seed=2)
    params = {"t": 0.4, "weights": (0.6, 0.4), "row_wise": True, "flatten": False}
    assert torch.equal(m.compute(inputs, params, Context()), m.reference(inputs, params, Context()))


def test_long_vectors_keep_torchs_sums():
    # beyond 2^15 elements torch's bf16 sum is not the exactly rounded one (model_stock.GRAM_MAX_SUM):
    # there the statistics come from torch and the results are mergekit's bits
    inputs = _models(2, (1024, 512), torch.bfloat16, seed=21)
    m = methods.get("model_stock")
    for fw in (False, True):
        got = m.compute([x.clone() for x in inputs], {"filter_wise": fw}, Context())
        assert torch.equal(got, m.reference(inputs, {"filter_wise": fw}, Context()))
    m = methods.get("nuslerp")
    params = {"t": 0.3, "weights": (0.7, 0.3), "row_wise": False, "flatten": True}
    assert torch.equal(m.compute(inputs, params, Context()), m.reference(inputs, params, Context()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("with_base", [True, False])
def test_multislerp_native_passes_give_the_references_bits(dtype, with_base, monkeypatch):
    """compute's native passes between torch's reductions (csrc/gram/sphere_cpu.cpp) against the
    reference, bit for bit: odd sizes, vectors longer than the 2^15 elements past which torch's 16-bit
    sums are not exactly rounded, 2 to 16 models, unnormalised and negative weights, a NaN."""
    from mergekit_fast import _native

    calls = []
    module = _native.C
    real = module.multislerp_pass_cpu

    class Counting:
        def __getattr__(self, name):
            return getattr(module, name) if name != "multislerp_pass_cpu" else counting

    def counting(*args, **kw):
        calls.append(args[1])
        return real(*args, **kw)

    m = methods.get("multislerp")
    cases = [((33, 17), (0.6, 0.4), True), (((1 << 16) + 5,), (0.2, 0.5, 0.3), True),
             ((7, 300), (1.0, -0.3), False), ((64, 96), tuple(0.1 + 0.05 * i for i in range(16)), True)]  # fmt: skip
    for k, (shape, weights, normalize) in enumerate(cases):
        xs = _models(len(weights), shape, dtype, seed=20 + k)
        inputs = xs if with_base else xs[1:]
        params = {"weights": weights, "normalize_weights": normalize, "eps": 1e-8}
        monkeypatch.setattr(_native, "C", Counting())
        got = m.compute([x.clone() for x in inputs], params, Context())
        monkeypatch.undo()
        ref = m.reference([x.clone() for x in inputs], params, Context())
        assert got.dtype == ref.dtype and torch.equal(got, ref), (shape, weights)
    assert calls.count(4) == len(cases)  # every case took the native passes
    xs = _models(3, (20, 30), dtype, seed=7)
    xs[1][2, 3] = float("nan")
    params = {"weights": (0.5, 0.5), "normalize_weights": True, "eps": 1e-8}
    got, ref = m.compute(xs, params, Context()), m.reference([x.clone() for x in xs], params, Context())
    assert torch.equal(got.isnan(), ref.isnan()) and torch.equal(got.nan_to_num(), ref.nan_to_num())
    out = torch.empty_like(xs[0])
    assert m.compute(xs, params, Context(), out) is out and torch.equal(out.isnan(), ref.isnan())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("with_base", [True, False])
def test_nuslerp_long_vectors_native_passes_give_the_references_bits(dtype, with_base, monkeypatch):
    """Whole tensors longer than 2^15 elements: torch's sums, native passes between them
    (nuslerp_pass_cpu), the reference's bits; colinear pairs (the lerp), t outside [0, 1], a NaN."""
    from mergekit_fast import _native

    module, passes = _native.C, []

    class Counting:
        def __getattr__(self, name):
            if name != "nuslerp_pass_cpu":
                return getattr(module, name)
            return lambda *a: (passes.append(a[1]), module.nuslerp_pass_cpu(*a))[1]

    m = methods.get("nuslerp")
    xs = _models(2, (300, 257), dtype, seed=31)
    colinear = [xs[0], xs[1], xs[0] + 2 * (xs[1] - xs[0])]  # task vectors v and 2v
    for k, (inputs, t) in enumerate([(xs, 0.3), (colinear, 0.5), (xs, 1.4), (xs, -0.2)]):
        inputs = inputs if with_base else inputs[1:]
        params = {"t": t, "weights": (1 - t, t), "row_wise": False, "flatten": True}
        monkeypatch.setattr(_native, "C", Counting())
        got = m.compute([x.clone() for x in inputs], params, Context())
        monkeypatch.undo()
        ref = m.reference([x.clone() for x in inputs], params, Context())
        assert torch.equal(got, ref), k
    assert passes.count(2) == 4
    nan = [x.clone() for x in xs]
    nan[1][7, 9] = float("nan")
    params = {"t": 0.3, "weights": (0.7, 0.3), "row_wise": False, "flatten": True}
    got, ref = m.compute(nan, params, Context()), m.reference([x.clone() for x in nan], params, Context())
    assert torch.equal(got.isnan(), ref.isnan()) and torch.equal(got.nan_to_num(), ref.nan_to_num())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("count", [2, 4, 5])
def test_model_stock_long_rows_native_terms_give_the_references_bits(dtype, count):
    """Rows longer than 2^15 elements (and every fp32/fp64 row): torch's norms and sums over the task
    vectors and products one native pass writes (model_stock_terms_cpu, up to 4 models; 5 take torch's
    own ops), the reference's bits."""
    m = methods.get("model_stock")
    inputs = _models(count, (3, 40000), dtype, seed=40 + count)
    for fw in (False, True):
        got = m.compute([x.clone() for x in inputs], {"filter_wise": fw}, Context())
        assert torch.equal(got, m.reference([x.clone() for x in inputs], {"filter_wise": fw}, Context())), fw


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_karcher_native_passes_give_the_same_bits(dtype):
    """karcher_mean_native (the elementwise steps native) against karcher_mean with the same sums, bit
    for bit: the iteration's branches (skipped inputs, early stops, a zero input) taken the same way."""
    from mergekit_fast.methods.karcher import _GramSums, karcher_mean, karcher_mean_native

    x = _models(3, (50,), dtype, seed=9)
    cases = [(_models(2, (64, 96), dtype, seed=1)[1:], 10, 1e-5), (_models(3, (33, 17), dtype, seed=2)[1:], 3, 1e-5),
             (_models(4, (300,), dtype, seed=3)[1:], 10, 1e-3), ([x[0], torch.zeros_like(x[0]), x[1]], 10, 1e-5),
             ([x[0], x[0].clone()], 10, 1e-5), (_models(2, ((1 << 16) + 9,), dtype, seed=4)[1:], 10, 1e-6)]  # fmt: skip
    for k, (xs, max_iter, tol) in enumerate(cases):
        w = [1.0 / len(xs)] * len(xs)
        want = karcher_mean([t.clone() for t in xs], w, max_iter, tol, _GramSums())
        got = karcher_mean_native([t.clone() for t in xs], w, max_iter, tol, _GramSums(), threads=2)
        assert torch.equal(got, want), k
