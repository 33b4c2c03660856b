"""Tiny random transformers models on disk: the demo's inputs and the tests' fixtures.

Needs transformers (the `hf` or `test` extra).

`make_model(path, "llama", ...)` builds a small random model with transformers (offline, from a config
object), saves it with `save_pretrained` (safetensors; sharded when `max_shard_size` is given) and
returns the directory. Every parameter gets seed-dependent noise on top of transformers' init, so two
models built with different seeds differ in every tensor (norm weights included) and two models built
with the same arguments are bit-identical.

Typical use in a test module:

    @pytest.fixture(scope="session")
    def llama_pair(tmp_path_factory):
        root = tmp_path_factory.mktemp("models")
        return make_model(root / "a", seed=1), make_model(root / "b", seed=2)
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "mixtral", "qwen2_moe", "qwen3_moe")
# Mixture-of-experts test models: 4 experts, 2 per token (qwen2_moe also has its shared expert).
MOE_ARCHITECTURES = ("mixtral", "qwen2_moe", "qwen3_moe")


def _config(arch: str, **kw):
    import transformers

    classes = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
        "gemma": transformers.GemmaConfig,
        "phi3": transformers.Phi3Config,
        "mixtral": transformers.MixtralConfig,
        "qwen2_moe": transformers.Qwen2MoeConfig,
        "qwen3_moe": transformers.Qwen3MoeConfig,
    }
    if arch not in classes:
        raise ValueError(f"unknown test architecture {arch!r}; choose one of {ARCHITECTURES}")
    return classes[arch](**kw)


def make_model(
    path: str | Path,
    arch: str = "llama",
    *,
    num_layers: int = 4,
    hidden_size: int = 32,
    intermediate_size: int = 64,
    vocab_size: int = 128,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    tie_word_embeddings: bool = False,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    max_shard_size: int | str | None = None,
    tokenizer: bool = False,
    architectures: list[str] | None = None,
    **config_overrides,
) -> Path:
    """Build a tiny random `arch` model, save it to `path` and return `path` (a Path).

    arch: one of ARCHITECTURES. qwen2 has q/k/v biases; phi3 uses fused qkv_proj and gate_up_proj;
    gemma always ties its embeddings. `max_shard_size` (bytes or "10KB") produces a sharded checkpoint
    with model.safetensors.index.json. `tokenizer=True` also writes a word-level fast tokenizer whose
    vocabulary has exactly `vocab_size` tokens. `architectures` overrides config.architectures (for
    example to pose as an architecture mergekit does not know). Extra keyword arguments go to the config.
    """
    import transformers

    path = Path(path)
    kw = dict(
        num_hidden_layers=num_layers,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        vocab_size=vocab_size,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        tie_word_embeddings=tie_word_embeddings,
        max_position_embeddings=256,
    )
    if arch == "gemma":
        kw["head_dim"] = hidden_size // num_heads
        kw["tie_word_embeddings"] = True
    if arch == "phi3":
        kw.update(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "mixtral":
        kw.update(num_local_experts=4, num_experts_per_tok=2)
    if arch in ("qwen2_moe", "qwen3_moe"):
        kw.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=intermediate_size,
                  decoder_sparse_step=1, mlp_only_layers=[])  # fmt: skip
        if arch == "qwen2_moe":
            kw.update(shared_expert_intermediate_size=intermediate_size)
    fused = config_overrides.pop("fused_experts", False)
    kw.update(config_overrides)
    config = _config(arch, **kw)

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    gen = torch.Generator().manual_seed(10_000 + seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.05)
    model = model.to(dtype)
    path.mkdir(parents=True, exist_ok=True)
    save_kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **save_kw)
    if fused:
        fuse_experts(path)
    if architectures is not None:
        cfg_path = path / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["architectures"] = list(architectures)
        cfg_path.write_text(json.dumps(cfg, indent=2))
    if tokenizer:
        write_tokenizer(path, vocab_size)
    return path


def fuse_state_dict(sd: dict) -> dict:
    """A state dict's per-expert MoE tensors stacked into transformers 5's fused layout (see fuse_experts);
    other tensors unchanged (``block_sparse_moe.`` renamed ``mlp.``)."""
    import re

    out, experts = {}, {}
    pat = re.compile(
        r"^(.*)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$"
    )
    for name, value in sd.items():
        m = pat.match(name)
        if m:
            experts.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = value
        else:
            out[name.replace(".block_sparse_moe.", ".mlp.")] = value
    for prefix, per in experts.items():
        e = [per[i] for i in sorted(per)]
        gate, up, down = ("w1", "w3", "w2") if "w1" in e[0] else ("gate_proj", "up_proj", "down_proj")
        out[f"{prefix}.mlp.experts.gate_up_proj"] = torch.stack([torch.cat([x[gate], x[up]]) for x in e])
        out[f"{prefix}.mlp.experts.down_proj"] = torch.stack([x[down] for x in e])
    return out


def fuse_experts(path: str | Path) -> Path:
    """Rewrite an MoE checkpoint that transformers saved with per-expert tensors (``experts.<e>.w1`` /
    ``gate_proj``, ...) in the fused layout of transformers 5's modules (``mlp.experts.gate_up_proj``
    [E, 2I, H], ``mlp.experts.down_proj`` [E, H, I], ``mlp.gate.weight``), written here with torch alone
    (stack and concatenate) -- an independent writer of the layout mergekit_fast.conversion reads."""
    from safetensors.torch import load_file, save_file

    path = Path(path)
    out = fuse_state_dict(load_file(path / "model.safetensors"))
    (path / "model.safetensors").unlink()
    save_file(out, path / "model.safetensors", metadata={"format": "pt"})
    return path


# Tiny configs of other layouts (tests of architectures, modules and vocabularies): name -> (model class,
# config class, config keyword arguments). Vision-language and encoder-decoder models included.
_TEXT = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, vocab_size=128, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
OTHER_LAYOUTS = {
    "gpt2": ("GPT2LMHeadModel", "GPT2Config", dict(n_layer=2, n_embd=32, n_head=4, vocab_size=128, n_positions=64,
                                                   bos_token_id=1, eos_token_id=2)),
    "gpt_neox": ("GPTNeoXForCausalLM", "GPTNeoXConfig", dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                                              vocab_size=128, num_attention_heads=4,
                                                              max_position_embeddings=64)),
    "mpt": ("MptForCausalLM", "MptConfig", dict(n_layers=2, d_model=32, n_heads=4, vocab_size=128, max_seq_len=64)),
    "starcoder2": ("Starcoder2ForCausalLM", "Starcoder2Config", dict(_TEXT)),
    "mamba": ("MambaForCausalLM", "MambaConfig", dict(num_hidden_layers=2, hidden_size=32, vocab_size=128,
                                                      state_size=4)),
    "roberta": ("RobertaForMaskedLM", "RobertaConfig", dict(_TEXT, num_key_value_heads=None, pad_token_id=1)),
    "t5": ("T5ForConditionalGeneration", "T5Config", dict(num_layers=2, num_decoder_layers=2, d_model=32, d_kv=8,
                                                          d_ff=64, num_heads=4, vocab_size=128,
                                                          feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                                                          decoder_start_token_id=0)),
    "whisper": ("WhisperForConditionalGeneration", "WhisperConfig", dict(
        vocab_size=128, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8, max_source_positions=16,
        max_target_positions=16, pad_token_id=1, bos_token_id=2, eos_token_id=3, decoder_start_token_id=2)),
    "mistral3": ("Mistral3ForConditionalGeneration", "Mistral3Config", dict(
        text_config=dict(_TEXT, head_dim=8, model_type="mistral"),
        vision_config=dict(model_type="pixtral", num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                           num_attention_heads=4, image_size=32, patch_size=8, head_dim=8))),
    "qwen2_vl": ("Qwen2VLForConditionalGeneration", "Qwen2VLConfig", dict(
        text_config=dict(_TEXT, head_dim=8, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2, in_channels=3,
                           patch_size=2, spatial_merge_size=2, temporal_patch_size=2))),
    "llava": ("LlavaForConditionalGeneration", "LlavaConfig", dict(
        text_config=dict(_TEXT, model_type="llama"),
        vision_config=dict(model_type="clip_vision_model", num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                           num_attention_heads=4, image_size=32, patch_size=8, projection_dim=32),
        image_token_index=127)),
}  # fmt: skip


def make_layout_model(path: str | Path, kind: str, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                      tokenizer: bool = False, **config_overrides) -> Path:  # fmt: skip
    """A tiny random model of another layout (``OTHER_LAYOUTS``: GPT-2, GPT-NeoX, MPT, T5, Whisper,
    LLaVA, Mistral3, Qwen2-VL, ...) saved with ``save_pretrained``; seed-dependent noise on every
    parameter as in ``make_model``. ``tokenizer=True`` writes a word-level tokenizer of the text vocabulary."""
    import transformers

    model_cls, config_cls, kw = OTHER_LAYOUTS[kind]
    kw = {**kw, **config_overrides}
    config = getattr(transformers, config_cls)(**kw)
    torch.manual_seed(seed)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        model = getattr(transformers, model_cls)(config)
        gen = torch.Generator().manual_seed(10_000 + seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.05)
        model = model.to(dtype)
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(path)
    finally:
        transformers.logging.set_verbosity(verbosity)
    if tokenizer:
        text = kw.get("text_config") or kw
        write_tokenizer(path, text.get("vocab_size", 128))
    return path


def write_tokenizer(path: str | Path, vocab_size: int, *, shift: int = 0) -> Path:
    """Write a word-level fast tokenizer with `vocab_size` tokens to `path`.

    Token i is "<unk>", "<s>", "</s>" for i < 3 and "w{i + shift}" otherwise, so a non-zero `shift`
    gives a tokenizer whose vocabulary differs from the default one.
    """
    import tokenizers
    import transformers

    specials = ["<unk>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for i in range(len(specials), vocab_size):
        vocab[f"w{i + shift}"] = i
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(path)
    return Path(path)


def make_synthetic_model(
    path: str | Path,
    *,
    num_layers: int = 4,
    hidden_size: int = 64,
    intermediate_size: int = 176,
    vocab_size: int = 256,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    max_shard_size: int | None = None,
) -> Path:
    """A random Mistral-shaped checkpoint written with torch and our own writer only (no transformers):
    config.json plus model.safetensors with the tensor names and shapes transformers uses. For
    benchmarks and the GPU check, where building a model through transformers is too slow or
    transformers is not installed. Values are N(0, 0.02), tensor by tensor, so memory stays small
    (one tensor at a time: a 7B model needs well under 1 GB).

    ``max_shard_size`` (bytes) writes the checkpoint the way ``save_pretrained`` shards one: the tensors
    in module order (embeddings, layer 0, 1, ..., final norm, lm_head) cut into
    ``model-0000i-of-0000n.safetensors`` files of at most that many bytes (a larger tensor alone), names
    sorted within each file, and ``model.safetensors.index.json``; the values are the same as unsharded.
    """
    from mergekit_fast.io.safetensors import ShardWriter

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    h, i, hd = hidden_size, intermediate_size, hidden_size // num_heads
    kv = num_kv_heads * hd
    shapes = {
        "model.embed_tokens.weight": (vocab_size, h),
        "model.norm.weight": (h,),
        "lm_head.weight": (vocab_size, h),
    }
    for layer in range(num_layers):
        p = f"model.layers.{layer}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i),
        })  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    groups = _synthetic_shards(shapes, num_layers, dtype, max_shard_size)
    names = ["model.safetensors"] if len(groups) == 1 else [
        f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]  # fmt: skip
    writers = {}
    try:
        for fname, group in zip(names, groups):
            w = ShardWriter(
                path / fname, [(n, dtype, shapes[n]) for n in sorted(group)], metadata={"format": "pt"}
            )
            writers.update((n, w) for n in group)
        for name, shape in sorted(shapes.items()):  # the same draws whatever the sharding
            if name.endswith("norm.weight"):
                value = 1.0 + 0.1 * torch.randn(shape, generator=gen)
            else:
                value = torch.randn(shape, generator=gen).mul_(0.02)  # in place: the same values, no copy
            writers[name].write(name, value.to(dtype))
            del value
        for w in {id(w): w for w in writers.values()}.values():
            w.close()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    if len(groups) > 1:
        itemsize = torch.empty((), dtype=dtype).element_size()
        index = {
            "metadata": {"total_size": sum(math.prod(s) for s in shapes.values()) * itemsize},
            "weight_map": {n: fname for fname, group in zip(names, groups) for n in sorted(group)},
        }
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config = {
        "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": h,
        "intermediate_size": i, "num_hidden_layers": num_layers, "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads, "head_dim": hd, "vocab_size": vocab_size, "hidden_act": "silu",
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "sliding_window": None,
        "tie_word_embeddings": False, "dtype": str(dtype).replace("torch.", ""), "bos_token_id": 1,
        "eos_token_id": 2, "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
    }  # fmt: skip
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return path


def _synthetic_shards(shapes: dict, num_layers: int, dtype, max_shard_size: int | None) -> list[list[str]]:
    """The tensors of each shard, in module order as save_pretrained cuts them (one group unsharded)."""
    if max_shard_size is None:
        return [list(shapes)]
    itemsize = torch.empty((), dtype=dtype).element_size()
    order = ["model.embed_tokens.weight"]
    for layer in range(num_layers):
        order += sorted(n for n in shapes if n.startswith(f"model.layers.{layer}."))
    order += ["model.norm.weight", "lm_head.weight"]
    groups: list[list[str]] = [[]]
    size = 0
    for name in order:
        nbytes = math.prod(shapes[name]) * itemsize
        if groups[-1] and size + nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return groups


def slerp_gradient_config(a: str | Path, b: str | Path, num_layers: int, dtype: str = "bfloat16") -> str:
    """The classic gradient SLERP config of mergekit's docs (self_attn and mlp filters), as YAML."""
    return f"""\
slices:
  - sources:
      - model: {a}
        layer_range: [0, {num_layers}]
      - model: {b}
        layer_range: [0, {num_layers}]
merge_method: slerp
base_model: {a}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: {dtype}
"""


def make_synthetic_moe(
    path: str | Path,
    *,
    num_layers: int = 1,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_experts: int = 4,
    vocab_size: int = 256,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> Path:
    """A random Mixtral checkpoint in transformers 5's fused expert layout, written with torch and our own
    writer only, one expert slab at a time: a model with 1 GB fused expert tensors needs no more memory
    than one expert's (the bounded-memory tests and benchmarks)."""
    from mergekit_fast.io.safetensors import ShardWriter

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    h, i, e, hd = hidden_size, intermediate_size, num_experts, hidden_size // num_heads
    kv = num_kv_heads * hd
    shapes = {
        "model.embed_tokens.weight": (vocab_size, h),
        "model.norm.weight": (h,),
        "lm_head.weight": (vocab_size, h),
    }
    for layer in range(num_layers):
        p = f"model.layers.{layer}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate.weight": (e, h), p + "mlp.experts.gate_up_proj": (e, 2 * i, h),
            p + "mlp.experts.down_proj": (e, h, i),
        })  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    names = sorted(shapes)
    writer = ShardWriter(
        path / "model.safetensors", [(n, dtype, shapes[n]) for n in names], metadata={"format": "pt"}
    )
    for name in names:
        shape = shapes[name]
        if name.endswith("norm.weight"):
            writer.write(name, (1.0 + 0.1 * torch.randn(shape, generator=gen)).to(dtype))
        elif "experts." in name:
            slab = shape[1:]
            for k in range(shape[0]):
                value = (0.02 * torch.randn(slab, generator=gen)).to(dtype)
                writer.write_at(name, k * value.numel() * value.element_size(), value)
        else:
            writer.write(name, (0.02 * torch.randn(shape, generator=gen)).to(dtype))
    writer.close()
    config = {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": h, "intermediate_size": i,
        "num_hidden_layers": num_layers, "num_attention_heads": num_heads, "num_key_value_heads": num_kv_heads,
        "head_dim": hd, "vocab_size": vocab_size, "num_local_experts": e, "num_experts_per_tok": 2,
        "hidden_act": "silu", "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 1e6,
        "sliding_window": None, "tie_word_embeddings": False, "dtype": str(dtype).replace("torch.", ""),
        "bos_token_id": 1, "eos_token_id": 2, "router_aux_loss_coef": 0.02, "output_router_logits": False,
    }  # fmt: skip
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return path
