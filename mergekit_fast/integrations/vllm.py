"""vLLM's MoE routers on the fused routing op (``mergekit_fast.topk_routing``).

``fused_topk`` and ``grouped_topk`` take vLLM's argument names and return its types
(``vllm/model_executor/layers/fused_moe/router/``), with these differences, all in the caller's favour:

* any expert count (vLLM's fused softmax kernel specialises a fixed set and falls back to a slower
  path otherwise), on every backend of the op (CUDA, Triton, C++, torch);
* ties go to the lower expert index on every backend (vLLM's torch.topk path leaves them unspecified);
* NaN or Inf logits (padding rows of CUDA graphs) give in-range, distinct ids and finite weights:
  NaN never wins (see the op's docstring for the exact rules);
* dropped groups are excluded (-inf), never filled with 0;
* the routing weights of ``renormalize=True`` are the softmax over the chosen logits (equal to vLLM's
  p_i / sum(p_j) up to fp32 rounding, and immune to underflow); for sigmoid scores, the sum gets
  +1e-20 (transformers' DeepSeek-V3 rule), so an all-zero row cannot divide by zero.
"""

from __future__ import annotations

import torch

from mergekit_fast.ops.routing import topk_routing

_SCORING = ("softmax", "sigmoid")


def _check(hidden_states: torch.Tensor, gating_output: torch.Tensor, scoring_func: str) -> None:
    if gating_output.dim() != 2:
        raise ValueError(f"gating_output must be [num_tokens, num_experts], got {tuple(gating_output.shape)}")
    if hidden_states.size(0) != gating_output.size(0):
        raise ValueError(
            f"number of tokens mismatch: hidden_states has {hidden_states.size(0)}, gating_output "
            f"{gating_output.size(0)}"
        )
    if scoring_func not in _SCORING:
        raise ValueError(f"Unsupported scoring function: {scoring_func}")


def fused_topk(
    hidden_states: torch.Tensor,
    gating_output: torch.Tensor,
    topk: int,
    renormalize: bool,
    indices_type: torch.dtype | None = None,
    scoring_func: str = "softmax",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """vLLM's ``fused_topk``: (topk_weights fp32 [T, k], topk_ids int32 (or ``indices_type``) [T, k],
    token_expert_indices int32 [T, k]) where ``token_expert_indices[t, j] = j * T + t`` (the row of
    token t's j-th copy in vLLM's expert-major permutation)."""
    _check(hidden_states, gating_output, scoring_func)
    weights, ids = topk_routing(gating_output, topk, scoring=scoring_func, renormalize=renormalize)
    T = gating_output.size(0)
    rows = torch.arange(topk, dtype=torch.int32, device=gating_output.device)[None, :] * T
    token_expert_indices = rows + torch.arange(T, dtype=torch.int32, device=gating_output.device)[:, None]
    if indices_type is not None and indices_type != ids.dtype:
        ids = ids.to(indices_type)
    return weights, ids, token_expert_indices


def grouped_topk(
    hidden_states: torch.Tensor,
    gating_output: torch.Tensor,
    topk: int,
    renormalize: bool,
    num_expert_group: int = 0,
    topk_group: int = 0,
    scoring_func: str = "softmax",
    routed_scaling_factor: float = 1.0,
    e_score_correction_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's ``grouped_topk`` (DeepSeek-V2/V3 routing): (topk_weights fp32 [T, k], topk_ids int32 [T, k]).

    Groups are scored by the sum of their two best biased scores with ``e_score_correction_bias``, else
    by their best score; the ``topk_group`` best groups are kept and the final top-k is taken among their
    experts; weights are the unbiased scores, renormalised and times ``routed_scaling_factor``.
    ``num_expert_group=0`` means no grouping (vLLM requires a group count).
    """
    _check(hidden_states, gating_output, scoring_func)
    E = gating_output.size(1)
    groups = num_expert_group or None
    if groups is not None:
        if E % groups:
            raise ValueError(f"num_expert_group={groups} does not divide the {E} experts")
        if not 1 <= topk_group <= groups:
            raise ValueError(f"topk_group must be in [1, {groups}], got {topk_group}")
    bias = None
    if e_score_correction_bias is not None:
        bias = e_score_correction_bias.to(device=gating_output.device, dtype=torch.float32).reshape(-1)
    return topk_routing(
        gating_output, topk, scoring=scoring_func, renormalize=renormalize, bias=bias, num_groups=groups,
        topk_groups=topk_group if groups is not None else None, scaling=float(routed_scaling_factor),
    )  # fmt: skip
