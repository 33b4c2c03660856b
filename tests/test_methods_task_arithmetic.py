"""The task-arithmetic family (task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties,
della, della_linear) against mergekit 0.1.5.

- Deterministic configs: ``mergekit-fast merge`` and mergekit merge the same tiny models (2 and 3 models
  plus a base, Llama and Qwen2 shapes, bf16 and fp32, gradients and filters, normalize on and off); every
  tensor within 1 ulp of mergekit's, at the terms' scale (the method's verify_scale), on at most 0.1% of
  elements (in practice: bit-identical).
- Random configs: with mergekit's torch.bernoulli replaced by our counter-based draws (the mask forced
  equal), the whole merge equals mergekit's; with mergekit's own generator, per-tensor moments agree
  within sampling error; kept fractions are within binomial bounds; the rescale is exact given the mask.
- The same seed gives byte-identical models over backends, thread counts and job orders.
- The tie rule of magnitude selections (libstdc++'s introsort, as torch's CPU sort) on bf16 deltas.
- What mergekit refuses fails in the config, with the key path; what it accepts gives its result.
"""

from __future__ import annotations

import math

import pytest
import torch
from fixtures_models import make_model
from helpers import logits, read_model, run_mergekit, run_ours

from mergekit_fast import cli, methods
from mergekit_fast.config import parse_config
from mergekit_fast.methods import Context, rng
from mergekit_fast.methods import _task_arithmetic as ta
from mergekit_fast.ops._verify import ulp
from mergekit_fast.plan import build_plan

pytestmark = pytest.mark.mergekit

FAMILY = ("task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della",
          "della_linear")  # fmt: skip


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("ta_models")
    out = {f"llama_{k}": make_model(root / f"llama_{k}", seed=s, tokenizer=k == "base")
           for k, s in (("base", 11), ("b", 12), ("c", 13), ("d", 14))}  # fmt: skip
    out.update({f"qwen_{k}": make_model(root / f"qwen_{k}", "qwen2", seed=s, dtype=torch.float32, tokenizer=k == "base")
                for k, s in (("base", 21), ("b", 22), ("c", 23), ("d", 24))})  # fmt: skip
    return out


def config(
    models, arch: str, method: str, per_model: list[str], shared: str = "", dtype: str = "bfloat16"
) -> str:
    """models: base + one entry per given parameter block (YAML flow mappings)."""
    names = ["b", "c", "d"][: len(per_model)]
    entries = "".join(
        f"  - model: {models[f'{arch}_{n}']}\n    parameters: {p}\n" for n, p in zip(names, per_model)
    )
    text = f"models:\n{entries}merge_method: {method}\nbase_model: {models[f'{arch}_base']}\ndtype: {dtype}\n"
    if shared:
        text += f"parameters: {shared}\n"
    return text


def assert_parity(cfg: str, ours, theirs, *, max_frac: float = 1e-3, max_ulps: float = 1.0) -> None:
    """Same names, shapes, dtypes and config.json; each tensor within ``max_ulps`` of the output dtype at the
    terms' scale (the method's verify_scale over the planned inputs and parameters) on at most ``max_frac``
    of its elements."""
    a, b = read_model(ours), read_model(theirs)
    assert sorted(a) == sorted(b), set(a) ^ set(b)
    plan = build_plan(parse_config(cfg))
    planned = {t.name: t for t in plan.tensors}
    for name in a:
        x, y = a[name], b[name]
        assert x.shape == y.shape and x.dtype == y.dtype, name
        if torch.equal(x, y):
            continue
        t = planned[name]
        ins = [read_model(plan.sources[r.model].path)[r.tensor].to(t.in_dtype.torch) for r in t.inputs]
        scale = methods.get(t.method).verify_scale(ins, dict(t.params))
        diff = (x.double() - y.double()).abs()
        assert bool((diff <= max_ulps * ulp(scale, x.dtype)).all()), (name, float(diff.max()))
        assert (diff > 0).double().mean() <= max_frac, (name, float((diff > 0).double().mean()))
    assert (ours / "config.json").read_text() and read_json(ours) == read_json(theirs)
    for p in plan.sources.values():
        p.close()


def read_json(path):
    import json

    return json.loads((path / "config.json").read_text())


# ----------------------------------------------------------------------------- deterministic parity

DETERMINISTIC = {
    "task_arithmetic-llama-bf16-gradients": ("llama", "task_arithmetic",
        ["{weight: [0.3, 0.7]}", "{weight: 0.5}"], "{lambda: 0.8}", "bfloat16"),
    "task_arithmetic-qwen-fp32-3-normalize-negative": ("qwen", "task_arithmetic",
        ["{weight: 1.0}", "{weight: -0.3}", "{weight: [0.2, 0.6]}"], "{normalize: true}", "float32"),
    "ties-llama-bf16-gradients": ("llama", "ties",
        ["{density: [1, 0.7, 0.1], weight: 1.0}", "{density: 0.5, weight: [0, 0.3, 0.7, 1]}"],
        "{int8_mask: true}", "bfloat16"),
    "ties-qwen-fp32-3-filters-unnormalized": ("qwen", "ties",
        ["{density: [{filter: mlp, value: 0.5}, {value: 0.3}], weight: 0.4}", "{density: 0.6, weight: 0.35}",
         "{density: 0.2, weight: [0.5, 0.1]}"], "{normalize: false}", "float32"),
    "ties-llama-bf16-3-rescale": ("llama", "ties",
        ["{density: 0.4, weight: 0.5}", "{density: 0.3, weight: 0.3}", "{density: 0.7, weight: 0.2}"],
        "{rescale: true}", "bfloat16"),
    "breadcrumbs-llama-bf16": ("llama", "breadcrumbs",
        ["{density: 0.8, gamma: 0.05, weight: 0.6}", "{density: [0.9, 0.5], weight: 0.4}"], "", "bfloat16"),
    "breadcrumbs_ties-qwen-fp32-3-normalize": ("qwen", "breadcrumbs_ties",
        ["{density: [0.9, 0.5], gamma: 0.02, weight: 0.5}", "{density: 0.7, weight: 0.3}",
         "{density: 0.6, gamma: 0.1, weight: 0.2}"], "{normalize: true}", "float32"),
    # what mergekit accepts: density above 1, at and below 0, negative weights, outlier slices that wrap
    "ties-edges-accepted": ("llama", "ties",
        ["{density: 1.5, weight: 0.7}", "{density: 0.0, weight: -0.4}", "{density: -0.5, weight: 0.3}"],
        "", "bfloat16"),
    "breadcrumbs-edges-accepted": ("llama", "breadcrumbs",
        ["{density: -0.5, gamma: 2.0, weight: 0.7}", "{density: 0.5, gamma: -0.5, weight: 0.3}"],
        "{rescale: true}", "bfloat16"),
    # random methods with nothing drawn (density >= 1) are deterministic
    "dare_ties-density-1": ("llama", "dare_ties", ["{weight: 0.6}", "{weight: 0.4, density: 1.2}"], "",
        "bfloat16"),
    "dare_linear-density-0-and-1": ("qwen", "dare_linear", ["{weight: 0.6, density: 0.0}", "{weight: 0.4}"],
        "{normalize: true}", "float32"),
    "della_linear-density-1-fp32": ("qwen", "della_linear", ["{weight: 0.6}", "{weight: 0.4}"],
        "{normalize: true, lambda: 1.3}", "float32"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(DETERMINISTIC))
def test_deterministic_parity(models, tmp_path, case):
    arch, method, per_model, shared, dtype = DETERMINISTIC[case]
    cfg = config(models, arch, method, per_model, shared, dtype)
    ours = run_ours(cfg, tmp_path / "ours", "--verify", "all", "--random-seed", "1")
    theirs = run_mergekit(cfg, tmp_path / "theirs")
    assert_parity(cfg, ours, theirs)


# Two fp32 sums each ~1 ulp off the exact sums make a factor ~2 ulps off; 4 leaves room for the roundings after.
FP32_RESCALE_ULPS = 4.0


def test_ties_fp32_rescale_within_a_few_ulps(models, tmp_path):
    # The rescale factor is ||d||_1 / ||kept||_1. Ours sums in fp64 (fixed order) and rounds to fp32; mergekit's
    # torch fp32 sums are each about an fp32 ulp off the exact sums (measured: 12.3096285 for 12.3096291 on
    # 512 elements), so its factor is up to ~2 ulps off and so is every kept element: the bound is FP32_RESCALE_ULPS
    # of the terms on any element, not 1 ulp on 0.1% of them.
    cfg = config(models, "qwen", "ties", ["{density: 0.4, weight: 0.5}", "{density: 0.3, weight: 0.5}"],
                 "{rescale: true}", "float32")  # fmt: skip
    ours = run_ours(cfg, tmp_path / "ours", "--verify", "all")
    assert_parity(cfg, ours, run_mergekit(cfg, tmp_path / "theirs"), max_frac=1.0, max_ulps=FP32_RESCALE_ULPS)


def test_deterministic_logits_equal(models, tmp_path):
    cfg = config(models, "llama", "ties", ["{density: 0.5, weight: 0.6}", "{density: 0.3, weight: 0.4}"])
    ours = run_ours(cfg, tmp_path / "ours")
    theirs = run_mergekit(cfg, tmp_path / "theirs")
    ids = torch.randint(0, 128, (2, 7))
    assert torch.equal(logits(ours, ids), logits(theirs, ids))


# ----------------------------------------------------------------------------- random methods

RANDOM = {
    "dare_ties-llama-bf16": ("llama", "dare_ties", ["{density: 0.5, weight: 0.6}", "{density: [0.3, 0.8], weight: 0.4}"],
                             "", "bfloat16"),
    "dare_linear-qwen-fp32-3-normalize": ("qwen", "dare_linear",
        ["{density: 0.6, weight: 0.5}", "{density: 0.4, weight: 0.3}", "{density: 0.7, weight: 0.2}"],
        "{normalize: true}", "float32"),
    "della-llama-bf16": ("llama", "della", ["{density: 0.6, epsilon: 0.2, weight: 0.5}",
                                            "{density: 0.4, weight: 0.5}"], "", "bfloat16"),
    "della_linear-qwen-fp32": ("qwen", "della_linear", ["{density: 0.5, epsilon: 0.1, weight: 0.6}",
                                                        "{density: [0.3, 0.7], epsilon: 0.25, weight: 0.4}"],
                               "{lambda: 1.2}", "float32"),
}  # fmt: skip
SEED = 1234


@pytest.fixture
def mergekit_draws_ours(monkeypatch):
    """mergekit's torch.bernoulli replaced by our counter-based draws: the keep probabilities mergekit computes
    (its full_like(density) for DARE, its per-rank probabilities for DELLA) decide with our uniforms for
    (seed, output tensor name, index of the non-base model)."""
    from mergekit.merge_methods import generalized_task_arithmetic as gta

    state = {"name": None, "stream": 0}
    merge_group = gta.GeneralizedTaskArithmeticMerge.merge_group

    def tracked(self, group, /, **params):
        state["name"], state["stream"] = group.metadata.name, 0
        return merge_group(self, group, **params)

    def draws(p, *args, **kwargs):
        assert not args and not kwargs
        keep = rng.bernoulli(p, SEED, state["name"], state["stream"], tuple(p.shape))
        state["stream"] += 1
        return keep.to(p.dtype)

    monkeypatch.setattr(gta.GeneralizedTaskArithmeticMerge, "merge_group", tracked)
    monkeypatch.setattr(torch, "bernoulli", draws)


@pytest.mark.parametrize("case", sorted(RANDOM))
def test_random_parity_with_the_mask_forced_equal(models, tmp_path, case, mergekit_draws_ours):
    arch, method, per_model, shared, dtype = RANDOM[case]
    cfg = config(models, arch, method, per_model, shared, dtype)
    ours = run_ours(cfg, tmp_path / "ours", "--random-seed", str(SEED), "--verify", "all")
    theirs = run_mergekit(cfg, tmp_path / "theirs")
    # Everything that is not drawn is mergekit's arithmetic. bf16: identical (mergekit's bf16 L1 sums of these
    # small tensors are fp32 sums rounded once to bf16, as ours). fp32: the rescale factor may differ by a few
    # fp32 ulps (see test_ties_fp32_rescale_within_a_few_ulps).
    if dtype == "bfloat16":
        assert_parity(cfg, ours, theirs)
    else:
        assert_parity(cfg, ours, theirs, max_frac=1.0, max_ulps=FP32_RESCALE_ULPS)


@pytest.mark.parametrize("case", ["dare_ties-llama-bf16", "della-llama-bf16"])
def test_random_moments_match_mergekit(models, tmp_path, case):
    """With mergekit's own generator: per tensor, the mean and variance of the merged delta (out - base)
    agree within sampling error (6 standard errors of the difference of two independent estimates; the
    variance's standard error from the sample's fourth moment)."""
    arch, method, per_model, shared, dtype = RANDOM[case]
    cfg = config(models, arch, method, per_model, shared, dtype)
    ours = read_model(run_ours(cfg, tmp_path / "ours", "--random-seed", "99"))
    torch.manual_seed(5)
    theirs = read_model(run_mergekit(cfg, tmp_path / "theirs"))
    base = read_model(models[f"{arch}_base"])
    checked = 0
    for name, x in ours.items():
        if x.numel() < 1024:
            continue
        d1, d2 = (
            (x.double() - base[name].double()).view(-1),
            (theirs[name].double() - base[name].double()).view(-1),
        )
        n = d1.numel()
        for d in (d1, d2):
            assert torch.isfinite(d).all()
        var = 0.5 * (d1.var() + d2.var())
        m4 = 0.5 * (((d1 - d1.mean()) ** 4).mean() + ((d2 - d2.mean()) ** 4).mean())
        se_mean = math.sqrt(2 * float(var) / n)
        se_var = math.sqrt(2 * max(float(m4 - var**2), 0.0) / n)
        assert abs(float(d1.mean() - d2.mean())) <= 6 * se_mean + 1e-12, name
        assert abs(float(d1.var() - d2.var())) <= 6 * se_var + 1e-12, name
        checked += 1
    assert checked >= 20


def _delta(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = (torch.randn(shape, generator=g) * 0.02).to(dtype)
    b = (torch.randn(shape, generator=g) * 0.02).to(dtype)
    return b - a


def _params(**kw):
    return {k: (v,) if k in ("density", "gamma", "epsilon") else v for k, v in kw.items()}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dare_kept_fraction_and_exact_rescale(dtype):
    delta = _delta((384, 512), dtype)
    n = delta.numel()
    ctx = Context(name="model.layers.3.mlp.up_proj.weight", seed=77)
    for density in (0.1, 0.53, 0.9):
        out = ta.sparsify(delta, 0, _params(density=density, rescale=True), ta.RANDOM, ctx, fast=True)
        keep = out != 0
        assert not (keep & (delta == 0)).any()
        p = float(
            torch.tensor(density, dtype=ta.work_dtype(dtype, False))
        )  # mergekit: density in the work dtype
        kept = int((keep | (delta == 0)).sum())  # a zero delta's draw cannot be seen: count it as kept or not
        lo, hi = int((keep).sum()), kept
        bound = 5 * math.sqrt(n * p * (1 - p))  # 5 sigma of Binomial(n, p)
        assert lo - bound <= n * p <= hi + bound, (density, lo, hi, n * p)
        # the rescale, exactly: masked delta times ||d||_1 / ||masked||_1, both norms rounded to the work dtype
        mask = rng.bernoulli(p, 77, ctx.name, 0, delta.shape)
        assert torch.equal(keep, mask & (delta != 0))
        masked = delta * mask.to(dtype)
        before = math.fsum(delta.double().abs().view(-1).tolist())
        after = math.fsum(masked.double().abs().view(-1).tolist())
        factor = torch.tensor(before, dtype=torch.float64).to(dtype) / torch.tensor(
            after, dtype=torch.float64
        ).to(dtype)
        assert torch.equal(out, (masked * factor).to(dtype))
        # and mergekit's own rescaled_masked_tensor with this mask (one thread: torch's sum of a large tensor
        # otherwise depends on the thread count): bf16 identical, fp32 within the few ulps its fp32 sums are off
        from mergekit.sparsify import RescaleNorm, rescaled_masked_tensor

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            theirs = rescaled_masked_tensor(delta, mask.to(dtype), RescaleNorm.l1)
        finally:
            torch.set_num_threads(threads)
        if dtype == torch.bfloat16:
            assert torch.equal(out, theirs)
        else:
            # relative to the value: the factors differ by ~2 fp32 ulps (each norm ~1 ulp off), plus the roundings
            # of the two products (1/2 ulp each); ulps of a value just below a power of two are half as large
            kept = theirs != 0
            rel = (out[kept].double() - theirs[kept].double()).abs() / theirs[kept].double().abs()
            assert float(rel.max()) <= 2 * FP32_RESCALE_ULPS * 2.0**-24


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_della_kept_fraction_follows_the_rank_probabilities(dtype):
    delta = _delta((256, 768), dtype, seed=3)
    ctx = Context(name="model.layers.0.self_attn.q_proj.weight", seed=5)
    density, eps = 0.4, 0.3
    wd = ta.work_dtype(dtype, False)
    probs = ta.della_probabilities(delta, density, eps, wd, ctx.name, fast=False).double()
    assert abs(float(probs.mean()) - density) < 0.01
    assert float(probs.min()) == pytest.approx(density - eps, abs=1e-2)
    assert float(probs.max()) == pytest.approx(density + eps, abs=1e-2)
    out = ta.sparsify(
        delta, 0, _params(density=density, epsilon=eps, rescale=False), ta.DELLA, ctx, fast=True
    )
    keep = (out != 0) | (delta == 0)
    # by magnitude quartile within each row: kept fraction within 5 sigma of the Poisson-binomial mean
    rank = delta.abs().float().argsort(dim=1).argsort(dim=1)
    for q in range(4):
        sel = (rank >= q * 192) & (rank < (q + 1) * 192)
        p = probs[sel]
        mean, sd = float(p.sum()), math.sqrt(float((p * (1 - p)).sum()))
        assert abs(int(keep[sel].sum()) - mean) <= 5 * sd, q
    # against mergekit's della_magprune with its torch.bernoulli replaced by our draws: identical
    from mergekit import sparsify as mk

    real = torch.bernoulli
    try:
        torch.bernoulli = lambda p: rng.bernoulli(p, 5, ctx.name, 0, tuple(p.shape)).to(p.dtype)
        theirs = mk.della_magprune(delta, density, eps, None)
    finally:
        torch.bernoulli = real
    assert torch.equal(out, theirs)


def test_precise_sparsify_is_off_by_default_and_changes_only_precision():
    delta = _delta((64, 4096), torch.bfloat16, seed=9)
    ctx = Context(name="t", seed=3)
    params = _params(density=0.3, epsilon=0.2, rescale=True)
    default = ta.sparsify(delta, 0, params, ta.DELLA, ctx, fast=True)
    precise = ta.sparsify(delta, 0, dict(params, precise_sparsify=True), ta.DELLA, ctx, fast=True)
    # bf16 ranks above 256 round (mergekit's), fp32 ones do not: the probabilities differ in the last bits,
    # the kept sets almost everywhere agree, the values agree to bf16 rounding of the factor.
    probs_bf16 = ta.della_probabilities(delta, 0.3, 0.2, torch.bfloat16, "t", fast=True)
    probs_fp32 = ta.della_probabilities(delta, 0.3, 0.2, torch.float32, "t", fast=True)
    assert torch.unique(probs_bf16).numel() < torch.unique(probs_fp32).numel()
    both = (default != 0) & (precise != 0)
    assert both.double().sum() / (precise != 0).double().sum() > 0.99
    torch.testing.assert_close(default[both].float(), precise[both].float(), rtol=2**-7, atol=0)
    assert "precise_sparsify" in {p.name for p in methods.get("della").params}
    assert "precise_sparsify" not in {p.name for p in methods.get("task_arithmetic").params}


@pytest.mark.parametrize("method", ["dare_ties", "della"])
def test_same_seed_same_bytes_everywhere(models, tmp_path, monkeypatch, method):
    """Backends torch / auto, -j 1 / -j 2, jobs in order / reversed: byte-identical files."""
    from mergekit_fast import engine

    per_model = ["{density: 0.5, weight: 0.6}", "{density: 0.3, weight: 0.4}"]
    cfg = config(models, "llama", method, per_model)
    runs = {
        "torch-j1": ("--backend", "torch", "-j", "1"),
        "auto-j2": ("--backend", "auto", "-j", "2"),
    }
    outs = {k: run_ours(cfg, tmp_path / k, "--random-seed", "42", *v) for k, v in runs.items()}
    real = engine.make_jobs
    monkeypatch.setattr(engine, "make_jobs", lambda plan: list(reversed(real(plan))))
    outs["reversed"] = run_ours(cfg, tmp_path / "reversed", "--random-seed", "42", "-j", "2")
    monkeypatch.setattr(engine, "make_jobs", real)
    other = run_ours(cfg, tmp_path / "other", "--random-seed", "43")
    files = {k: (v / "model.safetensors").read_bytes() for k, v in outs.items()}
    assert len(set(files.values())) == 1
    assert (other / "model.safetensors").read_bytes() != files["reversed"]
    ids = torch.randint(0, 128, (1, 6))
    assert torch.isfinite(logits(outs["reversed"], ids)).all()  # transformers loads it


def test_fast_philox_equals_rng_words():
    for n, start in ((1, 0), (7, 3), (1000, 5), (70_001, 0)):
        assert torch.equal(ta.philox_words(2**40 + 7, "lm_head.weight", 2, n, start),
                           rng.words(2**40 + 7, "lm_head.weight", 2, n, start))  # fmt: skip
    keep = ta._draw(0.37, 9, "x", 1, (300, 301), "cpu", fast=True)
    assert torch.equal(keep, rng.bernoulli(0.37, 9, "x", 1, (300, 301)))


# ----------------------------------------------------------------------------- the tie rule


def test_argsort_ties_are_not_index_ordered():
    # What mergekit's torch.argsort(descending=True)[:k] keeps among equal magnitudes on the CPU: not the lowest
    # (nor the highest) indices -- libstdc++'s introsort order. 20 equal values, keep 5:
    kept = torch.argsort(torch.zeros(20), descending=True)[:5].tolist()
    assert kept == [10, 19, 18, 17, 16]
    perm = ta.introsort_select(ta.sort_keys(torch.zeros(20)), [5], descending=True)
    assert set(perm[:5].tolist()) == set(kept)
    # up to 16 elements insertion sort alone runs: stable, lowest index first
    assert torch.argsort(torch.zeros(16), descending=True)[:5].tolist() == [0, 1, 2, 3, 4]


def test_introsort_model_matches_torch_sort():
    """introsort_select (the rule, stated as an algorithm) against torch's CPU sort: heavy ties, NaN, both
    directions, several cut points, sizes around the insertion-sort threshold and a 1.5M-element bf16 delta."""
    g = torch.Generator().manual_seed(0)
    cases = []
    for n in (1, 15, 16, 17, 40, 333, 5000):
        for levels in (1, 2, 7, 1 << 20):
            w = torch.randint(0, levels, (n,), generator=g).float()
            if n > 20 and levels == 7:
                w[torch.randint(0, n, (3,), generator=g)] = float("nan")
            cases.append(w)
    cases.append(_delta((1536, 1024), torch.bfloat16, seed=1).abs().float().view(-1))
    for w in cases:
        n = w.numel()
        cuts = sorted({int(c) for c in torch.randint(0, n + 1, (3,), generator=g)} | {n // 3})
        for descending in (True, False):
            order = torch.sort(w, descending=descending).indices
            perm = ta.introsort_select(ta.sort_keys(w), cuts, descending=descending)
            edges = sorted({0, n, *cuts})
            for a, b in zip(edges, edges[1:]):
                assert set(perm[a:b].tolist()) == set(order[a:b].tolist()), (n, descending, a, b)


@pytest.mark.parametrize("path", ["cpu-sort", "introselect"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_magnitude_selections_match_mergekit_on_tied_deltas(dtype, path, monkeypatch):
    """TIES and breadcrumbs masks equal mergekit's on deltas whose thresholds tie. "introselect": the path of
    devices whose sort is not the CPU's (CUDA), forced here on the CPU."""
    from mergekit import sparsify as mk

    if path == "introselect":
        monkeypatch.setattr(ta, "sorts_like_mergekit", lambda device: False)

    delta = _delta((256, 320), dtype, seed=4)
    if dtype == torch.float32:
        delta[:, :64] = delta[:, 64:128]  # ties in fp32 too
    w = delta.abs().float().view(-1)
    for density in (0.05, 0.3, 0.77):
        k = max(1, int(density * w.numel()))
        thr = torch.sort(w, descending=True).values[k - 1]
        assert int((w == thr).sum()) > 1 or dtype == torch.float32  # bf16: the threshold is tied
        for fast in (True, False):
            ours = ta.sparsify(
                delta, 0, _params(density=density, rescale=True), ta.MAGNITUDE, Context(), fast=fast
            )
            assert torch.equal(ours != 0, mk.magnitude(delta, density) != 0), (density, fast)
        for gamma in (0.01, 0.2):
            ours = ta.sparsify(delta, 0, _params(density=density, gamma=gamma), ta.MAGNITUDE_OUTLIERS, Context(),
                               fast=True)  # fmt: skip
            assert torch.equal(ours, mk.magnitude_outliers(delta, density, gamma=gamma)), (density, gamma)


# ----------------------------------------------------------------------------- configs


def _fails_both(models, tmp_path, capsys, cfg: str, expect: str) -> None:
    cfgf = tmp_path / "c.yml"
    cfgf.write_text(cfg)
    assert cli.main(["merge", str(cfgf), str(tmp_path / "out"), "--no-progress", "-q"]) == 2
    err = capsys.readouterr().err
    assert expect in err, err
    assert not (tmp_path / "out").exists()
    with pytest.raises((ValueError, RuntimeError)):
        run_mergekit(cfg, tmp_path / "theirs")


def test_della_epsilon_out_of_range_fails_in_the_config(models, tmp_path, capsys):
    cfg = config(
        models, "llama", "della", ["{density: 0.5, weight: 0.5}", "{density: 0.6, epsilon: 0.4, weight: 0.5}"]
    )
    _fails_both(models, tmp_path, capsys, cfg, "models[1].parameters.epsilon: epsilon 0.4 with density 0.6")


def test_della_density_gradient_meets_epsilon_in_some_layers(models, tmp_path, capsys):
    cfg = config(models, "llama", "della_linear", ["{density: [0.5, 0.95], weight: 0.5}", "{weight: 0.5}"],
                 "{epsilon: 0.1}")  # fmt: skip
    _fails_both(models, tmp_path, capsys, cfg, "parameters.epsilon: epsilon 0.1 with density")


def test_della_negative_epsilon_beyond_the_probabilities_fails(models, tmp_path, capsys):
    cfg = config(models, "llama", "della", ["{density: 0.5, epsilon: -0.6, weight: 1.0}"])
    _fails_both(models, tmp_path, capsys, cfg, "outside [0, 1]")


def test_della_negative_epsilon_within_is_accepted(models, tmp_path):
    # density 0.5, epsilon -0.5: probabilities from 1 down to 0 (larger magnitudes kept less); mergekit runs it
    cfg = config(models, "llama", "della", ["{density: 0.5, epsilon: -0.5, weight: 1.0}"], "", "float32")
    run_ours(cfg, tmp_path / "ours", "--random-seed", "3", "--verify", "all")
    run_mergekit(cfg, tmp_path / "theirs")


def test_dare_negative_density_fails_in_the_config(models, tmp_path, capsys):
    cfg = config(models, "llama", "dare_linear", ["{density: -0.1, weight: 1.0}"])
    _fails_both(models, tmp_path, capsys, cfg, "models[0].parameters.density: density -0.1 is negative")


@pytest.mark.parametrize("method", FAMILY)
def test_every_method_needs_a_base(models, tmp_path, capsys, method):
    cfg = (
        f"models:\n  - model: {models['llama_b']}\n    parameters: {{weight: 1.0}}\nmerge_method: {method}\n"
    )
    cfgf = tmp_path / "c.yml"
    cfgf.write_text(cfg)
    assert cli.main(["merge", str(cfgf), str(tmp_path / "out"), "-q"]) == 2
    assert f"merge_method {method} needs a base_model" in capsys.readouterr().err
    if method == "ties":
        with pytest.raises(ValueError, match="requires a base input"):
            run_mergekit(cfg, tmp_path / "theirs")


def test_weight_is_required(models, tmp_path, capsys):
    cfg = config(models, "llama", "ties", ["{density: 0.5}"])
    cfgf = tmp_path / "c.yml"
    cfgf.write_text(cfg)
    assert cli.main(["merge", str(cfgf), str(tmp_path / "out"), "-q"]) == 2
    assert "models[0].parameters.weight: Missing required parameter weight" in capsys.readouterr().err


def test_base_alone_is_the_base(models, tmp_path):
    cfg = f"models:\n  - model: {models['llama_base']}\nmerge_method: ties\nbase_model: {models['llama_base']}\n"
    ours = read_model(run_ours(cfg, tmp_path / "ours"))
    base = read_model(models["llama_base"])
    assert ours.keys() == base.keys() and all(torch.equal(ours[k], base[k]) for k in ours)


def test_declarations_follow_mergekit():
    from mergekit import merge_methods as mk

    for name in FAMILY:
        ours, theirs = methods.get(name), mk.get(name)
        spec = {p.name: (p.scope.value, None if p.required else p.default) for p in theirs.spec.parameters}
        mine = {p.name: (p.scope.value, None if p.required else p.default) for p in ours.params}
        mine.pop("precise_sparsify", None)
        assert mine == spec, name
        assert ours.random == (ours.sparsification in (ta.RANDOM, ta.DELLA))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("consensus", [None, ta.SUM, ta.COUNT])
@pytest.mark.parametrize("sparsification", [None, ta.MAGNITUDE, ta.MAGNITUDE_OUTLIERS, ta.RANDOM, ta.DELLA])
def test_core_equals_mergekits_class(sparsification, consensus, dtype, monkeypatch):
    """The core against mergekit's GeneralizedTaskArithmeticMerge built with the same choices, every dtype,
    both consensus methods (count is used by no registered method), draws forced equal."""
    from mergekit.merge_methods.base import TensorGroup
    from mergekit.merge_methods.generalized_task_arithmetic import (
        ConsensusMethod,
        GeneralizedTaskArithmeticMerge,
    )
    from mergekit.sparsify import SparsificationMethod

    name = "model.layers.1.mlp.down_proj.weight"
    g = torch.Generator().manual_seed(11)
    base = (torch.randn(48, 80, generator=g) * 0.05).to(dtype)
    xs = [
        (base.double() + torch.randn(48, 80, generator=g, dtype=torch.float64) * 0.01).to(dtype)
        for _ in range(3)
    ]
    mk = GeneralizedTaskArithmeticMerge(
        consensus_method=consensus and ConsensusMethod(consensus),
        sparsification_method=sparsification and SparsificationMethod(sparsification),
        default_normalize=True, default_rescale=True, method_name="x", method_pretty_name=None,
        method_reference_url=None,
    )  # fmt: skip
    params = {"weight": (0.5, -0.2, 0.7), "density": (0.4, 1.0, 0.7), "gamma": (0.05, 0.01, 0.1),
              "epsilon": (0.2, 0.1, 0.25), "normalize": True, "rescale": True, "lambda": 0.9, "int8_mask": False}  # fmt: skip
    # mergekit draws only for the models it sparsifies (density < 1): their streams, in order
    streams = [i for i, d in enumerate(params["density"]) if d < 1]

    def draws(p, *args, **kwargs):
        return rng.bernoulli(p, 21, name, streams.pop(0), tuple(p.shape)).to(p.dtype)

    monkeypatch.setattr(torch, "bernoulli", draws)
    group = TensorGroup.from_tensors([base, *xs], ids=["b", "x", "y", "z"], base_index=0, name=name)
    mk_params = {k: v for k, v in params.items() if k in {p.name for p in mk.spec.parameters}}
    for k in ("weight", "density", "gamma", "epsilon"):
        if k in mk_params:
            mk_params[k] = dict(zip(["x", "y", "z"], mk_params[k]))
    theirs = mk.merge_group(group, **mk_params)
    assert not streams or sparsification not in (ta.RANDOM, ta.DELLA)
    method = type("Probe", (ta.TaskArithmeticFamily,), {"name": "probe", "sparsification": sparsification})()
    scale = method.verify_scale([base, *xs], params)
    for fast in (True, False):
        ctx = Context(name=name, seed=21)
        ours = ta.merge([base, *xs], params, sparsification, consensus, ctx, fast=fast)
        assert ours.dtype == theirs.dtype
        fp32_norms = sparsification is not None and (
            dtype in (torch.float32, torch.float64)
            or (sparsification in (ta.RANDOM, ta.DELLA) and dtype != torch.bfloat16)
        )
        if fp32_norms:
            # mergekit's rescale norms are torch fp32 sums (its random sparsifiers work in fp32 for fp16 and fp64
            # inputs on the CPU; fp64 magnitudes are summed in another order), each ~1 ulp off the exact sum, so
            # its factor is a few fp32 ulps off ours: FP32_RESCALE_ULPS fp32 ulps of the terms, which an fp16
            # output can turn into one fp16 ulp.
            diff = (ours.double() - theirs.double()).abs()
            bound = FP32_RESCALE_ULPS * ulp(scale, torch.float32)
            if dtype == torch.float16:
                bound = torch.maximum(bound, ulp(scale, torch.float16))
            assert bool((diff <= bound).all()), float(diff.max())
        else:
            assert torch.equal(ours, theirs), (sparsification, consensus, dtype, fast)
