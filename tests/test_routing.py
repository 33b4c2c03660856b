"""MoE top-k routing: the reference against transformers' own routers and hand-computed cases,
every backend against the reference (bit for bit), adversarial inputs, API errors, torch.library."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import HAS_GPU, runnable_backends

import mergekit_fast as mk
from mergekit_fast.ops import _verify
from mergekit_fast.ops.routing import exp_f32, topk_routing_ref

CPU_BACKENDS = runnable_backends("cpu", ("cpp", "triton", "torch"))
# The torch backend runs the reference itself: the bulk grids compare the C++ kernel only.
CPP = runnable_backends("cpu", ("cpp",))
NAN, INF = float("nan"), float("inf")

# ----------------------------------------------------------------------------- helpers


def _configs(E: int, k: int) -> dict[str, dict]:
    """Routing configurations that are valid for E experts and k: Mixtral, Qwen, sigmoid,
    softmax + bias, DeepSeek-V2 (softmax, group max) and DeepSeek-V3 (sigmoid, bias, top-2 sum)."""
    g = torch.Generator().manual_seed(E * 131 + k)
    bias = (torch.randn(E, generator=g) * 0.05).float()
    out = {
        "mixtral": dict(),
        "qwen": dict(renormalize=False),
        "sigmoid": dict(scoring="sigmoid", renormalize=False, scaling=1.5),
        "softmax_bias": dict(bias=bias),
        # GLM-style large constant in the bias: fp32 rounding of score + bias makes exact ties.
        "sigmoid_offset_bias": dict(scoring="sigmoid", bias=bias + 7.0),
    }
    groups = next((d for d in range(2, E + 1) if E % d == 0 and E // d >= 2 and d >= 2), None)
    if groups is not None:
        size = E // groups
        keep = max(groups // 2, -(-k // size))
        if keep < groups:
            out["deepseek_v2"] = dict(num_groups=groups, topk_groups=keep, renormalize=False, scaling=16.0)
            out["deepseek_v3"] = dict(scoring="sigmoid", bias=bias, num_groups=groups, topk_groups=keep,
                                      scaling=2.5)  # fmt: skip
    return out


def _adversarial_logits(T: int, E: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random rows with exact ties, NaN and +-inf rows mixed in (row i's kind is i % 9)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, E, generator=g, dtype=torch.float64) * 2.0
    for t in range(T):
        kind = t % 9
        if kind == 1:  # exact ties in any dtype: few distinct small values
            x[t] = torch.randint(-2, 3, (E,), generator=g).double() * 0.5
        elif kind == 2:  # all equal
            x[t] = 0.25
        elif kind == 3:  # all NaN
            x[t] = NAN
        elif kind == 4:  # some NaN (keep at least one finite)
            x[t, torch.rand(E, generator=g) < 0.3] = NAN
            x[t, 0] = 1.0
        elif kind == 5:  # +inf entries (ties among them) and -inf
            x[t, torch.rand(E, generator=g) < 0.2] = INF
            x[t, torch.rand(E, generator=g) < 0.2] = -INF
        elif kind == 6:  # all -inf
            x[t] = -INF
        elif kind == 7:  # huge spread: probabilities underflow to 0
            x[t] = torch.randn(E, generator=g, dtype=torch.float64) * 300.0
        elif kind == 8:  # near-ties that only bf16/fp16 rounding makes exact
            x[t] = 1.0 + torch.randn(E, generator=g, dtype=torch.float64) * 1e-3
    return x.to(dtype)


def _assert_valid(w, ids, E):
    assert w.dtype == torch.float32 and ids.dtype == torch.int32
    assert torch.isfinite(w).all(), "weights must always be finite"
    if ids.numel():
        assert int(ids.min()) >= 0 and int(ids.max()) < E
        srt = ids.sort(dim=1).values
        assert (srt[:, 1:] != srt[:, :-1]).all(), "duplicate expert ids in a row"


def _check_backend(backend, logits, k, **kw):
    out = mk.topk_routing(logits, k, backend=backend, return_counts=True, **kw)
    ref = topk_routing_ref(logits.cpu(), k, return_counts=True,
                           **{n: (v.cpu() if isinstance(v, torch.Tensor) else v) for n, v in kw.items()})  # fmt: skip
    names = ("weights", "ids", "counts", "order")
    for name, o, r in zip(names, out, ref):
        assert o.shape == r.shape and o.dtype == r.dtype, name
        assert o.device == logits.device, name
        # Every backend performs the reference's fp32 operations in the same order: bit-identical.
        assert torch.equal(o.cpu(), r), f"{backend}: {name} differ from the reference"
    _assert_valid(out[0].cpu(), out[1].cpu(), logits.shape[1])
    return out


# ----------------------------------------------------------------------------- reference semantics


def test_exp_f32_accuracy_and_specials():
    x = torch.linspace(-103.9, 88.7, 400_001)
    got, exact = exp_f32(x).double(), torch.exp(x.double())
    normal = exact > torch.finfo(torch.float32).tiny
    _, max_ulp, _ = _verify.max_errors(got[normal].float(), exact[normal])
    assert max_ulp < 2.0, max_ulp  # documented bound (measured below 1 ulp)
    sp = torch.tensor([0.0, -0.0, NAN, INF, -INF, 89.5, -104.5, 88.7228, -87.5])
    r = exp_f32(sp)
    assert r[0] == 1 and r[1] == 1 and math.isnan(r[2]) and r[3] == INF and r[4] == 0
    assert r[5] == INF and r[6] == 0 and torch.isfinite(r[7]) and 0 < r[8] < 1.2e-38  # subnormal


def test_ties_go_to_the_lower_index():
    x = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0], [2.0, 2.0, 2.0, 2.0, 2.0], [-0.0, 0.0, -0.0, 0.0, -1.0]])
    _, ids = topk_routing_ref(x, 2)
    assert ids.tolist() == [[1, 2], [0, 1], [0, 1]]
    _, ids = topk_routing_ref(x, 4, scoring="sigmoid")
    assert ids.tolist() == [[1, 2, 4, 0], [0, 1, 2, 3], [0, 1, 2, 3]]


def test_weights_are_softmax_over_chosen_and_match_float64():
    x = torch.randn(50, 13) * 3
    w, ids = topk_routing_ref(x, 4)
    ref = torch.softmax(x.double().gather(1, ids.long()), dim=-1)
    assert torch.allclose(w.double(), ref, rtol=1e-6, atol=0)
    order = torch.argsort(x, dim=1, descending=True, stable=True)[:, :4]
    assert torch.equal(ids.long(), order)
    w, ids = topk_routing_ref(x, 4, renormalize=False)
    p = torch.softmax(x.double(), dim=-1).gather(1, ids.long())
    assert torch.allclose(w.double(), p, rtol=1e-6, atol=1e-30)


def test_nan_and_inf_rows_are_documented_values():
    x = torch.tensor(
        [
            [NAN, NAN, NAN, NAN],  # all NaN -> 0..k-1, weight 0
            [NAN, 1.0, NAN, 0.0],  # NaN never wins
            [1.0, INF, 3.0, INF],  # softmax: +inf experts share 1
            [-INF, -INF, -INF, -INF],  # all -inf: uniform
            [0.0, -INF, NAN, -INF],  # -inf beats NaN
        ]
    )
    w, ids = topk_routing_ref(x, 3)
    assert ids.tolist() == [[0, 1, 2], [1, 3, 0], [1, 3, 2], [0, 1, 2], [0, 1, 3]]
    assert w[0].tolist() == [0.0, 0.0, 0.0]
    assert w[1, 2] == 0 and abs(w[1, :2].sum().item() - 1) < 1e-6
    assert w[2].tolist() == [0.5, 0.5, 0.0]
    assert torch.allclose(w[3], torch.full((3,), 1 / 3))
    assert w[4].tolist() == [1.0, 0.0, 0.0]
    w, _ = topk_routing_ref(x, 3, renormalize=False)
    assert w[0].tolist() == [0.0, 0.0, 0.0] and w[2].tolist() == [0.5, 0.5, 0.0]
    assert torch.allclose(w[3], torch.full((3,), 0.25))
    w, ids = topk_routing_ref(x, 2, scoring="sigmoid", renormalize=False)
    assert ids[2].tolist() == [1, 3] and w[2].tolist() == [1.0, 1.0]
    assert w[3].tolist() == [0.0, 0.0] and w[0].tolist() == [0.0, 0.0]
    # A NaN in the bias ranks that expert last, like a NaN logit.
    bias = torch.tensor([0.0, NAN, 0.0, 0.0])
    _, ids = topk_routing_ref(torch.tensor([[0.0, 5.0, 1.0, 2.0]]), 3, scoring="sigmoid", bias=bias)
    assert ids.tolist() == [[3, 2, 0]]


def test_bias_changes_selection_not_weights():
    x = torch.randn(64, 16)
    bias = torch.zeros(16)
    bias[[3, 11]] = 5.0  # forces experts 3 and 11
    w, ids = topk_routing_ref(x, 2, scoring="sigmoid", bias=bias, renormalize=False)
    assert (ids.sort(dim=1).values == torch.tensor([3, 11], dtype=torch.int32)).all()
    assert torch.allclose(w, torch.sigmoid(x.gather(1, ids.long())), rtol=2e-7, atol=0)
    w2, ids2 = topk_routing_ref(x, 2, scoring="sigmoid", renormalize=False)
    assert not torch.equal(ids, ids2)


def test_return_counts_layout():
    x = torch.randn(37, 10)
    w, ids, counts, order = topk_routing_ref(x, 3, return_counts=True)
    assert counts.dtype == order.dtype == torch.int32 and counts.shape == (10,) and order.shape == (37 * 3,)
    offsets = torch.cumsum(counts, 0) - counts
    flat = ids.reshape(-1)
    for e in range(10):
        slots = order[offsets[e] : offsets[e] + counts[e]].long()
        assert (flat[slots] == e).all()
        assert (slots[1:] > slots[:-1]).all()  # stable: increasing slot index
        assert slots.numel() == int((flat == e).sum())
    assert sorted(order.tolist()) == list(range(37 * 3))


# ----------------------------------------------------------------------------- transformers oracles


def _dense(w, ids, E):
    return torch.zeros(w.shape[0], E, dtype=torch.float64).scatter_(1, ids.long(), w.double())


def _assert_same_routing(ours_w, ours_ids, hf_w, hf_ids, keys, *, sorted_ids, max_ulps, key_ulps=0.0):
    """ids equal to transformers', except where transformers' own selection values tie (up to
    key_ulps fp32 ulps: different exp/sigmoid implementations); weights within max_ulps fp32 ulps
    of transformers' (an ulp of each weight's own magnitude)."""
    E = keys.shape[1]
    keys = keys.double()
    ours_set = torch.zeros(keys.shape, dtype=torch.bool).scatter_(1, ours_ids.long(), True)
    hf_set = torch.zeros(keys.shape, dtype=torch.bool).scatter_(1, hf_ids.long(), True)
    differ = (ours_set != hf_set).any(dim=1)
    for t in differ.nonzero().flatten().tolist():
        a = keys[t][ours_set[t] & ~hf_set[t]]
        b = keys[t][hf_set[t] & ~ours_set[t]]
        tol = key_ulps * _verify.ulp(torch.maximum(a.abs().max(), b.abs().max()), torch.float32)
        assert (a.min() - b.max()).abs() <= tol, f"token {t}: different experts without a tie"
    same = ~differ
    if sorted_ids:
        pos_keys_ours = keys.gather(1, ours_ids.long())
        pos_keys_hf = keys.gather(1, hf_ids.long())
        tol = key_ulps * _verify.ulp(pos_keys_hf, torch.float32)
        assert ((pos_keys_ours - pos_keys_hf).abs() <= tol)[same].all(), "order differs without a tie"
    d_ours, d_hf = _dense(ours_w, ours_ids, E)[same], _dense(hf_w.float(), hf_ids, E)[same]
    _, ulps, _ = _verify.max_errors(d_ours.float(), d_hf, None)
    assert ulps <= max_ulps, ulps
    return int(differ.sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("E,k", [(8, 2), (6, 3), (60, 4)])
def test_reference_matches_transformers_mixtral(dtype, E, k):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    cfg = MixtralConfig(hidden_size=32, num_local_experts=E, num_experts_per_tok=k)
    router = MixtralTopKRouter(cfg).to(dtype)
    torch.nn.init.normal_(router.weight, std=0.5)
    h = torch.randn(300, 32).to(dtype)
    with torch.no_grad():
        logits, hf_w, hf_ids = router(h)
    w, ids = topk_routing_ref(logits, k)
    probs = torch.softmax(logits.float(), dim=-1)
    # exp (ours < 1 ulp, torch's ~1 ulp), the k-term sum and two divisions: a few ulps of each
    # weight. Ids: exact except where transformers' probabilities tie exactly.
    _assert_same_routing(w, ids, hf_w, hf_ids, probs, sorted_ids=True, max_ulps=8)


@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_reference_matches_transformers_qwen2_moe(norm, dtype):
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter

    cfg = Qwen2MoeConfig(hidden_size=32, num_experts=60, num_experts_per_tok=4, norm_topk_prob=norm)
    router = Qwen2MoeTopKRouter(cfg).to(dtype)
    torch.nn.init.normal_(router.weight, std=0.5)
    h = torch.randn(300, 32).to(dtype)
    with torch.no_grad():
        logits, hf_w, hf_ids = router(h)
    w, ids = topk_routing_ref(logits, 4, renormalize=norm)
    probs = torch.softmax(logits.float(), dim=-1)
    # transformers casts the weights to the logits' dtype: compare after the same cast. In bf16
    # a weight within a few fp32 ulps of a bf16 rounding boundary may round the other way: 1 ulp.
    ours = w.to(dtype)
    assert ours.dtype == hf_w.dtype
    _assert_same_routing(ours.float(), ids, hf_w, hf_ids, probs, sorted_ids=True,
                         max_ulps=8 if dtype == torch.float32 else 2**16)  # fmt: skip
    if dtype == torch.bfloat16:
        same = (ids == hf_ids).all(dim=1)
        _, max_ulp, _ = _verify.max_errors(ours[same], hf_w[same])
        assert max_ulp <= 1.0


def _deepseek_v3_router(E, n_group, topk_group, k, bias):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    cfg = DeepseekV3Config(hidden_size=E, n_routed_experts=E, n_group=n_group, topk_group=topk_group,
                           num_experts_per_tok=k, norm_topk_prob=True, routed_scaling_factor=2.5)  # fmt: skip
    router = DeepseekV3TopkRouter(cfg)
    with torch.no_grad():
        router.weight.copy_(torch.eye(E))  # router logits == hidden states
        router.e_score_correction_bias.copy_(bias)
    return router


@pytest.mark.parametrize("E,n_group,topk_group,k", [(64, 8, 4, 6), (256, 8, 4, 8), (16, 4, 2, 4)])
@pytest.mark.parametrize("offset", [0.0, 7.0])
def test_reference_matches_transformers_deepseek_v3(E, n_group, topk_group, k, offset):
    # offset: a GLM-style large constant in the bias, where fp32 rounding of score + bias creates
    # exact ties (the lower index wins here; transformers' topk order is unspecified).
    bias = (torch.randn(E) * 0.05 + offset).float()
    router = _deepseek_v3_router(E, n_group, topk_group, k, bias)
    logits = torch.randn(400, E) * 2
    with torch.no_grad():
        _, hf_w, hf_ids = router(logits)
    w, ids = topk_routing_ref(logits, k, scoring="sigmoid", bias=bias, num_groups=n_group,
                              topk_groups=topk_group, scaling=2.5)  # fmt: skip
    keys = torch.sigmoid(logits) + bias
    # torch.sigmoid and exp_f32 differ by an ulp or two, so selection values s + b may differ by
    # 2 ulps of the key; transformers' topk is unsorted (compare sets).
    ndiff = _assert_same_routing(w, ids, hf_w, hf_ids, keys, sorted_ids=False, max_ulps=8, key_ulps=2.0)
    assert ndiff <= (40 if offset else 2), ndiff


def test_large_bias_offset_needs_fp32():
    # The bias must stay fp32: rounding it to bf16 reorders experts for many tokens.
    E = 64
    bias = (7.0 + torch.randn(E) * 0.01).float()
    logits = torch.randn(500, E)
    _, ids32 = topk_routing_ref(logits, 8, scoring="sigmoid", bias=bias, num_groups=8, topk_groups=4)
    _, ids16 = topk_routing_ref(logits, 8, scoring="sigmoid", bias=bias.bfloat16().float(), num_groups=8,
                                topk_groups=4)  # fmt: skip
    assert (ids32.sort(1).values != ids16.sort(1).values).any(dim=1).sum() > 50
    with pytest.raises(ValueError, match="bias must be float32"):
        topk_routing_ref(logits, 8, scoring="sigmoid", bias=bias.bfloat16())


def test_reference_matches_transformers_deepseek_v2_group_max():
    from transformers import DeepseekV2Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter

    E = 32
    cfg = DeepseekV2Config(hidden_size=E, n_routed_experts=E, n_group=8, topk_group=3, num_experts_per_tok=6,
                           topk_method="group_limited_greedy", routed_scaling_factor=16.0)  # fmt: skip
    router = DeepseekV2TopkRouter(cfg)
    with torch.no_grad():
        router.weight.copy_(torch.eye(E))
    logits = torch.randn(400, E) * 2
    with torch.no_grad():
        _, hf_w, hf_ids = router(logits)
    w, ids = topk_routing_ref(logits, 6, num_groups=8, topk_groups=3, renormalize=False, scaling=16.0)
    probs = torch.softmax(logits, dim=-1)
    _assert_same_routing(w, ids, hf_w, hf_ids, probs, sorted_ids=False, max_ulps=8)


def test_dropped_groups_are_excluded_not_zero_masked():
    """transformers' AXK2 router masks dropped groups with 0.0; with negative biased scores that
    picks experts of dropped groups. DeepSeek-V3 (-inf) and this op never do."""
    from transformers import AXK2Config
    from transformers.models.axk2.modeling_axk2 import AXK2TopkRouter

    E, k = 8, 2
    bias = torch.full((E,), -1.0)  # sigmoid + bias < 0 everywhere
    cfg = AXK2Config(hidden_size=E, n_routed_experts=E, n_group=4, topk_group=1, num_experts_per_tok=k,
                     norm_topk_prob=True, routed_scaling_factor=1.0)  # fmt: skip
    axk2 = AXK2TopkRouter(cfg)
    v3 = _deepseek_v3_router(E, 4, 1, k, bias)
    with torch.no_grad():
        axk2.weight.copy_(torch.eye(E))
        axk2.e_score_correction_bias.copy_(bias)
    logits = torch.randn(64, E)
    with torch.no_grad():
        _, _, axk2_ids = axk2(logits)
        _, v3_w, v3_ids = v3(logits)
    w, ids = topk_routing_ref(logits, k, scoring="sigmoid", bias=bias, num_groups=4, topk_groups=1)
    # Ours: both experts from the single kept group (experts 2g, 2g+1).
    assert (ids[:, 0] // 2 == ids[:, 1] // 2).all()
    assert torch.equal(ids.sort(1).values.long(), v3_ids.sort(1).values)
    # The 0.0 mask picks a dropped group's expert for every token here.
    assert ((axk2_ids[:, 0] // 2) != (axk2_ids[:, 1] // 2)).all()


# ----------------------------------------------------------------------------- backends vs reference

EXPERT_COUNTS = [1, 2, 6, 8, 13, 60, 64, 67, 128, 160, 256, 288, 384, 1024]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("backend", CPP)
@pytest.mark.parametrize("E", EXPERT_COUNTS)
def test_cpu_backends_all_configs(backend, E):
    ks = sorted({k for k in (*range(1, 9), E) if k <= E})
    for i, k in enumerate(ks):
        for j, kw in enumerate(_configs(E, k).values()):
            dtype = DTYPES[(i + j) % 3]
            x = _adversarial_logits(18, E, dtype, seed=E + 7 * k + j)
            _check_backend(backend, x, k, **kw)


@pytest.mark.parametrize("backend", CPP)
@pytest.mark.parametrize("E,k", [(8, 2), (64, 8), (256, 8), (67, 5)])
def test_cpu_backends_many_tokens(backend, E, k):
    for i, kw in enumerate(_configs(E, k).values()):
        x = _adversarial_logits(4097, E, DTYPES[i % 3], seed=E + k + i)
        _check_backend(backend, x, k, **kw)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("T", [0, 1, 7])
def test_token_counts(backend, T):
    x = _adversarial_logits(T, 13, torch.bfloat16, seed=T)
    w, ids, counts, order = _check_backend(backend, x, 3)
    assert (
        w.shape == (T, 3) and counts.tolist() == torch.bincount(ids.reshape(-1).long(), minlength=13).tolist()
    )


# The Triton interpreter is slow (~10 ms per kernel operation): few, small cases.
TRITON_CASES = [(1, 1, "mixtral"), (6, 6, "qwen"), (13, 8, "sigmoid"), (60, 4, "deepseek_v3"),
                (67, 8, "softmax_bias"), (160, 8, "deepseek_v2"), (288, 8, "deepseek_v3"),
                (1024, 8, "mixtral"), (64, 64, "qwen"), (64, 16, "deepseek_v3"), (8, 4, "deepseek_v2"),
                (128, 8, "sigmoid_offset_bias")]  # fmt: skip


@pytest.mark.parametrize("backend", runnable_backends("cpu", ("triton",)))
@pytest.mark.parametrize("E,k,config", TRITON_CASES)
def test_triton_interpreter(backend, E, k, config):
    kw = _configs(E, k)[config]
    x = _adversarial_logits(9, E, DTYPES[E % 3], seed=E)
    _check_backend(backend, x, k, **kw)


@pytest.mark.parametrize("backend", runnable_backends("cpu", ("triton",)))
def test_triton_interpreter_many_tokens(backend):
    x = _adversarial_logits(4097, 8, torch.bfloat16, seed=1)
    _check_backend(backend, x, 2)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_forced_bf16_ties(backend):
    # Logits that are distinct in fp32 but round to the same bf16 value: ties decided by index.
    base = torch.linspace(0.5, 0.5078125, 64)  # 1 bf16 ulp wide: at most 2 distinct values
    x = base[torch.randperm(64)].repeat(5, 1).to(torch.bfloat16)
    w, ids = _check_backend(backend, x, 8)[:2]
    vals = x.float()
    top = vals.max(dim=1, keepdim=True).values
    expected = torch.nonzero(vals[0] == top[0]).flatten()[:8]
    assert ids[0].tolist()[: len(expected)] == expected.tolist()


@pytest.mark.parametrize("backend", CPP)
def test_k_equals_E_and_scaling(backend):
    x = _adversarial_logits(20, 67, torch.float32, seed=3)
    w, ids = _check_backend(backend, x, 67, scaling=2.5)[:2]
    assert torch.equal(ids.sort(1).values, torch.arange(67, dtype=torch.int32).expand(20, 67))
    finite_rows = torch.isfinite(x).all(dim=1)
    assert torch.allclose(w[finite_rows].sum(1), torch.full((int(finite_rows.sum()),), 2.5), rtol=1e-5)


# ----------------------------------------------------------------------------- API


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: (torch.randn(4, 3), 4, {}), "larger than the number of experts"),
        (lambda: (torch.randn(4, 3), 0, {}), ">= 1"),
        (lambda: (torch.randn(4, 3), 2.0, {}), "k must be an int"),
        (lambda: (torch.randn(4), 1, {}), "must be 2-D"),
        (lambda: (torch.randn(2, 4, 3), 1, {}), "must be 2-D"),
        (lambda: (torch.randn(4, 0), 1, {}), "0 experts"),
        (lambda: (torch.randn(4, 3).double(), 1, {}), "dtype torch.float64 is not supported"),
        (lambda: (torch.ones(4, 3, dtype=torch.int32), 1, {}), "not supported"),
        (lambda: ([[1.0]], 1, {}), "must be a tensor"),
        (lambda: (torch.randn(4, 3), 1, {"scoring": "relu"}), "scoring must be one of"),
        (lambda: (torch.randn(4, 3), 1, {"bias": torch.zeros(4)}), r"shape \(3,\)"),
        (lambda: (torch.randn(4, 3), 1, {"bias": torch.zeros(3).half()}), "float32"),
        (lambda: (torch.randn(4, 8), 1, {"num_groups": 3, "topk_groups": 1}), "divide"),
        (lambda: (torch.randn(4, 8), 1, {"num_groups": 4}), "together"),
        (lambda: (torch.randn(4, 8), 1, {"num_groups": 4, "topk_groups": 5}), "topk_groups"),
        (lambda: (torch.randn(4, 8), 3, {"num_groups": 4, "topk_groups": 1}), "kept groups"),
        (
            lambda: (torch.randn(4, 8), 1, {"num_groups": 8, "topk_groups": 2, "group_score": "top2_sum"}),
            ">= 2",
        ),
        (lambda: (torch.randn(4, 8), 1, {"group_score": "mean"}), "group_score"),
        (lambda: (torch.randn(4, 8), 1, {"scaling": float("inf")}), "finite"),
        (lambda: (torch.randn(4, 8), 1, {"renormalize": 1}), "bool"),
    ],
)
def test_bad_input(make, match):
    logits, k, kw = make()
    with pytest.raises(ValueError, match=match):
        mk.topk_routing(logits, k, **kw)
    with pytest.raises(ValueError, match=match):
        topk_routing_ref(logits, k, **kw)


def test_explicit_unavailable_backend_raises():
    if HAS_GPU:
        pytest.skip("cuda is available here")
    with pytest.raises(mk.BackendUnavailable, match="cuda"):
        mk.topk_routing(torch.randn(3, 8), 2, backend="cuda")


def test_verify_and_catches_a_wrong_result(monkeypatch):
    from mergekit_fast.ops import routing as routing_mod

    x = torch.randn(40, 16, dtype=torch.bfloat16)
    w, ids = mk.topk_routing(x, 4, verify=True)
    assert torch.equal(ids, topk_routing_ref(x, 4)[1])
    out = mk.topk_routing(x, 4, verify=True, return_counts=True)
    assert len(out) == 4

    def broken(logits, bias, p, w, ids):
        routing_mod._run_torch(logits, bias, p, w, ids)
        ids[3] = ids[3].flip(0)

    monkeypatch.setitem(routing_mod._RUNNERS, "torch", broken)
    with pytest.raises(mk.VerificationError, match="ids differ"):
        mk.topk_routing(x, 4, backend="torch", verify=True)


def test_non_contiguous_logits():
    x = torch.randn(16, 40).t()
    assert torch.equal(mk.topk_routing(x, 3)[1], topk_routing_ref(x.contiguous(), 3)[1])


def test_custom_op_opcheck():
    from mergekit_fast.ops import routing  # noqa: F401  (registers the op)

    op = torch.ops.mergekit_fast.topk_routing.default
    x = torch.randn(9, 12)
    bias = torch.randn(12) * 0.1
    for args in [
        (x, 2, "softmax", True, None, 0, 0, "max", 1.0, "auto", False),
        (x.bfloat16(), 3, "sigmoid", True, bias, 4, 2, "top2_sum", 2.5, "auto", True),
    ]:
        torch.library.opcheck(op, args)
        w, ids, counts, order = op(*args)
        ref = topk_routing_ref(args[0], args[1], scoring=args[2], renormalize=args[3], bias=args[4],
                               num_groups=args[5] or None, topk_groups=args[6] or None, group_score=args[7],
                               scaling=args[8], return_counts=True)  # fmt: skip
        assert torch.equal(w, ref[0]) and torch.equal(ids, ref[1])
        if args[-1]:
            assert torch.equal(counts, ref[2]) and torch.equal(order, ref[3])
        else:
            assert counts.numel() == order.numel() == 0


def test_torch_compile_captures_the_op():
    def route(h, weight):
        logits = h @ weight.t()
        w, ids = mk.topk_routing(logits, 2)
        return w * 2, ids

    compiled = torch.compile(route, backend="aot_eager", fullgraph=True)
    h, weight = torch.randn(10, 16), torch.randn(8, 16)
    w, ids = compiled(h, weight)
    rw, rids = topk_routing_ref(h @ weight.t(), 2)
    assert torch.equal(ids, rids) and torch.equal(w, rw * 2)


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("backend", runnable_backends("cuda", ("cuda", "triton")))
@pytest.mark.parametrize("E", EXPERT_COUNTS + [2048, 4096, 16384])
def test_gpu_backends(backend, E):
    ks = sorted({k for k in (1, 2, 8, E if E <= 1024 else 16) if k <= E})
    for i, k in enumerate(ks):
        for j, kw in enumerate(_configs(E, k).values()):
            dtype = DTYPES[(i + j) % 3]
            x = _adversarial_logits(4097 if E <= 256 else 65, E, dtype, seed=E + k + j).cuda()
            kw = {n: (v.cuda() if isinstance(v, torch.Tensor) else v) for n, v in kw.items()}
            _check_backend(backend, x, k, **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", runnable_backends("cuda", ("cuda", "triton")))
def test_gpu_cuda_graph_capture(backend):
    x = torch.randn(256, 64, device="cuda")
    mk.topk_routing(x, 8, backend=backend)  # compile / warm up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        w, ids = mk.topk_routing(x, 8, backend=backend)
    x.copy_(torch.randn(256, 64, device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    rw, rids = topk_routing_ref(x.cpu(), 8)
    assert torch.equal(ids.cpu(), rids) and torch.equal(w.cpu(), rw)
