"""mergekit_fast.integrations.vllm: vLLM's router signatures and semantics on the fused routing op.

The oracle is a plain-torch transcription of the semantics vLLM documents and implements in its native
(torch) path (/work/shared/reference/integrations.md): softmax or sigmoid scores, top-k, optional
renormalisation; DeepSeek groups scored by their top-2 sum with a correction bias, else by their max,
dropped groups masked with -inf; weights are the unbiased scores. Inputs are drawn without ties, where
torch.topk's order is unspecified.
"""

from __future__ import annotations

import pytest
import torch

from mergekit_fast.integrations import vllm

torch.manual_seed(0)


def vllm_fused_topk(logits, k, renormalize, scoring):
    s = torch.softmax(logits.float(), -1) if scoring == "softmax" else logits.float().sigmoid()
    w, ids = torch.topk(s, k, dim=-1)
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    return w, ids.to(torch.int32)


def vllm_grouped_topk(logits, k, renormalize, groups, topk_group, scoring, scaling, bias):
    scores = torch.softmax(logits.float(), -1) if scoring == "softmax" else logits.float().sigmoid()
    T = scores.size(0)
    original = scores
    if bias is not None:
        scores = scores + bias[None]
        gs = scores.view(T, groups, -1).topk(2, dim=-1)[0].sum(-1)
    else:
        gs = scores.view(T, groups, -1).max(-1).values
    gidx = torch.topk(gs, topk_group, dim=-1)[1]
    gmask = torch.zeros_like(gs).scatter_(1, gidx, 1)
    smask = gmask[:, :, None].expand(T, groups, scores.size(-1) // groups).reshape(T, -1)
    tmp = scores.masked_fill(~smask.bool(), float("-inf"))
    if bias is not None:
        ids = torch.topk(tmp, k, dim=-1)[1]
        w = original.gather(1, ids)
    else:
        w, ids = torch.topk(tmp, k, dim=-1)
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    return (w * scaling).float(), ids.to(torch.int32)


@pytest.mark.parametrize(
    "E,k", [(8, 2), (7, 3), (60, 4), (300, 8), (1, 1)]
)  # any count, not vLLM's fixed set
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_topk_matches_vllm_semantics(E, k, scoring, renormalize, dtype):
    T = 33
    logits = torch.randn(T, E).to(dtype)
    hidden = torch.zeros(T, 16, dtype=dtype)
    w, ids, tei = vllm.fused_topk(hidden, logits, k, renormalize, scoring_func=scoring)
    rw, rids = vllm_fused_topk(logits, k, renormalize, scoring)
    assert w.dtype == torch.float32 and ids.dtype == torch.int32 and tei.dtype == torch.int32
    assert w.shape == ids.shape == tei.shape == (T, k)
    # bf16 logits tie often after rounding: compare sets of ids where ties are possible
    if dtype == torch.float32:
        assert torch.equal(ids, rids)
        torch.testing.assert_close(w, rw, rtol=2e-6, atol=1e-7)  # softmax of the chosen logits vs p / sum(p)
    else:
        torch.testing.assert_close(w.sort(-1).values, rw.sort(-1).values, rtol=2e-6, atol=1e-7)
    assert torch.equal(tei, torch.arange(k)[None] * T + torch.arange(T)[:, None])
    ids64 = vllm.fused_topk(hidden, logits, k, renormalize, indices_type=torch.int64, scoring_func=scoring)[1]
    assert ids64.dtype == torch.int64 and torch.equal(ids64, ids.long())


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("E,groups,topk_group,k", [(64, 8, 3, 6), (256, 8, 4, 8), (12, 4, 2, 3)])
def test_grouped_topk_matches_vllm_semantics(with_bias, scoring, E, groups, topk_group, k):
    T = 29
    logits = torch.randn(T, E)
    bias = torch.randn(E) * 0.1 if with_bias else None
    w, ids = vllm.grouped_topk(torch.zeros(T, 4), logits, k, True, groups, topk_group, scoring, 2.5, bias)
    rw, rids = vllm_grouped_topk(logits, k, True, groups, topk_group, scoring, 2.5, bias)
    assert w.dtype == torch.float32 and ids.dtype == torch.int32
    assert torch.equal(ids, rids)
    torch.testing.assert_close(w, rw, rtol=2e-6, atol=1e-6)


def test_grouped_topk_matches_transformers_deepseek_v3():
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    E = 64
    cfg = DeepseekV3Config(hidden_size=E, n_routed_experts=E, num_experts_per_tok=6, n_group=8, topk_group=3,
                           routed_scaling_factor=2.5, norm_topk_prob=True)  # fmt: skip
    router = DeepseekV3TopkRouter(cfg)
    with torch.no_grad():
        router.weight.copy_(torch.eye(E))  # router logits == hidden states
        router.e_score_correction_bias.copy_(torch.randn(E) * 0.1)
        logits = torch.randn(40, E)
        _, hf_w, hf_ids = router(logits)
    w, ids = vllm.grouped_topk(logits, logits, 6, True, 8, 3, "sigmoid", 2.5, router.e_score_correction_bias)
    mine, theirs = torch.argsort(ids, -1), torch.argsort(hf_ids, -1)
    assert torch.equal(ids.gather(1, mine).long(), hf_ids.gather(1, theirs).long())
    torch.testing.assert_close(w.gather(1, mine), hf_w.float().gather(1, theirs), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_rows_give_valid_ids(bad):
    """CUDA-graph padding rows full of NaN/Inf: vLLM and SGLang have returned duplicate or out-of-range ids
    there (vLLM #39391, SGLang #30079). Here ids are distinct and in range, weights finite."""
    logits = torch.randn(6, 16)
    logits[1] = bad
    logits[3, ::2] = bad
    hidden = torch.zeros(6, 4)
    for w, ids in (vllm.fused_topk(hidden, logits, 4, True)[:2],
                   vllm.grouped_topk(hidden, logits, 4, True, 4, 2, "sigmoid", 1.0, torch.zeros(16))):  # fmt: skip
        assert torch.isfinite(w).all()
        assert int(ids.min()) >= 0 and int(ids.max()) < 16
        assert all(len(set(r.tolist())) == 4 for r in ids)


def test_errors():
    with pytest.raises(ValueError, match="number of tokens mismatch"):
        vllm.fused_topk(torch.zeros(3, 4), torch.zeros(4, 8), 2, True)
    with pytest.raises(ValueError, match="Unsupported scoring function"):
        vllm.fused_topk(torch.zeros(3, 4), torch.zeros(3, 8), 2, True, scoring_func="relu")
    with pytest.raises(ValueError, match="does not divide"):
        vllm.grouped_topk(torch.zeros(3, 4), torch.zeros(3, 10), 2, True, 4, 2)
