"""mergekit 0.1.5 on mergekit_fast's kernels (``mergekit_fast.integrations.mergekit``).

Every method mergekit registers merges the same config with mergekit's own ``run_merge``, once on
mergekit's code and once after ``install()``: the outputs agree as in the method tests (same names,
shapes and dtypes; each tensor within one ulp of the output dtype at the terms' scale on at most 0.1% of
its elements -- in practice bit-identical but for SLERP's coefficient rounding), and our kernels are
the ones that ran. Random methods agree exactly once mergekit's torch.bernoulli is replaced by our
counter-based draws, and ``mergekit-yaml --random-seed S`` with ``install()`` writes the bytes
``mergekit-fast merge --random-seed S`` writes. Also: the in-memory API (batched small tensors),
``uninstall()`` restoring mergekit's objects, the fallbacks (logged once) and the
``python -m mergekit_fast.integrations.mergekit`` entry point.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fixtures_models import make_model
from helpers import read_model, run_mergekit, run_ours
from safetensors import safe_open
from safetensors.torch import save_file

from mergekit_fast import methods
from mergekit_fast.integrations import mergekit as mkf
from mergekit_fast.methods import rng
from mergekit_fast.ops._verify import ulp

pytestmark = pytest.mark.mergekit

MERGEKIT_METHODS = methods.MERGEKIT_METHODS


@pytest.fixture(autouse=True)
def _restore():
    """Every test leaves mergekit's registry as it found it."""
    from mergekit.merge_methods import registry

    before = dict(registry._METHODS)
    mkf._said.clear()
    yield
    mkf.uninstall()
    assert dict(registry._METHODS) == before


def fine_tune(src: Path, dst: Path, *, seed: int, density: float, scale: float = 0.02, dtype=None) -> Path:
    """A copy of ``src`` with a random ``density`` of every tensor's elements moved by scale * (0.5 shared
    + own) normal noise (the shared direction is the same for every seed, so angles are not all 90
    degrees and signs agree and disagree)."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, dst / f.name)
    out = {}
    with safe_open(str(src / "model.safetensors"), framework="pt") as st:
        for i, k in enumerate(sorted(st.keys())):
            x = st.get_tensor(k)
            g = torch.Generator().manual_seed(seed * 1000 + i)
            common = torch.randn(x.shape, generator=torch.Generator().manual_seed(i))
            own = torch.randn(x.shape, generator=g)
            keep = torch.rand(x.shape, generator=g) < density
            out[k] = (x.float() + keep * (0.5 * common + own) * scale).to(dtype or x.dtype)
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def m(tmp_path_factory):
    root = tmp_path_factory.mktemp("mergekit_integration")
    # MLP tensors of 64 x 1152 = 73,728 elements: above the sizes where the kernels change strategy
    # (parallel sparsification, SLERP's batched segments)
    kw = dict(num_layers=2, hidden_size=64, intermediate_size=1152, vocab_size=128)
    out = {"a": make_model(root / "a", seed=31, tokenizer=True, **kw)}
    for name, seed, density in (("b", 1, 0.5), ("c", 2, 0.3), ("d", 3, 0.7)):
        out[name] = fine_tune(out["a"], root / name, seed=seed, density=density)
    out["fa"] = make_model(root / "fa", seed=32, dtype=torch.float32, tokenizer=True, **kw)
    for name, seed, density in (("fb", 4, 0.5), ("fc", 5, 0.4)):
        out[name] = fine_tune(out["fa"], root / name, seed=seed, density=density)
    out["r"] = make_model(root / "r", seed=33, tokenizer=True, **kw)  # unrelated to a
    return out


def models_config(method: str, entries: list, *, base=None, params=None, dtype="bfloat16") -> str:
    lines = ["models:"]
    for path, p in entries:
        lines.append(f"  - model: {path}")
        if p:
            lines.append(f"    parameters: {json.dumps(p)}")
    lines.append(f"merge_method: {method}")
    if base:
        lines.append(f"base_model: {base}")
    if params:
        lines.append(f"parameters: {json.dumps(params)}")
    if dtype:
        lines.append(f"dtype: {dtype}")
    return "\n".join(lines) + "\n"


def assert_parity(ours: Path, theirs: Path, inputs: list[Path], *, fp32_rel: float | None = None) -> int:
    """Same names, shapes, dtypes and config.json; values within one ulp at the terms' scale on at most
    0.1% of the elements of each tensor (fp32 / fp64 outputs of the angle methods: within ``fp32_rel`` of
    the terms, as the SLERP tests allow: mergekit sums normalised fp32 chunks, we sum in fp64, so the
    coefficients agree to ~1e-7 and every element may move by an ulp). Returns how many tensors differ."""
    a, b = read_model(ours), read_model(theirs)
    assert sorted(a) == sorted(b), set(a) ^ set(b)
    ins = [read_model(p) for p in inputs]
    differing = 0
    for name in a:
        x, y = a[name], b[name]
        assert x.shape == y.shape and x.dtype == y.dtype, (name, x.dtype, y.dtype)
        if torch.equal(x, y):
            continue
        differing += 1
        terms = sum(i[name].double().abs() for i in ins if name in i)
        diff = (x.double() - y.double()).abs()
        if fp32_rel is not None and x.dtype in (torch.float32, torch.float64):
            assert float((diff / (terms + 1e-30)).max()) <= fp32_rel, name
            continue
        assert bool((diff <= ulp(terms, x.dtype)).all()), (name, float(diff.max()))
        assert (diff > 0).double().mean() <= 1e-3, name
    assert json.loads((ours / "config.json").read_text()) == json.loads((theirs / "config.json").read_text())
    return differing


@pytest.fixture
def calls(monkeypatch):
    """Counts the calls of our methods' compute / compute_many, by method name."""
    counts: dict[str, int] = {}
    for name in methods.names(internal=True):
        meth = methods.get(name)
        for attr in ("compute", "compute_many"):
            real = getattr(meth, attr)

            def counting(*args, _real=real, _name=name, **kwargs):
                counts[_name] = counts.get(_name, 0) + 1
                return _real(*args, **kwargs)

            monkeypatch.setattr(meth, attr, counting)
    return counts


# ----------------------------------------------------------------------------- every method, run_merge

# (id, method, base, [(model, per-model parameters)], shared parameters, dtype)
CASES = [
    ("linear", "linear", None, [("a", {"weight": 0.5}), ("b", {"weight": 0.3}), ("c", {"weight": 0.2})], None,
     "bfloat16"),
    ("linear-unnormalized-fp32", "linear", None, [("fa", {"weight": 1.0}), ("fb", {"weight": -0.5})],
     {"normalize": False}, "float32"),
    ("slerp-gradient", "slerp", "a", [("a", None), ("b", None)], {"t": [0.0, 0.3, 0.8, 1.0]}, "bfloat16"),
    ("slerp-fp32", "slerp", "fa", [("fa", None), ("fb", None)], {"t": 0.4}, "float32"),
    ("passthrough-scale", "passthrough", None, [("b", {"scale": 0.5})], None, "bfloat16"),
    ("task_arithmetic", "task_arithmetic", "a", [("b", {"weight": [0.3, 0.7]}), ("c", {"weight": 0.5})],
     {"lambda": 0.8}, "bfloat16"),
    ("ties-3", "ties", "a", [("b", {"density": [1, 0.7, 0.1], "weight": 1.0}),
                             ("c", {"density": 0.5, "weight": 0.5}), ("d", {"density": 0.3, "weight": 0.3})],
     {"int8_mask": True}, "bfloat16"),
    ("ties-fp32-unnormalized", "ties", "fa", [("fb", {"density": 0.4, "weight": 0.6}),
                                              ("fc", {"density": 0.6, "weight": 0.4})],
     {"normalize": False}, "float32"),
    ("breadcrumbs", "breadcrumbs", "a", [("b", {"density": 0.8, "gamma": 0.05, "weight": 0.6}),
                                         ("c", {"density": 0.9, "weight": 0.4})], None, "bfloat16"),
    ("breadcrumbs_ties", "breadcrumbs_ties", "a", [("b", {"density": 0.9, "gamma": 0.02, "weight": 0.5}),
                                                   ("c", {"density": 0.7, "weight": 0.5})],
     {"normalize": True}, "bfloat16"),
    ("dare_linear-density-1", "dare_linear", "a", [("b", {"weight": 0.6}), ("c", {"weight": 0.4})], None,
     "bfloat16"),
    ("sce", "sce", "a", [("b", None), ("c", None), ("d", None)], {"select_topk": 0.5}, "bfloat16"),
    ("model_stock", "model_stock", "a", [("b", None), ("c", None)], None, "bfloat16"),
    ("nuslerp", "nuslerp", None, [("a", {"weight": 0.3}), ("r", {"weight": 0.7})], None, "bfloat16"),
    ("nuslerp-base-rows", "nuslerp", "a", [("b", {"weight": 1.0}), ("c", {"weight": 0.5})],
     {"nuslerp_flatten": False}, "bfloat16"),
    ("multislerp", "multislerp", None, [("a", {"weight": 0.2}), ("b", {"weight": 0.5}), ("r", {"weight": 0.3})],
     None, "bfloat16"),
    ("karcher", "karcher", None, [("a", None), ("b", None), ("c", None)], None, "bfloat16"),
    ("nearswap", "nearswap", "a", [("b", None)], {"t": 0.01}, "bfloat16"),
    ("arcee_fusion", "arcee_fusion", "a", [("b", None)], None, "bfloat16"),
    ("ram", "ram", "a", [("b", None), ("c", None), ("d", None)], None, "bfloat16"),
    ("ramplus_tl", "ramplus_tl", "fa", [("fb", None), ("fc", None)], {"r": 0.5, "alpha": 0.5}, "float32"),
]  # fmt: skip

RANDOM = ("dare_ties", "dare_linear", "della", "della_linear")


def test_every_deterministic_method_has_a_case():
    assert {c[1] for c in CASES} >= set(MERGEKIT_METHODS) - set(RANDOM)


def _config_of(m, case) -> tuple[str, list[Path]]:
    _, method, base, entries, params, dtype = case
    cfg = models_config(method, [(m[k], p) for k, p in entries], base=m[base] if base else None, params=params,
                        dtype=dtype)  # fmt: skip
    inputs = [m[k] for k, _ in entries] + ([m[base]] if base else [])
    return cfg, inputs


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_run_merge_equals_mergekit(m, tmp_path, case, calls):
    cfg, inputs = _config_of(m, case)
    theirs = run_mergekit(cfg, tmp_path / "theirs")
    assert not calls
    served = mkf.install()
    assert sorted(served) == sorted(MERGEKIT_METHODS)
    ours = run_mergekit(cfg, tmp_path / "ours")
    mkf.uninstall()
    method = case[1]
    planned = "passthrough" if case[0] == "dare_linear-density-1" else method  # density 1: nothing drawn
    assert calls.get(method, 0) + calls.get(planned, 0) > 0, calls
    angles = method in ("slerp", "nuslerp", "multislerp", "karcher")  # coefficients rounded differently
    differing = assert_parity(ours, theirs, inputs, fp32_rel=1e-6 if angles else None)
    if not angles:
        assert differing == 0


# ----------------------------------------------------------------------------- random methods

RANDOM_CASES = [
    ("dare_ties", "a", [("b", {"density": 0.5, "weight": 0.6}), ("c", {"density": [0.3, 0.8], "weight": 0.4})],
     {"int8_mask": True}),
    ("dare_linear", "a", [("b", {"density": 0.6, "weight": 0.5}), ("c", {"density": 0.4, "weight": 0.3})],
     {"normalize": True}),
    ("della", "a", [("b", {"density": 0.6, "epsilon": 0.2, "weight": 0.5}), ("c", {"density": 0.4, "weight": 0.5})],
     None),
    ("della_linear", "a", [("b", {"density": 0.5, "epsilon": 0.1, "weight": 0.6}),
                           ("c", {"density": [0.3, 0.7], "epsilon": 0.25, "weight": 0.4})], {"lambda": 1.2}),
]  # fmt: skip
SEED = 1234


@pytest.fixture
def mergekit_draws_ours(monkeypatch):
    """mergekit's torch.bernoulli replaced by our counter-based draws for (SEED, output tensor name, index
    of the non-base model): the keep probabilities are mergekit's, the uniforms ours."""
    from mergekit.merge_methods import generalized_task_arithmetic as gta

    state = {"name": None, "stream": 0}
    merge_group = gta.GeneralizedTaskArithmeticMerge.merge_group

    def tracked(self, group, /, **params):
        state["name"], state["stream"] = group.metadata.name, 0
        return merge_group(self, group, **params)

    def draws(p, *args, **kwargs):
        keep = rng.bernoulli(p, SEED, state["name"], state["stream"], tuple(p.shape))
        state["stream"] += 1
        return keep.to(p.dtype)

    monkeypatch.setattr(gta.GeneralizedTaskArithmeticMerge, "merge_group", tracked)
    monkeypatch.setattr(torch, "bernoulli", draws)


@pytest.mark.parametrize("case", RANDOM_CASES, ids=[c[0] for c in RANDOM_CASES])
def test_random_methods_equal_mergekit_given_the_draws(m, tmp_path, case, mergekit_draws_ours, calls):
    method, base, entries, params = case
    cfg = models_config(method, [(m[k], p) for k, p in entries], base=m[base], params=params)
    # mergekit on one thread: torch's multithreaded bf16 sums round per-thread partials to bf16, so its
    # L1 rescale factor of a large tensor depends on the thread count (ours sums in fp64, in fixed blocks;
    # the documented deliberate difference); on one thread it is the fp32 sum rounded once, as ours.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        theirs = run_mergekit(cfg, tmp_path / "theirs")
    finally:
        torch.set_num_threads(threads)
    mkf.install()
    torch.manual_seed(SEED)  # what mergekit-yaml --random-seed SEED does (transformers.set_seed)
    ours = run_mergekit(cfg, tmp_path / "ours")
    assert calls.get(method, 0) > 0
    assert assert_parity(ours, theirs, [m[k] for k, _ in entries] + [m[base]]) == 0


def test_random_method_statistics_with_mergekits_own_draws(m, tmp_path):
    """Without forcing the draws: the kept fraction of every large delta matches mergekit's within binomial
    error, and the surviving values are the same rescaled deltas."""
    cfg = models_config("dare_linear", [(m["b"], {"density": 0.3, "weight": 1.0})], base=m["a"],
                        params={"rescale": False})  # fmt: skip
    torch.manual_seed(5)
    theirs = read_model(run_mergekit(cfg, tmp_path / "theirs"))
    mkf.install()
    torch.manual_seed(6)
    ours = read_model(run_mergekit(cfg, tmp_path / "ours"))
    base, other = read_model(m["a"]), read_model(m["b"])
    checked = 0
    for name, x in ours.items():
        delta = other[name].float() - base[name].float()
        moved = delta != 0
        n = int(moved.sum())
        if n < 4096:
            continue
        kept_ours = ((x.float() - base[name].float()) != 0) & moved
        kept_theirs = ((theirs[name].float() - base[name].float()) != 0) & moved
        sd = (0.3 * 0.7 / n) ** 0.5
        assert abs(float(kept_ours.sum()) / n - 0.3) < 6 * sd, name
        assert abs(float(kept_ours.sum()) / n - float(kept_theirs.sum()) / n) < 6 * sd * 2**0.5, name
        assert not torch.equal(kept_ours, kept_theirs)  # different generators
        checked += 1
    assert checked >= 4


def test_mergekit_yaml_with_a_seed_writes_what_mergekit_fast_writes(m, tmp_path):
    """``--random-seed S`` seeds torch's generator (transformers.set_seed), whose initial_seed() keys our draws:
    the same bytes as ``mergekit-fast merge --random-seed S``."""
    cfg = models_config("dare_ties", [(m["b"], {"density": 0.5, "weight": 0.6}),
                                      (m["c"], {"density": 0.3, "weight": 0.4})], base=m["a"])  # fmt: skip
    path = tmp_path / "c.yml"
    path.write_text(cfg)
    os.environ["HF_HUB_OFFLINE"] = "1"
    with pytest.raises(SystemExit) as exit_:
        mkf.main([str(path), str(tmp_path / "yaml"), "--random-seed", "7", "--no-write-model-card",
                  "--clone-tensors", "--quiet"])  # fmt: skip
    assert exit_.value.code in (0, None)
    assert mkf.is_installed("dare_ties")
    ours = read_model(run_ours(cfg, tmp_path / "fast", "--random-seed", "7"))
    theirs = read_model(tmp_path / "yaml")
    assert sorted(ours) == sorted(theirs)
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k


# ----------------------------------------------------------------------------- the in-memory API


def _sd(seed: int, dtype=torch.bfloat16, n: int = 60) -> dict:
    g = torch.Generator().manual_seed(seed)
    sd = {f"small.{i}": torch.randn(24 + i % 5, 16, generator=g) for i in range(n)}
    sd["big"] = torch.randn(300, 400, generator=g)
    sd["norm"] = 1 + 0.1 * torch.randn(16, generator=g)
    return {k: v.to(dtype) for k, v in sd.items()}


def test_merge_state_dicts_batches_small_tensors_on_our_kernel(monkeypatch):
    from mergekit.merge_methods.api import merge_state_dicts

    from mergekit_fast.ops import slerp as slerp_op

    launches = []
    real = slerp_op.slerp_batched

    def counting(ts, As, Bs, **kw):
        launches.append(len(As))
        return real(ts, As, Bs, **kw)

    monkeypatch.setattr(slerp_op, "slerp_batched", counting)
    a, b = _sd(1), _sd(2)
    theirs = merge_state_dicts({"x": a, "y": b}, "slerp", parameters={"t": 0.3}, base="x")
    mkf.install()
    ours = merge_state_dicts({"x": a, "y": b}, "slerp", parameters={"t": 0.3}, base="x")
    assert sorted(launches) == [1, 61]  # the 61 small tensors in one launch, "big" alone
    assert list(ours) == list(theirs)
    for k in ours:
        x, y = ours[k], theirs[k]
        assert x.dtype == y.dtype and x.shape == y.shape
        diff = (x.double() - y.double()).abs()
        assert bool((diff <= ulp(a[k].double().abs() + b[k].double().abs(), x.dtype)).all()), k
        assert (diff > 0).double().mean() <= 1e-3, k


@pytest.mark.parametrize("method, params", [
    ("linear", {"weight": {"p": 1.0, "q": 2.0, "r": -0.5}, "normalize": False}),
    ("ties", {"weight": [0.5, 0.3], "density": {"q": 0.4, "r": 0.7}}),
    ("task_arithmetic", {"weight": 1.0, "lambda": 0.5}),
    ("breadcrumbs_ties", {"weight": 0.5, "density": 0.9, "gamma": 0.05}),
])  # fmt: skip
def test_merge_state_dicts_and_merge_tensors_equal_mergekit(method, params, calls):
    from mergekit.merge_methods.api import merge_state_dicts, merge_tensors
    from mergekit.merge_methods.base import PerGroupValues

    sds = {"p": _sd(1, n=4), "q": _sd(2, n=4), "r": _sd(3, torch.float32, n=4)}  # bf16 and fp32: promoted
    base = None if method == "linear" else "p"
    group_params = dict(params)
    if method != "linear":
        group_params["normalize"] = PerGroupValues([i % 2 == 0 for i in range(len(sds["p"]))])
    for dtype, out_dtype in ((None, None), (torch.float32, torch.bfloat16)):
        theirs = merge_state_dicts(
            sds, method, parameters=group_params, base=base, dtype=dtype, out_dtype=out_dtype
        )
        t_one = merge_tensors([sd["big"] for sd in sds.values()], method, parameters=params, ids=list(sds),
                              base_index=None if base is None else 0, name="big", out_dtype=out_dtype)  # fmt: skip
        mkf.install()
        ours = merge_state_dicts(
            sds, method, parameters=group_params, base=base, dtype=dtype, out_dtype=out_dtype
        )
        o_one = merge_tensors([sd["big"] for sd in sds.values()], method, parameters=params, ids=list(sds),
                              base_index=None if base is None else 0, name="big", out_dtype=out_dtype)  # fmt: skip
        mkf.uninstall()
        assert list(ours) == list(theirs)
        for k in ours:
            assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]), (method, k)
        assert o_one.dtype == t_one.dtype and torch.equal(o_one, t_one)
    assert calls.get(method, 0) > 0


# ----------------------------------------------------------------------------- install, uninstall, fallbacks


def test_install_keeps_the_specs_and_uninstall_restores_the_objects():
    from mergekit.merge_methods import registry

    before = list(registry._METHODS.items())
    served = mkf.install()
    assert sorted(served) == sorted(MERGEKIT_METHODS) == mkf.served()
    assert mkf.install() == served  # again: no change
    for name, original in before:
        wrapped = registry.get(name)
        assert wrapped is not original and wrapped.spec is original.spec
        assert wrapped.supports_batching == original.supports_batching
        assert mkf.is_installed(name)
    assert (
        registry.get("ties").consensus_method
        == before[[n for n, _ in before].index("ties")][1].consensus_method
    )
    assert [n for n, _ in registry._METHODS.items()] == [n for n, _ in before]
    mkf.uninstall()
    assert list(registry._METHODS.items()) == before
    assert all(registry._METHODS[n] is o for n, o in before)
    assert not mkf.is_installed()


def test_install_a_subset():
    from mergekit.merge_methods import registry

    assert mkf.install(["ties", "slerp"]) == ["slerp", "ties"]
    assert not mkf.is_installed("linear") and type(registry.get("linear")).__name__ == "BatchedMergeMethod"
    with pytest.raises(KeyError, match="no merge method 'nope'"):
        mkf.install(["nope"])


def test_a_method_we_lack_keeps_mergekits_code_and_says_so_once(caplog):
    import typing

    from mergekit.merge_methods import registry
    from mergekit.merge_methods.api import merge_tensors
    from mergekit.merge_methods.base import TensorGroup
    from mergekit.merge_methods.easy_define import merge_method

    def halfsum(group: TensorGroup, scale: float = 0.5) -> torch.Tensor:
        return sum(group.tensors) * scale

    halfsum.__annotations__ = typing.get_type_hints(halfsum, localns={"TensorGroup": TensorGroup})
    custom = merge_method(halfsum, name="halfsum_test")
    registry.register(custom)
    try:
        with caplog.at_level(logging.WARNING, logger="mergekit_fast"):
            mkf.install()
            mkf.uninstall()
            mkf.install()
        said = [r.getMessage() for r in caplog.records if "halfsum_test" in r.getMessage()]
        assert len(said) == 1 and "not implemented by mergekit_fast" in said[0]
        assert registry.get("halfsum_test") is custom and not mkf.is_installed("halfsum_test")
        x = torch.ones(3)
        assert torch.equal(merge_tensors([x, x], "halfsum_test"), x)
    finally:
        mkf.uninstall()
        del registry._METHODS["halfsum_test"]


def test_inputs_that_require_grad_run_on_mergekits_code(caplog, calls):
    from mergekit.merge_methods.api import merge_state_dicts

    torch.manual_seed(0)
    mods = [torch.nn.Linear(8, 4) for _ in range(2)]
    theirs = merge_state_dicts(mods, "linear", parameters={"weight": [0.3, 0.7]})
    mkf.install()
    with caplog.at_level(logging.WARNING, logger="mergekit_fast"):
        ours = merge_state_dicts(mods, "linear", parameters={"weight": [0.3, 0.7]})
        again = merge_state_dicts(mods, "linear", parameters={"weight": [0.3, 0.7]})
    said = [r.getMessage() for r in caplog.records if "require grad" in r.getMessage()]
    assert len(said) == 1 and "linear" in said[0]
    assert not calls
    for k in ours:
        assert (
            ours[k].grad_fn is not None and torch.equal(ours[k], theirs[k]) and torch.equal(again[k], ours[k])
        )
    with torch.no_grad():  # without grad mode our kernels serve the same modules
        merge_state_dicts(mods, "linear", parameters={"weight": [0.3, 0.7]})
    assert calls.get("linear", 0) > 0


def test_values_we_refuse_get_mergekits_own_behaviour(caplog):
    """A negative DARE density is refused in our configs; mergekit's code then fails its own way."""
    from mergekit.merge_methods.api import merge_tensors

    x, y = torch.randn(64), torch.randn(64)
    kwargs = dict(parameters={"weight": 1.0, "density": -0.5}, base_index=0, name="w")
    with pytest.raises(Exception) as theirs:
        merge_tensors([x, y], "dare_linear", **kwargs)
    mkf.install()
    with caplog.at_level(logging.WARNING, logger="mergekit_fast"):
        with pytest.raises(type(theirs.value)) as ours:
            merge_tensors([x, y], "dare_linear", **kwargs)
    assert str(ours.value) == str(theirs.value)
    assert any(
        "refuses these values" in r.getMessage() and "negative" in r.getMessage() for r in caplog.records
    )


def test_an_unusual_dtype_runs_on_mergekits_code(caplog, calls):
    from mergekit.merge_methods.api import merge_tensors

    x = torch.randn(40).to(torch.float8_e4m3fn)
    mkf.install()
    with caplog.at_level(logging.WARNING, logger="mergekit_fast"):
        ours = merge_tensors([x], "passthrough")
    assert ours is x and not calls  # mergekit's passthrough returns its input
    assert any("float8" in r.getMessage() for r in caplog.records)


# ----------------------------------------------------------------------------- the command line


def test_python_dash_m_runs_mergekit_yaml_on_our_kernels(m, tmp_path):
    cfg, inputs = _config_of(m, CASES[[c[0] for c in CASES].index("ties-3")])
    path = tmp_path / "c.yml"
    path.write_text(cfg)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    help_ = subprocess.run([sys.executable, "-m", "mergekit_fast.integrations.mergekit", "--help"],
                           capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert help_.returncode == 0 and "mergekit-yaml" in help_.stdout and "CONFIG_FILE" in help_.stdout
    proc = subprocess.run([sys.executable, "-m", "mergekit_fast.integrations.mergekit", str(path),
                           str(tmp_path / "cli"), "--no-write-model-card", "--clone-tensors", "--quiet", "-v"],
                          capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = run_mergekit(cfg, tmp_path / "theirs")
    assert assert_parity(tmp_path / "cli", theirs, inputs) == 0
