"""Sparse MoE block forward (Mixtral, Qwen2/Qwen3-MoE, OLMoE, DeepSeek-V3 style) on the routing op.

router linear -> ``topk_routing`` (with counts and the expert-sorted slot order) -> tokens gathered
in expert order -> per expert ``down(SiLU(gate(x)) * up(x))`` -> scaled by the routing weight ->
added back to each token (expert by expert, ascending, as transformers does) -> plus the shared
expert (Qwen2-MoE: gated by ``sigmoid(shared_expert_gate(x))``; DeepSeek-V3: ungated).

Weights use transformers 5's layout: ``gate.weight`` [E, H], fused ``experts.gate_up_proj``
[E, 2I, H] whose first I rows are the gate projection and last I rows the up projection
(``linear(x, gate_up_proj[e]).chunk(2, -1) -> gate, up``), ``experts.down_proj`` [E, H, I].

Numerics follow transformers' eager block exactly: the router logits in the hidden dtype (fp32
for DeepSeek-V3), routing weights in fp32 (Mixtral, DeepSeek-V3) or cast to the logits' dtype
(Qwen2/3-MoE, OLMoE), each expert's output ``(y * w).to(hidden dtype)`` accumulated into a zero
tensor of the hidden dtype one expert at a time in ascending expert order. Routing differs from
transformers only where transformers' own selection values tie (see mergekit_fast.ops.routing).

``MoEBlock.forward`` runs through the ``mergekit_fast::moe_block`` torch custom op, so
torch.compile captures it as one node. Inference only (no autograd formula is registered).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mergekit_fast.ops.routing import topk_routing

# transformers block classes whose routing this module reproduces.
SUPPORTED_BLOCKS = (
    "MixtralSparseMoeBlock",
    "Qwen2MoeSparseMoeBlock",
    "Qwen3MoeSparseMoeBlock",
    "OlmoeSparseMoeBlock",
    "DeepseekV3MoE",
)


@dataclass
class MoEBlock:
    """Weights and routing parameters of one sparse MoE block (see the module docstring)."""

    gate_weight: torch.Tensor  # [E, H]
    gate_up_proj: torch.Tensor  # [E, 2I, H]
    down_proj: torch.Tensor  # [E, H, I]
    k: int
    scoring: str = "softmax"
    renormalize: bool = True
    bias: torch.Tensor | None = None  # fp32 [E], selection only
    num_groups: int | None = None
    topk_groups: int | None = None
    group_score: str | None = None
    scaling: float = 1.0
    router_fp32: bool = False  # router logits in fp32 (DeepSeek-V3) instead of the hidden dtype
    weights_to_logits_dtype: bool = False  # Qwen-MoE / OLMoE cast the routing weights
    shared_gate_proj: torch.Tensor | None = None  # [Is, H]
    shared_up_proj: torch.Tensor | None = None  # [Is, H]
    shared_down_proj: torch.Tensor | None = None  # [H, Is]
    shared_expert_gate: torch.Tensor | None = None  # [1, H] (Qwen2-MoE)

    def __post_init__(self):
        E, H = self.gate_weight.shape if self.gate_weight.dim() == 2 else (None, None)
        if E is None:
            raise ValueError(f"MoEBlock: gate_weight must be [E, H], got {tuple(self.gate_weight.shape)}")
        if self.gate_up_proj.dim() != 3 or self.gate_up_proj.shape[0] != E or self.gate_up_proj.shape[2] != H:
            raise ValueError(
                f"MoEBlock: gate_up_proj must be [{E}, 2I, {H}], got {tuple(self.gate_up_proj.shape)}"
            )
        two_i = self.gate_up_proj.shape[1]
        if two_i % 2:
            raise ValueError(f"MoEBlock: gate_up_proj's middle dimension {two_i} must be even (gate; up)")
        if tuple(self.down_proj.shape) != (E, H, two_i // 2):
            raise ValueError(
                f"MoEBlock: down_proj must be [{E}, {H}, {two_i // 2}], got {tuple(self.down_proj.shape)}"
            )
        shared = (self.shared_gate_proj, self.shared_up_proj, self.shared_down_proj)
        if any(t is not None for t in shared) and not all(t is not None for t in shared):
            raise ValueError("MoEBlock: shared_gate_proj, shared_up_proj and shared_down_proj go together")
        if self.shared_expert_gate is not None and self.shared_gate_proj is None:
            raise ValueError("MoEBlock: shared_expert_gate needs a shared expert")

    @property
    def num_experts(self) -> int:
        return self.gate_weight.shape[0]

    @classmethod
    def from_transformers(cls, module: torch.nn.Module) -> MoEBlock:
        """The block of a transformers 5 sparse MoE module (one of SUPPORTED_BLOCKS), sharing its
        parameters (no copies)."""
        name = type(module).__name__
        if name not in SUPPORTED_BLOCKS:
            raise ValueError(
                f"MoEBlock.from_transformers: unsupported block {name} (supported: {SUPPORTED_BLOCKS})"
            )
        gate, experts = module.gate, module.experts
        act = getattr(getattr(experts, "config", None), "hidden_act", "silu")
        if act != "silu":
            raise ValueError(
                f"MoEBlock.from_transformers: {name} uses activation {act!r}; only silu is supported"
            )
        impl = getattr(getattr(experts, "config", None), "_experts_implementation", None)
        if impl not in (None, "eager"):
            raise ValueError(f"MoEBlock.from_transformers: experts implementation {impl!r} (eager expected)")
        kw: dict = dict(gate_weight=gate.weight, gate_up_proj=experts.gate_up_proj, down_proj=experts.down_proj,
                        k=int(gate.top_k))  # fmt: skip
        if name == "DeepseekV3MoE":
            kw.update(scoring="sigmoid", renormalize=bool(gate.norm_topk_prob), bias=gate.e_score_correction_bias,
                      num_groups=int(gate.num_group), topk_groups=int(gate.topk_group), group_score="top2_sum",
                      scaling=float(gate.routed_scaling_factor), router_fp32=True)  # fmt: skip
            se = module.shared_experts
            kw.update(shared_gate_proj=se.gate_proj.weight, shared_up_proj=se.up_proj.weight,
                      shared_down_proj=se.down_proj.weight)  # fmt: skip
        elif name == "MixtralSparseMoeBlock":
            kw.update(renormalize=True)
        else:
            kw.update(renormalize=bool(gate.norm_topk_prob), weights_to_logits_dtype=True)
            if hasattr(module, "shared_expert"):
                se = module.shared_expert
                kw.update(shared_gate_proj=se.gate_proj.weight, shared_up_proj=se.up_proj.weight,
                          shared_down_proj=se.down_proj.weight, shared_expert_gate=module.shared_expert_gate.weight)  # fmt: skip
        return cls(**kw)

    def forward(self, hidden: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        """The block's output for ``hidden`` [..., H] (same shape and dtype)."""
        return torch.ops.mergekit_fast.moe_block(
            hidden, self.gate_weight, self.gate_up_proj, self.down_proj, self.k, self.scoring, self.renormalize,
            self.bias, self.num_groups or 0, self.topk_groups or 0, self.group_score or "", float(self.scaling),
            self.router_fp32, self.weights_to_logits_dtype, self.shared_gate_proj, self.shared_up_proj,
            self.shared_down_proj, self.shared_expert_gate, backend,
        )  # fmt: skip

    __call__ = forward


def moe_block_forward(
    hidden: torch.Tensor,
    gate_weight: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    k: int,
    *,
    scoring: str = "softmax",
    renormalize: bool = True,
    bias: torch.Tensor | None = None,
    num_groups: int | None = None,
    topk_groups: int | None = None,
    group_score: str | None = None,
    scaling: float = 1.0,
    router_fp32: bool = False,
    weights_to_logits_dtype: bool = False,
    shared_gate_proj: torch.Tensor | None = None,
    shared_up_proj: torch.Tensor | None = None,
    shared_down_proj: torch.Tensor | None = None,
    shared_expert_gate: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Eager sparse MoE block forward (the implementation behind ``MoEBlock.forward``)."""
    shape = hidden.shape
    H = shape[-1]
    h = hidden.reshape(-1, H)
    if router_fp32:
        logits = F.linear(h.float(), gate_weight.float())
    else:
        logits = F.linear(h, gate_weight)
    w, ids, counts, order = topk_routing(
        logits, k, scoring=scoring, renormalize=renormalize, bias=bias, num_groups=num_groups,
        topk_groups=topk_groups, group_score=group_score, scaling=scaling, backend=backend, return_counts=True,
    )  # fmt: skip
    if weights_to_logits_dtype:
        w = w.to(logits.dtype)
    out = torch.zeros_like(h)
    if h.shape[0]:
        order = order.long()
        tokens = order // k  # token of each slot, in expert order
        xs = h.index_select(0, tokens)  # the tokens gathered once, grouped by expert
        ws = w.reshape(-1).index_select(0, order)
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n == 0:
                continue
            sl = slice(start, start + n)
            start += n
            gate, up = F.linear(xs[sl], gate_up_proj[e]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, down_proj[e])
            y = y * ws[sl, None]
            out.index_add_(0, tokens[sl], y.to(out.dtype))
    if shared_gate_proj is not None:
        s = F.linear(F.silu(F.linear(h, shared_gate_proj)) * F.linear(h, shared_up_proj), shared_down_proj)
        if shared_expert_gate is not None:
            s = torch.sigmoid(F.linear(h, shared_expert_gate)) * s
        out = out + s
    return out.reshape(shape)


@torch.library.custom_op("mergekit_fast::moe_block", mutates_args=())
def _moe_block_op(
    hidden: torch.Tensor,
    gate_weight: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    k: int,
    scoring: str,
    renormalize: bool,
    bias: torch.Tensor | None,
    num_groups: int,
    topk_groups: int,
    group_score: str,
    scaling: float,
    router_fp32: bool,
    weights_to_logits_dtype: bool,
    shared_gate_proj: torch.Tensor | None,
    shared_up_proj: torch.Tensor | None,
    shared_down_proj: torch.Tensor | None,
    shared_expert_gate: torch.Tensor | None,
    backend: str,
) -> torch.Tensor:
    """moe_block_forward as a torch op: num_groups 0 means none, group_score "" means the default."""
    return moe_block_forward(
        hidden, gate_weight, gate_up_proj, down_proj, k, scoring=scoring, renormalize=renormalize, bias=bias,
        num_groups=num_groups or None, topk_groups=topk_groups if num_groups else None,
        group_score=group_score or None, scaling=scaling, router_fp32=router_fp32,
        weights_to_logits_dtype=weights_to_logits_dtype, shared_gate_proj=shared_gate_proj,
        shared_up_proj=shared_up_proj, shared_down_proj=shared_down_proj, shared_expert_gate=shared_expert_gate,
        backend=backend,
    )  # fmt: skip


@_moe_block_op.register_fake
def _moe_block_fake(hidden, *args):
    return torch.empty_like(hidden)
