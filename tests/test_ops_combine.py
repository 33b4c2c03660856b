"""The combine op's native CPU kernels (csrc/combine, ops/combine.py) against the torch path.

The oracle of ``ta_merge_cpu`` is the family's torch reference, ``methods._task_arithmetic.merge`` with
``fast=False`` (torch.argsort for the magnitudes, rng.bernoulli for the draws: mergekit 0.1.5's
arithmetic, itself tested against mergekit in test_methods_task_arithmetic.py), and for the
deterministic methods mergekit 0.1.5's own merge function. The kernel rounds every step where torch
rounds, so the comparison is bit for bit (tolerance 0) in every dtype; the one documented exception
(an L1 norm's fp64 block sums added in another order, see ops/combine.py) does not arise at these
sizes. ``linear_cpu`` is compared with ``Linear.compute`` (mergekit's addcmul loop) bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from helpers import needs_native, read_model, run_ours

from mergekit_fast.methods import Context
from mergekit_fast.methods import _task_arithmetic as ta
from mergekit_fast.methods.linear import METHOD as LINEAR
from mergekit_fast.ops import combine

pytestmark = needs_native

DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
NAME, SEED = "model.layers.0.mlp.up_proj.weight", 1234

# (sparsification, consensus, method defaults): the eight methods served natively
METHODS = {
    "della": ("della_magprune", "sum", dict(normalize=True, rescale=True)),
    "della_linear": ("della_magprune", None, dict(normalize=False, rescale=True)),
    "task_arithmetic": (None, None, dict(normalize=False, rescale=False)),
    "ties": ("magnitude", "sum", dict(normalize=True, rescale=False)),
    "breadcrumbs": ("magnitude_outliers", None, dict(normalize=False, rescale=False)),
    "breadcrumbs_ties": ("magnitude_outliers", "sum", dict(normalize=False, rescale=False)),
    "dare_linear": ("random", None, dict(normalize=False, rescale=True)),
    "dare_ties": ("random", "sum", dict(normalize=True, rescale=True)),
}


def bits(t):
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_bitwise(got, ref):
    """Bit for bit, except NaN payloads and signs: torch's own differ by position (its vectorised bf16
    conversion writes NaN as 0xFFFF, its scalar tail loop as 0x7FC0; x86 makes -NaN of inf - inf), so a NaN
    matches any NaN."""
    assert got.dtype == ref.dtype and got.shape == ref.shape
    bad = (bits(got) != bits(ref)) & ~(torch.isnan(got) & torch.isnan(ref))
    if bool(bad.any()):
        raise AssertionError(f"{int(bad.sum())} of {bad.numel()} differ: {got[bad][:5]} vs {ref[bad][:5]}")


def make(n, k, dtype, kind="random", seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g).to(dtype)
    xs = []
    for i in range(k):
        if kind == "ties":
            x = base + torch.randint(-3, 4, (n,), generator=g).to(dtype) * 0.0625
        elif kind == "equal":
            x = base.clone()
        else:
            x = (base.double() + 0.02 * torch.randn(n, generator=g, dtype=torch.float64)).to(dtype)
        if kind == "nonfinite" and n:
            x[i :: max(1, n // 4)] = float("nan")
            x[(i + 1) :: max(1, n // 3)] = float("inf")
            x[(i + 2) :: max(1, n // 5)] = float("-inf")
        xs.append(x)
    return base, xs


def params_for(method, k, **over):
    sp, _, defaults = METHODS[method]
    p = dict(defaults, weight=(0.6, -0.3, 0.45, 1.1)[:k], density=(0.5, 0.3, 0.8, 0.65)[:k])
    p["lambda"] = 1.0
    if sp == "magnitude_outliers":
        p["gamma"] = (0.05, 0.01, 0.1, 0.02)[:k]
    if sp == "della_magprune":
        p["epsilon"] = (0.15, 0.1, 0.13, -0.2)[:k]
    p.update(over)
    return p


def served(method, base, xs, params) -> bool:
    sp = METHODS[method][0]
    tag = combine._native.dtype_tag(base.dtype)
    return combine.native_plan(sp, params, base.numel(), len(xs), tag, tuple(base.shape)) is None


def check(method, base, xs, params, threads=2):
    """The kernels against the torch reference, bit for bit; where the kernels refuse the tensor (DELLA in
    fp64, DELLA rows of one element), that they refuse it."""
    sp, cons, _ = METHODS[method]
    ctx = Context(name=NAME, seed=SEED, threads=threads)
    if not served(method, base, xs, params):
        with pytest.raises(ValueError, match="ta_merge_cpu"):
            combine.ta_merge_tensors(base, xs, params, sp, cons, name=NAME, seed=SEED, threads=threads)
        return None
    # (the reference's DELLA ranks fail on an empty tensor in torch's min(); the fast torch path returns it)
    ref = ta.merge([base, *xs], params, sp, cons, ctx, fast=base.numel() == 0)
    got = combine.ta_merge_tensors(base, xs, params, sp, cons, name=NAME, seed=SEED, threads=threads)
    assert_bitwise(got, ref)
    return got


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("n", [0, 1, 17, 4097, 70_001])
def test_equals_torch_path(method, dtype, n):
    base, xs = make(n, 2, dtype, seed=n)
    check(method, base, xs, params_for(method, 2))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("kind", ["ties", "equal", "nonfinite"])
def test_ties_equal_and_nonfinite_inputs(method, dtype, kind):
    base, xs = make(3001, 3, dtype, kind, seed=5)
    check(method, base, xs, params_for(method, 3))


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("k", [1, 3, 4])
def test_input_counts_lambda_and_flags(method, k):
    base, xs = make(5003, k, torch.bfloat16, "ties", seed=k)
    check(method, base, xs, params_for(method, k))
    check(method, base, xs, params_for(method, k, **{"lambda": 0.7, "normalize": True, "rescale": True}))
    check(method, base, xs, params_for(method, k, normalize=False, rescale=False))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties", "dare_ties", "dare_linear", "della"])
def test_density_zero_one_and_beyond(method, dtype):
    base, xs = make(2049, 3, dtype, seed=3)
    for dens in [(0.0, 1.0, 0.5), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1.5, 0.999, 0.001)]:
        check(method, base, xs, params_for(method, 3, density=dens))
    if method.startswith("breadcrumbs"):  # slices mergekit's arithmetic makes odd (negative stops)
        check(method, base, xs, params_for(method, 3, density=(-0.5, 0.5, 0.2), gamma=(2.0, -0.5, 0.0)))


def test_weights_summing_to_zero_and_rescale_edges():
    base, xs = make(3000, 2, torch.float32, seed=8)
    check("task_arithmetic", base, xs, params_for("task_arithmetic", 2, weight=(0.5, -0.5), normalize=True))
    check("dare_linear", base, xs, params_for("dare_linear", 2, weight=(0.5, -0.5), normalize=True))
    # tiny deltas: the L1 norms fall below 1e-7 and nothing is rescaled
    tiny = [base + 1e-12 * torch.randn(3000) for _ in range(2)]
    check("dare_ties", base, tiny, params_for("dare_ties", 2))


def test_threads_do_not_change_the_result():
    base, xs = make(300_001, 2, torch.bfloat16, "ties", seed=2)
    for method in ("ties", "dare_ties", "breadcrumbs", "della"):
        one = check(method, base, xs, params_for(method, 2), threads=1)
        two = check(method, base, xs, params_for(method, 2), threads=2)
        assert torch.equal(bits(one), bits(two))


def test_draws_are_the_python_philox_words():
    """The kernel's Bernoulli keeps are rng.bernoulli's: density 0.5, weight 1, zero base."""
    from mergekit_fast.methods import rng

    n = 10_007
    base = torch.zeros(n)
    x = torch.rand(n) + 1.0
    p = dict(weight=(1.0,), density=(0.5,), normalize=False, rescale=False)
    got = combine.ta_merge_tensors(base, [x], p, "random", None, name=NAME, seed=SEED)
    keep = rng.bernoulli(0.5, SEED, NAME, 0, (n,))
    assert torch.equal(got != 0, keep)


# DELLA ranks along dim 1: rows of odd lengths, bf16's many ties, rows split across the threads at
# bitmap words they share, one row, rows of two, and a 2-D tensor whose rows are 4096 long
@pytest.mark.parametrize("dtype", DTYPES[:3], ids=str)
@pytest.mark.parametrize("method", ["della", "della_linear"])
@pytest.mark.parametrize("shape", [(37, 129), (3, 2), (1, 1000), (300, 777), (16, 4096)], ids=str)
@pytest.mark.parametrize("kind", ["random", "ties", "nonfinite"])
def test_della_rows_equal_the_torch_path(method, dtype, shape, kind):
    n = shape[0] * shape[1]
    base, xs = make(n, 3, dtype, kind, seed=shape[1])
    base, xs = base.view(shape), [x.view(shape) for x in xs]
    assert check(method, base, xs, params_for(method, 3)) is not None
    check(
        method,
        base,
        xs,
        params_for(method, 3, density=(0.9, 0.2, 0.5), epsilon=(0.05, 0.15, -0.3), rescale=False),
    )


def test_della_keep_bits_are_the_torch_paths_draws():
    """The keep bitmap itself against della_probabilities + _draw (the reference's masks)."""
    shape = (41, 1031)
    base, xs = make(shape[0] * shape[1], 1, torch.bfloat16, "ties", seed=4)
    base, x = base.view(shape), xs[0].view(shape)
    for density, eps in ((0.4, 0.15), (0.7, 0.1), (0.3, -0.2173)):
        probs = ta.della_probabilities(x - base, density, eps, torch.bfloat16, NAME, fast=False)
        keep = ta._draw(probs, SEED, NAME, 2, shape, "cpu", fast=False).reshape(-1)
        words = combine.della_keep_cpu(2, base.numel(), shape[1], base.data_ptr(), x.data_ptr(), density, eps,
                                       SEED, NAME, 2)  # fmt: skip
        packed = torch.frombuffer(bytearray(words.tobytes()), dtype=torch.uint8)
        got = ((packed.view(-1, 1) >> torch.arange(8, dtype=torch.uint8)) & 1).view(-1)[: base.numel()].bool()
        assert torch.equal(got, keep)
        assert 0 < int(keep.sum()) < keep.numel()


def _row_patterns(cols: int) -> torch.Tensor:
    """Rows that steer an introsort into its corners: sorted, reversed, all equal, organ pipe, few
    distinct values, a sawtooth and runs, each in rows long enough for the block partition."""
    i = torch.arange(cols, dtype=torch.float64)
    g = torch.Generator().manual_seed(cols)
    rows = [i, cols - i, torch.ones(cols), torch.minimum(i, cols - i), i % 3, i % 257, (i // 64) % 5,
            torch.randint(0, 4, (cols,), generator=g).double()]  # fmt: skip
    return torch.stack(rows) * torch.where(i % 2 == 0, 1.0, -1.0)  # the sign never counts: |delta| is the key


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("cols", [300, 5003])
def test_della_keep_bits_on_adversarial_rows(dtype, cols):
    """Ranks are torch.argsort's, ties included, on rows built to reach the partition's block loop, its
    scalar tail and the insertion sort with long tie groups: the keep bits against the torch path's."""
    x = _row_patterns(cols).to(dtype).contiguous()
    base = torch.zeros_like(x)
    for density, eps in ((0.5, 0.2), (0.8, -0.1)):
        probs = ta.della_probabilities(x - base, density, eps, dtype, NAME, fast=False)
        keep = ta._draw(probs, SEED, NAME, 1, x.shape, "cpu", fast=False).reshape(-1)
        words = combine.della_keep_cpu(combine._native.dtype_tag(dtype), x.numel(), cols, base.data_ptr(),
                                       x.data_ptr(), density, eps, SEED, NAME, 1)  # fmt: skip
        packed = torch.frombuffer(bytearray(words.tobytes()), dtype=torch.uint8)
        got = ((packed.view(-1, 1) >> torch.arange(8, dtype=torch.uint8)) & 1).view(-1)[: x.numel()].bool()
        assert torch.equal(got, keep)


def test_native_plan_refuses_what_it_does_not_serve():
    assert combine.native_plan("della_magprune", {}, 10, 2, 3) is not None  # fp64 ranks
    assert combine.native_plan("della_magprune", {}, 24, 2, 2, (2, 3, 4)) is not None  # strided rows
    assert combine.native_plan("della_magprune", {}, 3, 2, 2, (3, 1)) is not None  # rows of one
    assert combine.native_plan("della_magprune", {}, 12, 2, 2, (3, 4)) is None
    assert combine.native_plan("della_magprune", {}, 10, 2, 1) is None
    assert combine.native_plan("random", {"precise_sparsify": True}, 10, 2, 2) is not None
    assert combine.native_plan("magnitude", {}, 10, 5, 2) is not None
    assert combine.native_plan("magnitude", {}, 10, 2, None) is not None
    assert combine.native_plan("magnitude", {}, 1 << 31, 2, 2) is not None
    assert combine.native_plan("magnitude", {"rescale": True}, 10, 2, 3) is not None  # fp64
    assert combine.native_plan("random", {"rescale": True}, 10, 2, 3) is None
    assert combine.native_plan("magnitude", {}, 10, 4, 2) is None


@pytest.mark.mergekit
@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "breadcrumbs_ties"])
def test_mergekit_merge_function_as_oracle(method):
    """mergekit 0.1.5's own get_task_vectors/sparsify/get_mask arithmetic (GeneralizedTaskArithmeticMerge's
    task) on the same tensors, bf16."""
    from mergekit import sparsify as mk
    from mergekit.merge_methods.generalized_task_arithmetic import get_mask

    base, xs = make(4001, 2, torch.bfloat16, "ties", seed=11)
    p = params_for(method, 2)
    got = check(method, base, xs, p)
    sp, cons, _ = METHODS[method]
    deltas = []
    for i, x in enumerate(xs):
        d = x - base
        if sp == "magnitude":
            d = mk.magnitude(d, density=p["density"][i], rescale_norm=None)
        elif sp == "magnitude_outliers":
            d = mk.magnitude_outliers(d, density=p["density"][i], rescale_norm=None, gamma=p["gamma"][i])
        deltas.append(d)
    stacked = torch.stack(deltas, dim=0)
    w = torch.tensor(p["weight"], dtype=stacked.dtype).view(-1, 1)
    stacked = stacked * w
    if cons:
        mask = get_mask(stacked, method=cons, mask_dtype=stacked.dtype)
        mixed = (stacked * mask).sum(dim=0)
        div = (w * mask).sum(dim=0)
        div[div == 0] = 1
    else:
        mixed = stacked.sum(dim=0)
        div = w.sum(dim=0)
        div[div.abs() < 1e-8] = 1
    if p["normalize"]:
        mixed = mixed / div
    theirs = (base + mixed).to(base.dtype)
    assert_bitwise(got, theirs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [1, 2, 3, 8])
@pytest.mark.parametrize("normalize", [True, False])
def test_linear_equals_compute(dtype, k, normalize):
    g = torch.Generator().manual_seed(k)
    xs = [torch.randn(70_001, generator=g).to(dtype) for _ in range(k)]
    if dtype != torch.float64:
        xs[0][::97] = float("nan")
        xs[-1][5::101] = float("inf")
    w = (0.3, 0.7, -0.2, 1.1, 0.5, 0.25, -1.0, 2.0)[:k]
    params = dict(weights=w, normalize=normalize)
    assert_bitwise(combine.linear_tensors(xs, w, normalize), LINEAR.compute(xs, params, None))
    assert combine.linear_tensors(xs[:1][:0] or [xs[0][:0]], w[:1], normalize).numel() == 0


# ----------------------------------------------------------------------------- the engine's native path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from fixtures_models import make_model

    root = tmp_path_factory.mktemp("combine_models")
    return {
        k: make_model(root / k, seed=s, tokenizer=k == "base")
        for k, s in (("base", 31), ("b", 32), ("c", 33))
    }


ENGINE = {
    "linear": "{weight: 0.6}|{weight: 0.4}",
    "task_arithmetic": "{weight: 0.6}|{weight: [0.2, 0.5]}",
    "ties": "{density: 0.5, weight: 0.6}|{density: [0.2, 0.9], weight: 0.4}",
    "breadcrumbs_ties": "{density: 0.8, gamma: 0.05, weight: 0.6}|{density: 0.6, weight: 0.4}",
    "dare_ties": "{density: 0.5, weight: 0.6}|{density: 0.3, weight: 0.4}",
    "dare_linear": "{density: 0.7, weight: 0.6}|{density: 0.4, weight: 0.4}",
    "della": "{density: 0.5, weight: 0.6, epsilon: 0.1}|{density: 0.4, weight: 0.4}",
    "della_linear": "{density: 0.7, weight: 0.6}|{density: 0.4, weight: 0.4, epsilon: 0.2}",
}


@pytest.mark.parametrize("method", sorted(ENGINE))
def test_engine_native_path_writes_the_torch_paths_bytes(models, tmp_path, monkeypatch, method):
    per_model = ENGINE[method].split("|")
    entries = "".join(f"  - model: {models[n]}\n    parameters: {p}\n" for n, p in zip(("b", "c"), per_model))
    base = "" if method == "linear" else f"base_model: {models['base']}\n"
    cfg = f"models:\n{entries}merge_method: {method}\n{base}dtype: bfloat16\n"
    calls = []
    real_ta, real_lin = combine.ta_merge_cpu, combine.linear_cpu
    monkeypatch.setattr(combine, "ta_merge_cpu", lambda *a, **k: calls.append(1) or real_ta(*a, **k))
    monkeypatch.setattr(combine, "linear_cpu", lambda *a, **k: calls.append(1) or real_lin(*a, **k))
    native = run_ours(cfg, tmp_path / "native", "--random-seed", "7", "--backend", "auto")
    assert calls, "the native kernels did not run"
    n_native = len(calls)
    torch_out = run_ours(cfg, tmp_path / "torch", "--random-seed", "7", "--backend", "torch")
    assert len(calls) == n_native  # the torch path does not call them
    assert (native / "model.safetensors").read_bytes() == (torch_out / "model.safetensors").read_bytes()
    assert read_model(native).keys() == read_model(torch_out).keys()


# ----------------------------------------------------------------------------- every CPU level

_LEVEL_CHECK = r"""
import hashlib, torch
from test_ops_combine import METHODS, NAME, SEED, make, params_for, bits
from mergekit_fast import _native
from mergekit_fast.methods import Context
from mergekit_fast.methods import _task_arithmetic as ta
from mergekit_fast.methods.linear import METHOD as LINEAR
from mergekit_fast.ops import combine
h = hashlib.sha256()
for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
    for method in sorted(METHODS):
        base, xs = make(20_011, 3, dtype, "ties" if dtype == torch.bfloat16 else "random", seed=1)
        p = params_for(method, 3, rescale=dtype != torch.float64, **{"lambda": 0.9})
        sp, cons, _ = METHODS[method]
        if sp == "della_magprune":
            if dtype == torch.float64:
                continue  # not served natively
            base, xs = base[:20_000].view(40, 500), [x[:20_000].view(40, 500) for x in xs]
        ref = ta.merge([base, *xs], p, sp, cons, Context(name=NAME, seed=SEED, threads=2), fast=False)
        got = combine.ta_merge_tensors(base, xs, p, sp, cons, name=NAME, seed=SEED)
        assert torch.equal(bits(got), bits(ref)), (dtype, method)
        h.update(bits(got).numpy().tobytes())
    lin = combine.linear_tensors([base, *xs], (0.3, 0.2, 0.4, 0.1), True)
    assert torch.equal(bits(lin), bits(LINEAR.compute([base, *xs], dict(weights=(0.3, 0.2, 0.4, 0.1)), None)))
    h.update(bits(lin).numpy().tobytes())
print(_native.C.cpu_isa()["in_use"], h.hexdigest())
"""


def test_every_cpu_level_computes_the_torch_paths_bits():
    import os
    import subprocess
    import sys
    from pathlib import Path

    from mergekit_fast import _native

    isa = _native.cpu_isa()
    if ";" not in isa["compiled"]:
        pytest.skip(f"this build has one CPU level ({isa['compiled']})")
    levels = ["baseline", "avx2", "avx512"]
    levels = levels[: levels.index(isa["supported"]) + 1] if isa["supported"] in levels else ["baseline"]
    digests = {}
    for level in levels:
        res = subprocess.run([sys.executable, "-c", _LEVEL_CHECK], capture_output=True, text=True, timeout=300,
                             cwd=Path(__file__).parent, env={**os.environ, "MERGEKIT_FAST_CPU_ISA": level})  # fmt: skip
        assert res.returncode == 0, f"{level}:\n{res.stderr[-3000:]}"
        in_use, digest = res.stdout.split()
        assert in_use == level
        digests[level] = digest
    assert len(set(digests.values())) == 1, digests
