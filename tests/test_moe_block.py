"""Sparse MoE block forward against transformers' own sparse MoE blocks (random weights)."""

from __future__ import annotations

import pytest
import torch
from helpers import runnable_backends

import mergekit_fast as mk
from mergekit_fast.moe.block import MoEBlock, moe_block_forward
from mergekit_fast.ops import _verify


def _mixtral(E=8, k=2):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    return MixtralSparseMoeBlock(
        MixtralConfig(hidden_size=64, intermediate_size=32, num_local_experts=E, num_experts_per_tok=k)
    )


def _qwen2(norm):
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    cfg = Qwen2MoeConfig(hidden_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                         num_experts=60, num_experts_per_tok=4, norm_topk_prob=norm)  # fmt: skip
    return Qwen2MoeSparseMoeBlock(cfg)


def _qwen3():
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    cfg = Qwen3MoeConfig(hidden_size=64, moe_intermediate_size=32, num_experts=16, num_experts_per_tok=4,
                         norm_topk_prob=True)  # fmt: skip
    return Qwen3MoeSparseMoeBlock(cfg)


def _deepseek_v3():
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    cfg = DeepseekV3Config(hidden_size=64, moe_intermediate_size=32, n_routed_experts=16, n_group=4, topk_group=2,
                           num_experts_per_tok=4, n_shared_experts=1, routed_scaling_factor=2.5)  # fmt: skip
    return DeepseekV3MoE(cfg)


BLOCKS = {
    "mixtral": _mixtral,
    "qwen2_moe": lambda: _qwen2(False),
    "qwen2_moe_norm": lambda: _qwen2(True),
    "qwen3_moe": _qwen3,
    "deepseek_v3": _deepseek_v3,
}


def _randomize(block, dtype):
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    block = block.to(dtype).eval()
    gate = block.gate
    if hasattr(gate, "e_score_correction_bias"):  # fp32 buffer, as in DeepSeek-V3 checkpoints
        gate.e_score_correction_bias.data = torch.randn(gate.weight.shape[0]) * 0.05
    return block


def _tie_tokens(block, h):
    """Tokens whose expert set differs between transformers' router and topk_routing: only allowed
    where transformers' own selection values tie (torch.topk leaves the order of ties unspecified,
    topk_routing picks the lower index). Returns the mask of those tokens."""
    with torch.no_grad():
        logits, _, hf_ids = block.gate(h)
    ours = MoEBlock.from_transformers(block)
    _, ids = mk.topk_routing(logits, ours.k, scoring=ours.scoring, renormalize=ours.renormalize,
                             bias=ours.bias, num_groups=ours.num_groups, topk_groups=ours.topk_groups,
                             group_score=ours.group_score, scaling=ours.scaling)  # fmt: skip
    if ours.bias is not None:
        keys = torch.sigmoid(logits.float()) + ours.bias
    else:
        keys = torch.softmax(logits.float(), dim=-1)
    E = keys.shape[1]
    a = torch.zeros(keys.shape, dtype=torch.bool).scatter_(1, ids.long(), True)
    b = torch.zeros(keys.shape, dtype=torch.bool).scatter_(1, hf_ids.long(), True)
    differ = (a != b).any(dim=1)
    for t in differ.nonzero().flatten().tolist():
        mine, theirs = keys[t][a[t] & ~b[t]], keys[t][b[t] & ~a[t]]
        tol = 2 * _verify.ulp(torch.tensor(1.0), torch.float32) * max(1.0, keys[t].abs().max().item())
        assert (mine.min() - theirs.max()).abs() <= tol, (
            f"token {t}: expert sets differ without a tie ({E} experts)"
        )
    return differ


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(BLOCKS))
def test_block_matches_transformers(name, dtype):
    block = _randomize(BLOCKS[name](), dtype)
    x = torch.randn(3, 67, 64).to(dtype)
    with torch.no_grad():
        ref = block(x)
        out = MoEBlock.from_transformers(block)(x)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    ties = _tie_tokens(block, x.view(-1, 64))
    assert ties.float().mean() <= (0.05 if dtype == torch.bfloat16 else 0.0)
    o, r = out.view(-1, 64)[~ties], ref.view(-1, 64)[~ties]
    # Same experts, same GEMMs, same accumulation order; only the routing weights differ from
    # transformers' by a few fp32 ulps (exp_f32 vs torch.exp, softmax over the chosen logits vs
    # p / sum(p)). Each element sums k weighted expert outputs, so the error is a few ulps of the
    # token's largest element (measured: <= 4): 16 fp32 ulps. In bf16 those fp32 differences
    # almost always vanish in the rounding (measured: bit-identical); a weight or product that
    # sits on a bf16 rounding boundary can round the other way: 1 bf16 ulp of the token scale.
    scale = r.float().abs().amax(dim=1, keepdim=True).expand_as(r)
    _, max_ulp, _ = _verify.max_errors(o, r, scale)
    assert max_ulp <= (16.0 if dtype == torch.float32 else 1.0), max_ulp


@pytest.mark.parametrize("backend", runnable_backends("cpu", ("cpp", "torch")))
def test_block_backends_agree(backend):
    block = _randomize(_deepseek_v3(), torch.bfloat16)
    x = torch.randn(41, 64).to(torch.bfloat16)
    blk = MoEBlock.from_transformers(block)
    with torch.no_grad():
        assert torch.equal(blk(x, backend=backend), blk(x, backend="torch"))


def test_block_empty_and_shapes():
    blk = MoEBlock.from_transformers(_randomize(_qwen2(True), torch.float32))
    with torch.no_grad():
        assert blk(torch.zeros(0, 64)).shape == (0, 64)
        y = blk(torch.randn(2, 3, 5, 64))
    assert y.shape == (2, 3, 5, 64)
    with pytest.raises(ValueError, match="down_proj"):
        MoEBlock(torch.randn(8, 64), torch.randn(8, 32, 64), torch.randn(8, 64, 15), k=2)
    with pytest.raises(ValueError, match="unsupported block"):
        MoEBlock.from_transformers(torch.nn.Linear(3, 3))


def test_block_custom_op_and_compile():
    block = _randomize(_qwen2(False), torch.float32)
    blk = MoEBlock.from_transformers(block)
    x = torch.randn(23, 64)
    args = (x, blk.gate_weight.detach(), blk.gate_up_proj.detach(), blk.down_proj.detach(), blk.k, "softmax",
            False, None, 0, 0, "", 1.0, False, True, blk.shared_gate_proj.detach(), blk.shared_up_proj.detach(),
            blk.shared_down_proj.detach(), blk.shared_expert_gate.detach(), "auto")  # fmt: skip
    torch.library.opcheck(torch.ops.mergekit_fast.moe_block.default, args)
    with torch.no_grad():
        eager = blk(x)
        compiled = torch.compile(lambda h: blk(h) * 2, backend="aot_eager", fullgraph=True)(x)
    assert torch.equal(compiled, eager * 2)
    direct = moe_block_forward(x, *args[1:4], blk.k, renormalize=False, weights_to_logits_dtype=True,
                               shared_gate_proj=args[14], shared_up_proj=args[15], shared_down_proj=args[16],
                               shared_expert_gate=args[17])  # fmt: skip
    assert torch.equal(direct, eager)
