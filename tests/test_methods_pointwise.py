"""The pointwise methods' native kernels (nearswap, ram, ramplus_tl: csrc/combine/pointwise_cpu.cpp)
against their torch references, which perform mergekit 0.1.5's ops in mergekit's dtypes
(tests/test_methods_other.py checks those against mergekit itself).

Criterion: the same bits, NaN for NaN, the sign of zero included. The kernels replay torch's ops one by
one in the input dtype, so there is no tolerance: every element is a sequence of IEEE operations
with the roundings torch performs, and the sum over the models adds in the order torch's reduction
does (up to 8 models; more go through the reference).
"""

from __future__ import annotations

import pytest
import torch
from helpers import needs_native

from mergekit_fast import dtypes, methods
from mergekit_fast.methods.base import Context

pytestmark = needs_native
DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality, any NaN equal to any NaN (torch does not fix a NaN's sign or payload)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    nan = a.isnan()
    if not torch.equal(nan, b.isnan()):
        return False
    it = _INT[a.element_size()]
    return torch.equal(a.masked_fill(nan, 0).view(it), b.masked_fill(nan, 0).view(it))


def _inputs(k: int, shape, dtype, seed: int, specials: bool = True):
    """The base and k models whose deltas mix exact zeros, deltas below ram's epsilon, ordinary ones and
    large ones; with ``specials``, NaN, +-Inf and signed zeros in the base and the models."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=torch.float64) * 0.05
    xs = []
    for _ in range(k):
        pick = torch.randint(0, 5, shape, generator=g)
        scale = torch.tensor([0.0, 3e-6, 1e-3, 2e-2, 1.0], dtype=torch.float64)[pick]
        xs.append(base + scale * torch.randn(shape, generator=g, dtype=torch.float64))
    out = [base.to(dtype)] + [x.to(dtype) for x in xs]
    if specials and out[0].numel() >= 16:
        flat = [x.view(-1) for x in out]
        values = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-7, -1e-7]
        for j in range(min(40, flat[0].numel())):
            q = int(torch.randint(0, k + 1, (1,), generator=g))
            pos = int(torch.randint(0, flat[0].numel(), (1,), generator=g))
            flat[q][pos] = values[j % len(values)]
        # an element where every model equals the base (-0 base, +0 models), and one at exactly epsilon
        for x in flat:
            x[0] = 0.0
        flat[0][0] = -0.0
    return out


def _check(name: str, inputs, params, threads: int = 2):
    m = methods.get(name)
    ctx = Context(name="w", threads=threads)
    ref = m.reference([x.clone() for x in inputs], params, ctx)
    want = ref.to(inputs[0].dtype)  # ramplus_tl's fp32 result of 16-bit inputs, stored in the input dtype
    out = torch.empty_like(inputs[0])
    got = m.compute([x.clone() for x in inputs], params, ctx, out)
    assert got is out and same_bits(got, want), (name, inputs[0].dtype, params)
    # the engine's torch-free call: by address
    t = _planned(name, inputs, params)
    if len(inputs) - 1 > m.model_limit(t.in_dtype.name):
        assert not m.native_ok(t)  # compute took the reference
        return ref
    assert m.native_ok(t)
    out2 = torch.full_like(inputs[0], 7.0)
    (finite,) = m.native_cpu([t], [[x.data_ptr() for x in inputs]], [out2.data_ptr()], threads)
    assert same_bits(out2, want)
    assert finite == bool(torch.isfinite(want).all())
    if ref.dtype != want.dtype:  # ramplus_tl: the promoted result as is, by address and from compute
        t = _planned(name, inputs, params, out_dtype=ref.dtype)
        assert m.native_writes(t)
        out3 = torch.empty_like(ref)
        (finite,) = m.native_cpu([t], [[x.data_ptr() for x in inputs]], [out3.data_ptr()], threads)
        assert same_bits(out3, ref) and finite == bool(torch.isfinite(ref).all())
        assert same_bits(m.compute([x.clone() for x in inputs], params, ctx), ref)
    return ref


def _planned(name, inputs, params, out_dtype=None):
    from types import SimpleNamespace

    dt = dtypes.of(inputs[0].dtype)
    return SimpleNamespace(name="w", shape=tuple(inputs[0].shape), in_dtype=dt,
                           out_dtype=dt if out_dtype is None else dtypes.of(out_dtype),
                           inputs=[None] * len(inputs), params=tuple(params.items()))  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("t", [1e-4, 0.01, 0.0, -0.5, 1e3])
def test_nearswap(dtype, t):
    for k, shape in enumerate([(37, 61), (5,), (1000,)]):
        _check("nearswap", _inputs(1, shape, dtype, seed=k), {"t": t})


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("count", [1, 2, 4, 5, 8])
def test_ram(dtype, count):
    for k, (shape, eps) in enumerate([((37, 61), 1e-5), ((300,), 1e-3), ((9, 9), 0.0), ((40,), -1.0)]):
        _check("ram", _inputs(count, shape, dtype, seed=10 * count + k), {"epsilon": eps})


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("count", [1, 2, 4, 5, 8])
def test_ramplus_tl(dtype, count):
    cases = [((37, 61), (0.1, 0.2, 1e-5)), ((300,), (0.5, 1.0, 1e-3)), ((9, 9), (0.1, -0.3, 0.0)),
             ((64,), (-2.0, 5.0, 1e-5))]  # fmt: skip
    for k, (shape, (r, alpha, eps)) in enumerate(cases):
        inputs = _inputs(count, shape, dtype, seed=100 * count + k)
        ref = _check("ramplus_tl", inputs, {"r": r, "alpha": alpha, "epsilon": eps})
        expected = torch.float64 if dtype == torch.float64 else torch.float32
        assert ref.dtype == expected  # the reference's promoted result, which the kernel rounds once


@pytest.mark.parametrize("name", ["nearswap", "ram", "ramplus_tl"])
def test_parallel_blocks_and_thread_count(name):
    """Above the parallel threshold (2^18 elements) the result does not depend on the thread count,
    and ramplus_tl's counts over the whole tensor are the reference's."""
    count = 1 if name == "nearswap" else 3
    inputs = _inputs(count, ((1 << 19) + 77,), torch.bfloat16, seed=5)
    params = {"t": 1e-3} if name == "nearswap" else {}
    m = methods.get(name)
    one = m.compute(inputs, params, Context(threads=1), torch.empty_like(inputs[0]))
    two = _check(name, inputs, params, threads=2).to(torch.bfloat16)
    assert same_bits(one, two)


@pytest.mark.parametrize("name", ["nearswap", "ram", "ramplus_tl"])
def test_empty_and_fallbacks(name):
    m = methods.get(name)
    count = 1 if name == "nearswap" else 2
    params = {"t": 0.5} if name == "nearswap" else {}
    empty = _inputs(count, (0, 4), torch.bfloat16, seed=0, specials=False)
    assert m.compute(empty, params, Context(), torch.empty_like(empty[0])).shape == (0, 4)
    # the torch backend and non-contiguous inputs take the reference
    xs = _inputs(count, (16, 8), torch.float32, seed=1)
    ref = m.reference([x.clone() for x in xs], params, Context())
    assert same_bits(m.compute(xs, params, Context(backend="torch")), ref)
    ts = [x.t() for x in xs]
    assert same_bits(
        m.compute(ts, params, Context()), m.reference([x.clone() for x in ts], params, Context())
    )


@pytest.mark.parametrize(("name", "count", "dtype"), [("ram", 9, torch.bfloat16), ("ram", 5, torch.float32),
                                                      ("ramplus_tl", 5, torch.bfloat16)])  # fmt: skip
def test_beyond_the_kernels_model_count_the_reference(name, count, dtype):
    """torch's sum over the models takes another order there (methods/_ram.py); the reference serves."""
    m = methods.get(name)
    xs = _inputs(count, (37, 61), dtype, seed=3)
    assert not m.native_ok(_planned(name, xs, {}))
    got = m.compute(xs, {}, Context())
    assert same_bits(got, m.reference([x.clone() for x in xs], {}, Context()))


def native_path_equals_torch_path(config: str, tmp_path, monkeypatch, method) -> dict:
    """Merges ``config`` on the engine's by-address path (asserting that ``method.native_cpu`` ran) and on
    the torch path (``--backend torch``), asserts the same bits tensor by tensor, returns the first."""
    import inspect

    from helpers import read_model, run_ours

    cls = type(method)
    calls = []
    static = isinstance(inspect.getattr_static(cls, "native_cpu"), staticmethod)
    native = cls.native_cpu

    def counting(*args, **kw):
        calls.append(len(args[1 if not static else 0]))
        return native(*args, **kw)

    monkeypatch.setattr(cls, "native_cpu", staticmethod(counting) if static else counting)
    ours = read_model(run_ours(config, tmp_path / "native"))
    assert sum(calls) > 0
    torch_path = read_model(run_ours(config, tmp_path / "torch", "--backend", "torch"))
    assert sorted(ours) == sorted(torch_path)
    for key in ours:
        assert same_bits(ours[key], torch_path[key]), key
    return ours


@pytest.mark.parametrize("name", ["nearswap", "ram", "ramplus_tl", "ramplus_tl-bf16-out"])
def test_engine_native_path_equals_the_torch_path(tmp_path, monkeypatch, name):
    from fixtures_models import make_model
    from test_methods_other import fine_tune

    a = make_model(tmp_path / "a", seed=11, num_layers=1)
    b = fine_tune(a, tmp_path / "b", seed=1, density=0.5)
    c = fine_tune(a, tmp_path / "c", seed=2, density=0.3)
    method, _, out_dtype = name.partition("-")
    if method == "nearswap":
        config = (
            f"models:\n  - model: {b}\nmerge_method: nearswap\nbase_model: {a}\nparameters: {{t: 0.001}}\n"
        )
    else:
        config = f"models:\n  - model: {b}\n  - model: {c}\nmerge_method: {method}\nbase_model: {a}\n"
    config += "dtype: bfloat16\n" + ("out_dtype: bfloat16\n" if out_dtype else "")
    ours = native_path_equals_torch_path(config, tmp_path, monkeypatch, methods.get(method))
    if method == "ramplus_tl":  # mergekit's promoted fp32 output, or the out_dtype asked for
        want = torch.bfloat16 if out_dtype else torch.float32
        assert all(x.dtype == want for k, x in ours.items() if "layers" in k)


def test_direct_io_path_writes_the_promoted_output(tmp_path, monkeypatch):
    """ramplus_tl's fp32 output of bf16 inputs through the direct-I/O strategy (output buffers sized by
    the output dtype): the same bytes as the page-cache path."""
    from fixtures_models import make_model
    from test_io_direct import _evict
    from test_methods_other import fine_tune

    from mergekit_fast.api import merge
    from mergekit_fast.engine import staging

    a = make_model(tmp_path / "a", seed=11, num_layers=2, hidden_size=64, intermediate_size=176)
    b = fine_tune(a, tmp_path / "b", seed=1, density=0.5)
    c = fine_tune(a, tmp_path / "c", seed=2, density=0.3)
    config = f"models:\n  - model: {b}\n  - model: {c}\nmerge_method: ramplus_tl\nbase_model: {a}\ndtype: bfloat16\n"
    seen = []
    real = staging.CpuDirect.load
    monkeypatch.setattr(staging.CpuDirect, "load", lambda self, job: (seen.append(1), real(self, job))[1])
    _evict(a, b, c)  # cold inputs: the direct path is taken for them
    merge(config, tmp_path / "direct", device="cpu", progress=False, write_model_card=False)
    if not seen:
        pytest.skip("this filesystem keeps the page-cache path (no O_DIRECT, or the inputs stayed cached)")
    merge(config, tmp_path / "cached", device="cpu", progress=False, write_model_card=False, direct_io=False)
    files = [
        {p.name: p.read_bytes() for p in (tmp_path / d).glob("*.safetensors")} for d in ("direct", "cached")
    ]
    assert files[0] and files[0] == files[1]
