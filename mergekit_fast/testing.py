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
from pathlib import Path

import torch

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3")


def _config(arch: str, **kw):
    import transformers

    classes = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
        "gemma": transformers.GemmaConfig,
        "phi3": transformers.Phi3Config,
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
    if architectures is not None:
        cfg_path = path / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["architectures"] = list(architectures)
        cfg_path.write_text(json.dumps(cfg, indent=2))
    if tokenizer:
        write_tokenizer(path, vocab_size)
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
