"""The architectures mergekit 0.1.5 defines in JSON whose tensor names follow <prefix>layers.<i>.<rest>.

Generated from mergekit/_data/architectures/*.json (tests/test_plan.py checks the table against the
installed mergekit): per architecture name, its definition family (two models may be merged only within
one family, unless --allow-crimes), the model_type that picks among several definitions of one name,
the tied weights (an optional output weight read from another tensor when it is missing) and the
optional weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class KnownArchitecture:
    family: str  # the JSON definition's file stem: two models may be merged only within one family
    model_type: str  # mergekit picks among several definitions of one name by model_type
    tied: Mapping[str, str]  # optional output weight -> tensor read in its place when it is missing
    optional: tuple[str, ...] = ()  # optional non-layer weights (no tied fallback)
    optional_layer: tuple[str, ...] = ()  # optional per-layer weights (the <rest> part)


_TIE = {"lm_head.weight": "model.embed_tokens.weight"}
_K = KnownArchitecture

KNOWN_ARCHITECTURES: dict[str, KnownArchitecture] = {
    "ApertusForCausalLM": _K("apertus", "apertus", _TIE),
    "ArceeForCausalLM": _K("arcee", "arcee", _TIE),
    "BaichuanForCausalLM": _K("baichuan", "baichuan", {}),
    "ChatGLMModel": _K("chatglm", "chatglm", {}),
    "Cohere2ForCausalLM": _K("cohere2", "cohere2", {}, ("lm_head.weight",)),
    "CohereForCausalLM": _K("cohere", "cohere", {}, ("lm_head.weight",)),
    "GPTNeoXForCausalLM": _K("gpt-neox", "gpt_neox", {}),
    "Gemma2ForCausalLM": _K("gemma2", "gemma2", _TIE),
    "Gemma3ForCausalLM": _K("gemma3", "gemma3_text", _TIE),
    "GemmaForCausalLM": _K("gemma", "gemma", {}),
    "Glm4ForCausalLM": _K(
        "glm4", "glm4", _TIE, (), ("self_attn.k_proj.bias", "self_attn.q_proj.bias", "self_attn.v_proj.bias")
    ),
    "GraniteForCausalLM": _K(
        "granite",
        "granite",
        _TIE,
        (),
        (
            "mlp.down_proj.bias",
            "mlp.gate_proj.bias",
            "mlp.up_proj.bias",
            "self_attn.k_proj.bias",
            "self_attn.o_proj.bias",
            "self_attn.q_proj.bias",
            "self_attn.v_proj.bias",
        ),
    ),
    "InternLM2ForCausalLM": _K("internlm2", "internlm2", {"output.weight": "model.tok_embeddings.weight"}),
    "LLaMaForCausalLM": _K("llama", "llama", _TIE),
    "Lfm2ForCausalLM": _K(
        "lfm2",
        "lfm2",
        {},
        ("lm_head.weight",),
        (
            "conv.conv.weight",
            "conv.in_proj.weight",
            "conv.out_proj.weight",
            "self_attn.k_layernorm.weight",
            "self_attn.k_proj.weight",
            "self_attn.out_proj.weight",
            "self_attn.q_layernorm.weight",
            "self_attn.q_proj.weight",
            "self_attn.v_proj.weight",
        ),
    ),
    "LlamaForCausalLM": _K("llama", "llama", _TIE),
    "LlamaForSequenceClassification": _K("llama-sequence-classification", "llama", {}, ("score.bias",)),
    "MambaForCausalLM": _K("mamba", "mamba", {"lm_head.weight": "backbone.embeddings.weight"}),
    "MistralForCausalLM": _K("mistral", "mistral", _TIE),
    "Olmo2ForCausalLM": _K("olmo2", "olmo2", _TIE),
    "Phi3ForCausalLM": _K("phi3", "phi3", {}),
    "Phi3SmallForCausalLM": _K("phi3-small", "phi3small", _TIE),
    "PhiForCausalLM": _K("phi2", "phi", {}),
    "Qwen2ForCausalLM": _K("qwen2", "qwen2", _TIE),
    "Qwen3ForCausalLM": _K("qwen3", "qwen3", _TIE),
    "SolarForCausalLM": _K("solar", "solar", {"lm_head.weight": "model.lm_head.weight"}),
    "StableLMEpochForCausalLM": _K("stablelm", "stablelm_epoch", {}),
    "StableLmForCausalLM": _K(
        "stablelm2",
        "stablelm",
        {},
        (),
        ("self_attn.k_proj.bias", "self_attn.q_proj.bias", "self_attn.v_proj.bias"),
    ),
    "Starcoder2ForCausalLM": _K("starcoder2", "starcoder2", _TIE),
}
# Names mergekit maps to more than one JSON definition (chosen by model_type; none matching: inferred).
AMBIGUOUS = frozenset({"PhiForCausalLM"})

MOE_ARCHITECTURES = frozenset(
    {
        "MixtralForCausalLM",
        "Qwen2MoeForCausalLM",
        "Qwen3MoeForCausalLM",
        "Glm4MoeForCausalLM",
        "GraniteMoeHybridForCausalLM",
        "_AfmoePartialForCausalLM",
        "DeepseekV2ForCausalLM",
        "DeepseekV3ForCausalLM",
    }
)
MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")

# Markers of a non-layer tensor that sits before the layers (embeddings). Checked against every
# JSON definition above in tests: the rest (final norms, heads, embed_out) comes after the layers.
_PRE_MARKERS = ("embed", "wte", "wpe", "rotary_pos_emb", "position_ids", "relative_pe")


def is_pre_weight(name: str) -> bool:
    """True for a non-layer tensor mergekit plans before the layers (taken from the first slice)."""
    return any(m in name for m in _PRE_MARKERS) and "embed_out" not in name
