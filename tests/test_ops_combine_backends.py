"""``ops.combine.ta_merge`` on every backend against the torch reference (the methods' own arithmetic,
``methods._task_arithmetic.merge``, which tests/test_methods_task_arithmetic.py checks against
mergekit 0.1.5 itself).

The combine op is mergekit's rounding step by step, so every backend must give the reference's bits:
the comparison is exact (NaN where the reference has NaN). Triton runs under the interpreter on the
CPU (tests/conftest.py), on small shapes; on a GPU machine the same tests run it compiled.
"""

from __future__ import annotations

import pytest
import torch
from helpers import runnable_backends

from mergekit_fast import backends
from mergekit_fast.ops import _verify, combine

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# (sparsification, consensus, shared params): task_arithmetic, dare_linear, dare_ties, and their corners
CASES = {
    "task_arithmetic": (None, None, {"normalize": False}),
    "task_arithmetic_lambda": (None, None, {"normalize": True, "lambda": 0.7}),
    "dare_linear": ("random", None, {"normalize": False, "rescale": True}),
    "dare_ties": ("random", "sum", {"normalize": True, "rescale": True}),
    "dare_ties_count": ("random", "count", {"normalize": True, "rescale": False, "lambda": 1.5}),
}


def backend_params():
    out = []
    for device in ("cpu", "cuda"):
        names = ("cpp", "triton") if device == "cpu" else ("triton",)
        for p in runnable_backends(device, names):
            out.append(pytest.param(p.values[0], device, marks=p.marks, id=p.id))
    return out


def make(n, k, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(n, generator=g) * 0.02).to(dtype)
    xs = [(base.float() + torch.randn(n, generator=g) * 0.002).to(dtype) for _ in range(k)]
    return base.to(device), [x.to(device) for x in xs]


def assert_same(got, ref):
    got = got.detach().cpu()
    assert torch.equal(torch.isnan(got), torch.isnan(ref))
    ok = torch.isnan(ref)
    assert torch.equal(got[~ok], ref[~ok]), int((got[~ok] != ref[~ok]).sum())


def params_for(case, k, densities=(0.5, 0.3, 0.9, 1.0)):
    sp, cons, shared = CASES[case]
    p = {"weight": (0.6, 0.4, 0.3, -0.2)[:k], **shared}
    if sp is not None:
        p["density"] = densities[:k]
    return sp, cons, p


@pytest.mark.parametrize("backend, device", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_equals_reference(backend, device, dtype, case):
    n = 5003  # more than one Triton program and one L1 block, with ragged tails
    for k in (1, 2, 4):
        base, xs = make(n, k, dtype, seed=k, device=device)
        sp, cons, p = params_for(case, k)
        got = combine.ta_merge(base, xs, p, sp, cons, name="model.layers.0.mlp.up_proj.weight", seed=1234,
                               backend=backend)  # fmt: skip
        ref = combine.ta_merge_ref(base, xs, p, sp, cons, name="model.layers.0.mlp.up_proj.weight", seed=1234)
        assert_same(got, ref)


@pytest.mark.parametrize("backend, device", backend_params())
@pytest.mark.parametrize("n", [0, 1, 3, 4, 17])
def test_tiny_and_empty(backend, device, n):
    base, xs = make(n, 2, torch.bfloat16, seed=n, device=device)
    sp, cons, p = params_for("dare_ties", 2)
    got = combine.ta_merge(base, xs, p, sp, cons, name="w", seed=7, backend=backend)
    assert got.shape == base.shape
    assert_same(got, combine.ta_merge_ref(base, xs, p, sp, cons, name="w", seed=7))


@pytest.mark.filterwarnings(
    "ignore:invalid value encountered:RuntimeWarning"
)  # the interpreter's numpy: inf * 0
@pytest.mark.parametrize("backend, device", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_density_zero_one_equal_inputs_and_nonfinite(backend, device, dtype):
    n = 2000
    base, xs = make(n, 3, dtype, seed=3, device=device)
    xs[1] = base.clone()  # all-equal: every delta 0
    xs[2][::97] = float("nan")
    xs[2][5::101] = float("inf")
    xs[0][7::89] = float("-inf")
    for dens in ((0.0, 1.0, 0.5), (1.0, 1.0, 1.0), (0.01, 0.99, 0.0)):
        for case in ("dare_ties", "dare_linear", "dare_ties_count"):
            sp, cons, p = params_for(case, 3, densities=dens)
            got = combine.ta_merge(base, xs, p, sp, cons, name="x", seed=99, backend=backend)
            assert_same(got, combine.ta_merge_ref(base, xs, p, sp, cons, name="x", seed=99))


def test_draws_depend_on_seed_and_name():
    """The oracle itself is not constant: other seeds or names draw other masks."""
    base, xs = make(4096, 2, torch.bfloat16)
    sp, cons, p = params_for("dare_linear", 2)
    a = combine.ta_merge_ref(base, xs, p, sp, cons, name="a", seed=1)
    assert not torch.equal(a, combine.ta_merge_ref(base, xs, p, sp, cons, name="a", seed=2))
    assert not torch.equal(a, combine.ta_merge_ref(base, xs, p, sp, cons, name="b", seed=1))


def test_triton_refuses_what_it_does_not_serve():
    base, xs = make(100, 2, torch.bfloat16)
    p = {"weight": (0.5, 0.5), "density": (0.5, 0.5), "normalize": True}
    if backends.unavailable_reason("triton", base.device):
        pytest.skip("triton unavailable")
    with pytest.raises(backends.BackendUnavailable, match="magnitude has no Triton kernel"):
        combine.ta_merge(base, xs, p, "magnitude", "sum", name="x", backend="triton")
    with pytest.raises(backends.BackendUnavailable, match="float64"):
        combine.ta_merge(base.double(), [x.double() for x in xs], p, None, None, backend="triton")
    # auto on the CPU takes the C++ kernels (or torch) and gives the reference's bits
    got = combine.ta_merge(base, xs, p, "magnitude", "sum", name="x")
    assert_same(got, combine.ta_merge_ref(base, xs, p, "magnitude", "sum", name="x"))


def test_verify_catches_a_wrong_result(monkeypatch):
    if backends.unavailable_reason("triton", torch.device("cpu")):
        pytest.skip("triton unavailable")
    base, xs = make(3000, 2, torch.bfloat16)
    sp, cons, p = params_for("dare_ties", 2)
    combine.ta_merge(base, xs, p, sp, cons, name="x", seed=3, backend="triton", verify=True)
    real = combine._run_triton

    def off_by_one(base, others, params, sparsification, consensus, name, seed, out):
        real(base, others, params, sparsification, consensus, name, seed + 1, out)  # other draws

    monkeypatch.setattr(combine, "_run_triton", off_by_one)
    with pytest.raises(_verify.VerificationError, match="disagrees with the torch reference"):
        combine.ta_merge(base, xs, p, sp, cons, name="x", seed=3, backend="triton", verify=True)


def test_shape_mismatch_names_the_input():
    base, xs = make(10, 2, torch.float32)
    with pytest.raises(ValueError, match="input 2 is"):
        combine.ta_merge(base, [xs[0], xs[1][:5]], {"weight": (1.0, 1.0)})
