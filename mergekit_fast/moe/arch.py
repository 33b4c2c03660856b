"""MoE output architectures: which one a config gets, its config.json, and every output tensor.

Mirrors mergekit-moe 0.1.5 (``moe/{mixtral,deepseek,qwen,qwen3}.py``, ``scripts/moe.py:select_output_arch``):

- candidates in mergekit's order: Mixtral, DeepSeek MoE, Qwen MoE, Qwen3 MoE; ``architecture:`` keeps those
  whose name starts with it (case-insensitive); among the ones that support the config, Mixtral wins,
  otherwise the first. DeepSeek MoE output is not supported here: a config for which mergekit would write
  it is refused with the reason (and ``architecture: qwen`` suggested where Qwen MoE also fits).
- Mixtral (llama/mistral inputs, no shared experts) and Qwen3 MoE (qwen3 inputs) write the transformers-v5
  fused expert tensors ``mlp.experts.gate_up_proj [E, 2I, H]`` (per expert: gate rows, then up rows) and
  ``mlp.experts.down_proj [E, H, I]``: byte for byte the concatenation of the experts' gate_proj/up_proj
  (resp. down_proj) weights, which is what mergekit produces through transformers' checkpoint conversion.
- Qwen MoE (qwen2_moe; llama/mistral/qwen2 inputs, exactly one shared expert) writes per-expert tensors
  ``mlp.experts.<e>.<proj>.weight``, ``mlp.shared_expert.<proj>.weight`` and
  ``mlp.shared_expert_gate.weight [1, H]``, and zero q/k/v biases where the base model has none.
- the non-MLP tensors are those of mergekit's architecture definition (mistral / qwen2 / qwen3 JSON), from
  the base model; an absent optional lm_head (tied embeddings) is not written. Output order is mergekit's.
- config.json comes from the same transformers config classes and the same assignments as mergekit's.

Difference: Qwen MoE zero biases take their length from the q/k/v weights (mergekit computes
``hidden_size // num_attention_heads * heads``, which is wrong -- and the model unloadable -- when the
config has an explicit head_dim that differs; otherwise the two agree).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass

import torch

from mergekit_fast import dtypes
from mergekit_fast.config import ConfigError, NotSupportedError
from mergekit_fast.dtypes import DType
from mergekit_fast.io.model import ModelSource
from mergekit_fast.moe.config import RANDOM_MODES, Expert, MoEConfig
from mergekit_fast.plan import InputRef, OutputTensor

LOG = logging.getLogger(__name__)

# mergekit's architecture definitions (mergekit/_data/architectures/{mistral,qwen2,qwen3}.json): the
# per-layer weights in definition order. Pre: the embedding; post: the final norm and the optional lm_head.
PRE = ("model.embed_tokens.weight",)
POST = ("model.norm.weight", "lm_head.weight")
OPTIONAL = ("lm_head.weight",)
MISTRAL_LAYER = (
    "input_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "post_attention_layernorm.weight",
    "mlp.up_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.down_proj.weight",
)
QWEN2_LAYER = (
    "input_layernorm.weight",
    "mlp.down_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "post_attention_layernorm.weight",
    "self_attn.k_proj.bias",
    "self_attn.k_proj.weight",
    "self_attn.o_proj.weight",
    "self_attn.q_proj.bias",
    "self_attn.q_proj.weight",
    "self_attn.v_proj.bias",
    "self_attn.v_proj.weight",
)
QWEN3_LAYER = (
    "input_layernorm.weight",
    "mlp.down_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "post_attention_layernorm.weight",
    "self_attn.k_norm.weight",
    "self_attn.k_proj.weight",
    "self_attn.q_norm.weight",
    "self_attn.q_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
)
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")


def tensor_seed(base_seed: int, name: str, index: int) -> int:
    """A 63-bit seed for the noise of input ``index`` of output tensor ``name``: independent of the order
    in which the engine runs the tensors and of the device, so a --random-seed build is reproducible."""
    h = hashlib.blake2b(f"{base_seed}:{name}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


@dataclass
class BuildContext:
    """Everything an output architecture needs to lay out the output tensors."""

    config: MoEConfig
    sources: dict[str, ModelSource]  # model path -> opened source
    base_cfg: dict  # the base model's config.json
    out_dtype: DType | None  # config dtype, else the base config's dtype, else None (keep)
    router: torch.Tensor  # [L, E, H] routed-expert gate vectors (already in the output dtype)
    shared_router: torch.Tensor  # [L, S, H] shared-expert gate vectors (S = 0 when ungated)
    noise_seed: int  # base seed for noise_scale

    @property
    def base(self) -> ModelSource:
        return self.sources[self.config.base_model]

    @property
    def num_layers(self) -> int:
        return self.base.num_layers


class _Planner:
    """Accumulates OutputTensors, checking every input tensor's presence and shape on the way."""

    def __init__(self, ctx: BuildContext):
        self.ctx = ctx
        self.tensors: list[OutputTensor] = []
        cfg = ctx.base_cfg
        self.hidden = cfg.get("hidden_size")
        self.inter = cfg.get("intermediate_size")
        if not isinstance(self.hidden, int) or not isinstance(self.inter, int):
            raise ConfigError(
                f"base_model: {ctx.base.path / 'config.json'} needs integer hidden_size and intermediate_size"
            )

    def out_dtype(self, dtype: DType) -> DType:
        return self.ctx.out_dtype or dtype

    def info(self, model: str, name: str, where: str, *, shape=None):
        src = self.ctx.sources[model]
        info = src.tensors.get(name)
        if info is None:
            raise ConfigError(f"{where}: {src.path} has no tensor {name!r}")
        if shape is not None and tuple(info.shape) != tuple(shape):
            raise ConfigError(
                f"{where}: {info.file}: tensor {name!r} has shape {list(info.shape)}, expected {list(shape)} "
                f"(hidden_size {self.hidden}, intermediate_size {self.inter} from the base model)"
            )
        if not info.dtype.is_float:
            raise ConfigError(
                f"{where}: {info.file}: tensor {name!r} has dtype {info.dtype}, not floating point"
            )
        return info

    def copy(self, name: str, *, optional: bool = False) -> bool:
        """A base-model tensor copied unchanged (cast to the output dtype)."""
        src = self.ctx.base
        info = src.tensors.get(name)
        if info is None:
            if optional:
                return False
            raise ConfigError(f"base_model: {src.path} has no tensor {name!r} (needed by the output)")
        info = self.info(self.ctx.config.base_model, name, "base_model")
        self.tensors.append(
            OutputTensor(
                name,
                tuple(info.shape),
                info.dtype,
                self.out_dtype(info.dtype),
                "passthrough",
                (InputRef(self.ctx.config.base_model, name),),
                (("scale", None),),
            )  # fmt: skip
        )
        return True

    def constant(self, name: str, value: torch.Tensor) -> None:
        value = value.contiguous()
        dt = dtypes.of(value.dtype)
        self.tensors.append(
            OutputTensor(name, tuple(value.shape), dt, dt, "moe_constant", (), (("value", value),))
        )

    def expert_inputs(self, layer: int, experts: list[Expert], projs: tuple[str, ...]) -> list[tuple]:
        """(InputRef, TensorInfo, Expert, proj) per expert and projection, in that nesting order."""
        h, i = self.hidden, self.inter
        shapes = {"gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}
        out = []
        for e in experts:
            for proj in projs:
                name = f"model.layers.{layer}.mlp.{proj}.weight"
                info = self.info(e.source_model, name, e.where, shape=shapes[proj])
                out.append((InputRef(e.source_model, name), info, e, proj))
        return out

    def concat(self, name: str, shape: tuple[int, ...], items: list[tuple]) -> None:
        """Output = the inputs' elements one after another (the fused expert layout), each with its expert's
        noise_scale and residual_scale (down_proj only) applied in its own dtype, as mergekit does."""
        in_dtypes = [info.dtype for _, info, _, _ in items]
        in_dtype = in_dtypes[0]
        for d in in_dtypes[1:]:
            in_dtype = dtypes.promote(in_dtype, d)
        transforms = []
        for k, (_, _, e, proj) in enumerate(items):
            scale = e.residual_scale if proj == "down_proj" else None
            noise = e.noise_scale
            seed = tensor_seed(self.ctx.noise_seed, name, k) if noise is not None else None
            transforms.append((noise, seed, scale))
        params: list[tuple[str, object]] = [("shape", tuple(shape))]
        if any(t != (None, None, None) for t in transforms):
            params.append(("transforms", tuple(transforms)))
            if len(set(in_dtypes)) > 1:
                params.append(("math_dtypes", tuple(d.torch for d in in_dtypes)))
        method = "concat" if len(params) == 1 else "moe_concat"
        self.tensors.append(
            OutputTensor(
                name,
                tuple(shape),
                in_dtype,
                self.out_dtype(in_dtype),
                method,
                tuple(ref for ref, _, _, _ in items),
                tuple(params),
            )  # fmt: skip
        )


# ------------------------------------------------------------------------------------------------ archs


@dataclass(frozen=True)
class OutputArchitecture:
    name: str  # mergekit's name (what `architecture:` is matched against)
    input_types: tuple[str, ...]
    supported: bool = True

    def unsupported_reason(self, config: MoEConfig, model_types: dict[str, str]) -> str | None:
        """Why this architecture cannot take the config (mergekit's supports_config), or None."""
        shared = config.shared_experts
        if self.name == "Mixtral" and shared:
            return "Mixtral does not support shared experts"
        if self.name == "DeepSeek MoE" and shared:
            if len(shared) > 1:
                return "DeepSeek MoE does not support more than one shared expert"
            if shared[0].positive_prompts or shared[0].negative_prompts:
                return "DeepSeek MoE does not support gating shared experts (they must have no prompts)"
        if self.name == "Qwen MoE":
            if len(shared) != 1:
                return "Qwen MoE requires exactly one shared expert"
            if config.gate_mode not in RANDOM_MODES and not shared[0].positive_prompts:
                return "Qwen MoE requires the shared expert to have prompts"
        if self.name == "Qwen3 MoE" and shared:
            return "Qwen3 MoE does not support shared experts"
        types = [model_types[m] for m in config.models()]
        if self.name == "Qwen3 MoE":
            bad = sorted({t for t in types if t != "qwen3"})
            return f"Qwen3 MoE only supports qwen3 input models (got {', '.join(bad)})" if bad else None
        if len(set(types)) != 1:
            return f"{self.name} requires all input models to have the same architecture (got {', '.join(sorted(set(types)))})"
        if types[0] not in self.input_types:
            return f"{self.name} requires {' / '.join(self.input_types)} input models (got {types[0]})"
        return None

    # -- config.json
    def out_config(self, base_cfg_path: str, config: MoEConfig, out_dtype: DType | None) -> dict:
        """The output config.json, built with transformers' config classes exactly as mergekit does."""
        import transformers

        base = transformers.AutoConfig.from_pretrained(base_cfg_path)
        n = len(config.experts)
        k = config.experts_per_token or 2
        if self.name == "Mixtral":
            if not isinstance(base, transformers.MistralConfig):
                mistral = transformers.MistralConfig(**base.to_dict())
                mistral.sliding_window = None
                mistral.max_position_embeddings = base.max_position_embeddings
                base = mistral
            out = transformers.MixtralConfig(**base.to_dict())
            out.architectures = ["MixtralForCausalLM"]
            out.num_local_experts = n
            out.num_experts_per_tok = k
            out.sliding_window = None
            out.dtype = out_dtype.torch if out_dtype is not None else None
        elif self.name == "Qwen MoE":
            from transformers.models.qwen2_moe import Qwen2MoeConfig

            out = Qwen2MoeConfig(**base.to_dict())
            out.architectures = ["Qwen2MoeForCausalLM"]
            out.num_experts = n
            out.num_experts_per_tok = k
            out.decoder_sparse_step = 1
            out.norm_topk_prob = True
            out.sliding_window = None
            out.use_sliding_window = False
            out.shared_expert_intermediate_size = out.intermediate_size
            out.moe_intermediate_size = out.intermediate_size
            if out_dtype is not None:
                out.dtype = out_dtype.torch
        elif self.name == "Qwen3 MoE":
            from transformers.models.qwen3_moe import Qwen3MoeConfig

            out = Qwen3MoeConfig(**base.to_dict())
            out.architectures = ["Qwen3MoeForCausalLM"]
            out.num_experts = n
            out.num_experts_per_tok = k
            out.decoder_sparse_step = 1
            out.norm_topk_prob = True
            out.moe_intermediate_size = out.intermediate_size
            if out_dtype is not None:
                out.dtype = out_dtype.torch
        else:
            raise NotSupportedError(f"{self.name} output is not supported yet")
        if n & (n - 1):
            LOG.warning(f"Your model has {n} experts, which is not a power of two. The model will not be usable in llama.cpp.")  # fmt: skip
        # What PretrainedConfig.save_pretrained writes (to_json_file(use_diff=True)).
        return json.loads(out.to_json_string(use_diff=True))

    # -- tensors
    def plan_tensors(self, ctx: BuildContext) -> list[OutputTensor]:
        p = _Planner(ctx)
        L = ctx.num_layers
        cfg = ctx.config
        experts = list(cfg.experts)
        for name in PRE:
            p.copy(name)
        if self.name in ("Mixtral", "Qwen3 MoE"):
            layer_defs = MISTRAL_LAYER if self.name == "Mixtral" else QWEN3_LAYER
            for i in range(L):
                for rest in layer_defs:
                    if ".mlp." not in f".{rest}":
                        p.copy(f"model.layers.{i}.{rest}")
            for name in POST:
                p.copy(name, optional=name in OPTIONAL)
            for i in range(L):
                prefix = f"model.layers.{i}.mlp.experts"
                gate_up = p.expert_inputs(i, experts, ("gate_proj", "up_proj"))
                down = p.expert_inputs(i, experts, ("down_proj",))
                e = len(experts)
                p.concat(f"{prefix}.gate_up_proj", (e, 2 * p.inter, p.hidden), gate_up)
                p.concat(f"{prefix}.down_proj", (e, p.hidden, p.inter), down)
            for i in range(L):
                p.constant(f"model.layers.{i}.mlp.gate.weight", ctx.router[i])
        elif self.name == "Qwen MoE":
            shared = cfg.shared_experts[0]
            base = ctx.base
            for i in range(L):
                for rest in QWEN2_LAYER:
                    name = f"model.layers.{i}.{rest}"
                    if rest.startswith("mlp."):
                        proj = rest.split(".")[1]
                        for e_idx, e in enumerate(experts):
                            items = p.expert_inputs(i, [e], (proj,))
                            out_name = name.replace(".mlp.", f".mlp.experts.{e_idx}.")
                            p.concat(out_name, tuple(items[0][1].shape), items)
                        items = p.expert_inputs(i, [shared], (proj,))
                        p.concat(
                            name.replace(".mlp.", ".mlp.shared_expert."), tuple(items[0][1].shape), items
                        )
                    elif name in base.tensors:
                        p.copy(name)
                    elif rest.endswith("_proj.bias"):
                        # qwen2_moe has q/k/v biases: zeros where the inputs have none (as mergekit).
                        w = p.info(cfg.base_model, name[: -len("bias")] + "weight", "base_model")
                        dtype = ctx.out_dtype or dtypes.float32
                        p.constant(name, torch.zeros(w.shape[0], dtype=dtype.torch))
                    else:
                        p.copy(name)
            for name in POST:
                p.copy(name, optional=name in OPTIONAL)
            for i in range(L):
                p.constant(f"model.layers.{i}.mlp.gate.weight", ctx.router[i])
                p.constant(f"model.layers.{i}.mlp.shared_expert_gate.weight", ctx.shared_router[i])
        else:
            raise NotSupportedError(f"{self.name} output is not supported yet")
        return p.tensors


MIXTRAL = OutputArchitecture("Mixtral", ("llama", "mistral"))
DEEPSEEK = OutputArchitecture("DeepSeek MoE", ("llama", "mistral"), supported=False)
QWEN = OutputArchitecture("Qwen MoE", ("llama", "mistral", "qwen2"))
QWEN3 = OutputArchitecture("Qwen3 MoE", ("qwen3",))
ALL_OUTPUT_ARCHITECTURES = (MIXTRAL, DEEPSEEK, QWEN, QWEN3)


def select_output_arch(config: MoEConfig, model_types: dict[str, str]) -> OutputArchitecture:
    """mergekit's select_output_arch, with its log messages turned into one error."""
    names = ", ".join(a.name for a in ALL_OUTPUT_ARCHITECTURES)
    candidates = list(ALL_OUTPUT_ARCHITECTURES)
    if config.architecture:
        want = config.architecture.lower()
        candidates = [a for a in candidates if a.name.lower().startswith(want)]
        if not candidates:
            raise ConfigError(
                f"architecture: no output architecture matches {config.architecture!r} "
                f"(a case-insensitive prefix of one of: {names})"
            )
    reasons = {a.name: a.unsupported_reason(config, model_types) for a in candidates}
    fitting = [a for a in candidates if reasons[a.name] is None]
    if not fitting:
        why = "; ".join(f"{n}: {r}" for n, r in reasons.items())
        raise ConfigError(f"no output architecture is compatible with the given models and config ({why})")
    chosen = next((a for a in fitting if a.name == "Mixtral"), fitting[0])
    if not chosen.supported:
        others = [a.name for a in fitting if a.supported]
        hint = (
            f"; set `architecture: {others[0].split()[0].lower()}` to build {others[0]} instead"
            if others
            else ""
        )
        raise NotSupportedError(
            f"{chosen.name} output is not supported yet (mergekit-moe would write {chosen.name} for this "
            f"config){hint}"
        )
    if len(fitting) > 1 and chosen.name != "Mixtral":
        LOG.warning(
            "Multiple output architectures are compatible with the given models; using %s", chosen.name
        )
    LOG.info("Selected output architecture: %s", chosen.name)
    return chosen
