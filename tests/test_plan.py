"""mergekit_fast.plan against mergekit 0.1.5's own MergePlanner on tiny random models.

For every config, mergekit's planner builds its task graph for the same files; the oracle reads, per
output tensor in mergekit's execution order: the output name, the input tensors it loads (after the tied
lm_head fallback), the method, the resolved parameters (t, weights, normalize, scale) and the dtypes.
The plan must agree on all of them.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from fixtures_models import make_model, write_tokenizer
from helpers import DOC_SELF_ATTN, assert_same_plan, mergekit_plan
from safetensors.torch import load_file, save_file

from mergekit_fast import dtypes
from mergekit_fast.config import ConfigError, parse_config
from mergekit_fast.io.model import ModelSource
from mergekit_fast.plan import KNOWN_ARCHITECTURES, MergePlan, build_plan, is_pre_weight
from mergekit_fast.testing import slerp_gradient_config

# --------------------------------------------------------------------------------------------------
# Models (built once per session)


@pytest.fixture(scope="session")
def m(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("plan_models")
    spec = {
        "a": dict(seed=1, tokenizer=True),
        "b": dict(seed=2, tokenizer=True),
        "c": dict(seed=3),
        "l8": dict(seed=4, num_layers=8),
        "t1": dict(seed=5, tie_word_embeddings=True),
        "t2": dict(seed=6, tie_word_embeddings=True),
        "sharded": dict(seed=7, max_shard_size="20KB"),
        "f16": dict(seed=8, dtype=torch.float16),
        "wide": dict(seed=9, hidden_size=48),
        "q1": dict(arch="qwen2", seed=10),
        "q2": dict(arch="qwen2", seed=11, tie_word_embeddings=True),
        "p1": dict(arch="phi3", seed=12),
        "p2": dict(arch="phi3", seed=13),
        "g1": dict(arch="gemma", seed=14),
        "g2": dict(arch="gemma", seed=15),
        "mi": dict(arch="mistral", seed=16),
        "u1": dict(seed=17, architectures=["FooForCausalLM"]),
        "u2": dict(seed=18, architectures=["FooForCausalLM"]),
        "bias": dict(seed=19, attention_bias=True),
        "shift": dict(seed=20),
    }
    out = {}
    for name, kw in spec.items():
        kw = dict(kw)
        arch = kw.pop("arch", "llama")
        out[name] = str(make_model(root / name, arch, **kw))
    write_tokenizer(out["shift"], 128, shift=1)  # a vocabulary that disagrees with a/b's
    for name, seed in (("d1", 21), ("d2", 22)):  # 32 layers for the reference gradient table
        out[name] = str(
            make_model(
                root / name,
                seed=seed,
                num_layers=32,
                hidden_size=16,
                intermediate_size=32,
                vocab_size=64,
                num_heads=2,
                num_kv_heads=1,
            )  # fmt: skip
        )
    return out


def plan_of(text: str) -> MergePlan:
    return build_plan(parse_config(text))


def compare_with_mergekit(text: str, **kw) -> MergePlan:
    ours = plan_of(text)
    rows, out_cfg = mergekit_plan(text)
    assert_same_plan(ours, rows, out_cfg=out_cfg, **kw)
    return ours


# --------------------------------------------------------------------------------------------------
# Configs compared tensor by tensor with mergekit


def slerp_gradient(a, b, n):
    return slerp_gradient_config(a, b, n)


def t_of(plan: MergePlan, name: str) -> float:
    (t,) = [x for x in plan.tensors if x.name == name]
    return dict(t.params)["t"]


def test_gradient_slerp_reference_table(m):
    plan = plan_of(slerp_gradient(m["d1"], m["d2"], 32))
    attn = [t_of(plan, f"model.layers.{i}.self_attn.k_proj.weight") for i in range(32)]
    mlp = [t_of(plan, f"model.layers.{i}.mlp.down_proj.weight") for i in range(32)]
    assert attn == pytest.approx(DOC_SELF_ATTN, abs=1.5e-3)
    assert mlp == pytest.approx([1 - x for x in attn], abs=1e-12)
    for name in (
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.norm.weight",
        "model.layers.7.input_layernorm.weight",
    ):
        assert t_of(plan, name) == 0.5
    first = plan.tensors[[t.name for t in plan.tensors].index("model.layers.0.self_attn.q_proj.weight")]
    assert [i.model for i in first.inputs] == [m["d1"], m["d2"]]  # (base, other)
    assert first.in_dtype == torch.bfloat16 and first.out_dtype == torch.bfloat16
    assert plan.out_config["num_hidden_layers"] == 32 and plan.out_config["dtype"] == "bfloat16"


@pytest.mark.mergekit
def test_gradient_slerp_32_layers_vs_mergekit(m):
    compare_with_mergekit(slerp_gradient(m["d1"], m["d2"], 32), dtype="bfloat16")


@pytest.mark.mergekit
def test_gradient_slerp_base_second_and_out_dtype(m):
    text = slerp_gradient(m["b"], m["a"], 4).replace("base_model: " + m["b"], "base_model: " + m["a"])
    text += "out_dtype: float16\n"
    plan = compare_with_mergekit(text, dtype="bfloat16", out_dtype="float16")
    t = plan.tensors[0]
    assert [i.model for i in t.inputs] == [m["a"], m["b"]]  # base first even though listed second
    assert plan.out_config["dtype"] == "float16"


@pytest.mark.mergekit
def test_linear_three_models(m):
    text = f"""
merge_method: linear
models:
  - model: {m["a"]}
    parameters:
      weight: [{{filter: self_attn, value: [1, 0]}}, {{value: 0.6}}]
  - model: {m["b"]}
    parameters: {{weight: 0.3}}
  - model: {m["c"]}
parameters:
  weight: 0.1
  normalize: false
"""
    plan = compare_with_mergekit(text)
    t = [x for x in plan.tensors if x.name == "model.layers.0.self_attn.q_proj.weight"][0]
    assert t.params == (("weights", (1.0, 0.3, 0.1)), ("normalize", False))
    assert t.in_dtype == torch.bfloat16


@pytest.mark.mergekit
def test_linear_base_not_listed_is_appended(m):
    text = f"""
merge_method: linear
base_model: {m["c"]}
models:
  - model: {m["a"]}
    parameters: {{weight: 2}}
  - model: {m["b"]}
    parameters: {{weight: 1}}
parameters: {{weight: 0.5}}
dtype: float32
"""
    plan = compare_with_mergekit(text, dtype="float32")
    assert [i.model for i in plan.tensors[0].inputs] == [m["a"], m["b"], m["c"]]
    assert dict(plan.tensors[0].params)["weights"] == (2.0, 1.0, 0.5)


@pytest.mark.mergekit
def test_linear_mixed_dtypes_promote(m):
    # base_model only picks the donor config here (linear ignores it): without one, mergekit takes the
    # config of list(set(models))[0], which depends on PYTHONHASHSEED
    text = f"""
merge_method: linear
base_model: {m["a"]}
models:
  - model: {m["a"]}
  - model: {m["f16"]}
parameters: {{weight: 1}}
"""
    plan = compare_with_mergekit(text)
    # bf16 + fp16 promote to fp32 (torch.promote_types, as mergekit's promoted_dtype)
    assert {t.in_dtype for t in plan.tensors} == {dtypes.float32}


@pytest.mark.mergekit
def test_dus_overlapping_slices_with_scale_filters(m):
    text = f"""
merge_method: passthrough
slices:
  - sources:
      - model: {m["l8"]}
        layer_range: [0, 6]
  - sources:
      - model: {m["l8"]}
        layer_range: [2, 8]
        parameters:
          scale:
            - filter: o_proj
              value: 0.5
            - filter: layers.7.
              value: [1, 2]
  - sources:
      - model: {m["l8"]}
        layer_range: [4, 5]
        parameters:
          scale: [3, 5]
dtype: bfloat16
"""
    plan = compare_with_mergekit(text, dtype="bfloat16")
    names = [t.name for t in plan.tensors]
    assert plan.out_config["num_hidden_layers"] == 13
    byname = dict(zip(names, plan.tensors))
    # out 6 <- in 2 and out 11 <- in 7; the per-input filter "layers.7." sees the INPUT name
    assert byname["model.layers.6.mlp.up_proj.weight"].inputs[0].tensor == "model.layers.2.mlp.up_proj.weight"
    assert byname["model.layers.11.mlp.up_proj.weight"].params == (("scale", 2.0),)
    assert byname["model.layers.11.self_attn.o_proj.weight"].params == (("scale", 0.5),)
    assert byname["model.layers.12.mlp.up_proj.weight"].params == (("scale", 5.0),)  # one-layer slice: t = 1
    assert byname["model.layers.0.mlp.up_proj.weight"].params == (("scale", None),)
    # a duplicated layer is written right after its first copy (same input tensor)
    assert (
        names.index("model.layers.6.mlp.up_proj.weight")
        == names.index("model.layers.2.mlp.up_proj.weight") + 1
    )


@pytest.mark.mergekit
def test_dus_two_models_pre_and_post_weights(m):
    # embeddings from the first slice's model, final norm and lm_head from the last slice's
    text = f"""
merge_method: passthrough
slices:
  - sources:
      - model: {m["a"]}
        layer_range: [0, 3]
  - sources:
      - model: {m["b"]}
        layer_range: [1, 4]
"""
    plan = compare_with_mergekit(text)
    src = {t.name: t.inputs[0].model for t in plan.tensors}
    assert src["model.embed_tokens.weight"] == m["a"]
    assert src["model.norm.weight"] == m["b"] and src["lm_head.weight"] == m["b"]
    assert plan.out_config["num_hidden_layers"] == 6


@pytest.mark.mergekit
def test_sharded_input_and_out_dtype(m):
    assert len(ModelSource.open(m["sharded"]).files) > 1
    text = f"""
merge_method: slerp
base_model: {m["sharded"]}
models:
  - model: {m["sharded"]}
  - model: {m["a"]}
parameters: {{t: [0.2, 0.8]}}
dtype: float32
out_dtype: bfloat16
"""
    plan = compare_with_mergekit(text, dtype="float32", out_dtype="bfloat16")
    files = {ModelSource.open(m["sharded"]).tensors[t.inputs[0].tensor].file for t in plan.tensors}
    assert len(files) > 1


@pytest.mark.mergekit
def test_tied_and_untied_slerp_uses_embedding_for_lm_head(m):
    text = f"""
merge_method: slerp
base_model: {m["t1"]}
models:
  - model: {m["t1"]}
  - model: {m["a"]}
parameters: {{t: 0.3}}
"""
    plan = compare_with_mergekit(text)
    names = [t.name for t in plan.tensors]
    head = plan.tensors[names.index("lm_head.weight")]
    assert head.inputs == (
        type(head.inputs[0])(m["t1"], "model.embed_tokens.weight"),
        type(head.inputs[0])(m["a"], "lm_head.weight"),
    )
    assert names.index("lm_head.weight") == names.index("model.embed_tokens.weight") + 1


@pytest.mark.mergekit
def test_all_tied_writes_no_lm_head(m):
    text = f"""
merge_method: linear
models:
  - model: {m["t1"]}
    parameters: {{weight: 1}}
  - model: {m["t2"]}
    parameters: {{weight: 2}}
"""
    plan = compare_with_mergekit(text)
    assert "lm_head.weight" not in {t.name for t in plan.tensors}
    assert plan.out_config["tie_word_embeddings"] is True


@pytest.mark.mergekit
@pytest.mark.parametrize("pair", [("q1", "q2"), ("p1", "p2"), ("g1", "g2")], ids=["qwen2", "phi3", "gemma"])
def test_other_architectures_slerp(m, pair):
    a, b = (m[x] for x in pair)
    plan = compare_with_mergekit(slerp_gradient(a, b, 4), dtype="bfloat16")
    names = {t.name for t in plan.tensors}
    if pair[0] == "q1":
        assert "model.layers.3.self_attn.q_proj.bias" in names
        head = [t for t in plan.tensors if t.name == "lm_head.weight"][0]
        assert head.inputs[1].tensor == "model.embed_tokens.weight"  # q2 is tied
    if pair[0] == "p1":
        assert {"model.layers.0.self_attn.qkv_proj.weight", "model.layers.0.mlp.gate_up_proj.weight"} <= names


@pytest.mark.mergekit
def test_unknown_architecture_matches_mergekit_inference(m):
    # mergekit infers the layout of an architecture it has no definition for: every non-layer tensor
    # comes from the first slice. It leaves num_hidden_layers alone; mergekit_fast sets it.
    text = f"""
merge_method: passthrough
slices:
  - sources:
      - model: {m["u1"]}
        layer_range: [0, 3]
  - sources:
      - model: {m["u2"]}
        layer_range: [1, 4]
"""
    ours = plan_of(text)
    rows, out_cfg = mergekit_plan(text)
    assert_same_plan(ours, rows, check_config=False)
    assert {t.name: t.inputs[0].model for t in ours.tensors}["model.norm.weight"] == m["u1"]
    assert out_cfg["num_hidden_layers"] == 4 and ours.out_config["num_hidden_layers"] == 6
    assert {k: v for k, v in ours.out_config.items() if k != "num_hidden_layers"} == {
        k: v for k, v in out_cfg.items() if k != "num_hidden_layers"
    }


@pytest.mark.mergekit
def test_per_slice_base_and_parameters(m):
    text = f"""
merge_method: slerp
slices:
  - sources:
      - {{model: {m["a"]}, layer_range: [0, 2]}}
      - {{model: {m["b"]}, layer_range: [2, 4]}}
    base_model: {m["b"]}
    parameters:
      t: [{{filter: mlp, value: [0.1, 0.9]}}]
  - sources:
      - {{model: {m["a"]}, layer_range: [3, 4]}}
      - {{model: {m["b"]}, layer_range: [0, 1]}}
parameters:
  t: 0.4
base_model: {m["a"]}
"""
    plan = compare_with_mergekit(text)
    by = {t.name: t for t in plan.tensors}
    assert by["model.layers.1.mlp.up_proj.weight"].inputs[0] == type(by["lm_head.weight"].inputs[0])(
        m["b"], "model.layers.3.mlp.up_proj.weight"
    )
    assert dict(by["model.layers.1.mlp.up_proj.weight"].params)["t"] == pytest.approx(0.9)
    assert dict(by["model.layers.2.mlp.up_proj.weight"].params)["t"] == 0.4


# --------------------------------------------------------------------------------------------------
# The written model: config.json, tensor names, dtypes and write order, from mergekit-yaml itself


@pytest.mark.mergekit
def test_written_model_matches_plan(m, tmp_path):
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    os.environ["HF_HUB_OFFLINE"] = "1"
    text = f"""
merge_method: linear
base_model: {m["a"]}
models:
  - model: {m["a"]}
    parameters: {{weight: 1}}
  - model: {m["f16"]}
    parameters: {{weight: 3}}
"""
    out = tmp_path / "out"
    opts = MergeOptions(write_model_card=False, quiet=True, out_shard_size=20_000)
    run_merge(
        MergeConfiguration.model_validate(yaml.safe_load(text)), str(out), options=opts, config_source=text
    )
    plan = plan_of(text)
    assert json.loads((out / "config.json").read_text()) == plan.out_config
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert sorted(weight_map) == sorted(t.name for t in plan.tensors)
    tensors = {}
    for f in sorted(set(weight_map.values())):
        tensors.update(load_file(str(out / f)))
    for t in plan.tensors:
        assert tensors[t.name].dtype == t.out_dtype and tuple(tensors[t.name].shape) == t.shape
    # mergekit fills shards in its execution order: along the plan's order shard numbers never decrease
    shard_seq = [int(weight_map[t.name].split("-")[1]) for t in plan.tensors]
    assert shard_seq == sorted(shard_seq) and shard_seq[-1] > 1
    assert plan.tokenizer_source == Path(m["a"])


# --------------------------------------------------------------------------------------------------
# tokenizer_source


def test_tokenizer_source_base_with_identical_vocabularies(m):
    plan = plan_of(
        f"merge_method: slerp\nbase_model: {m['a']}\nmodels:\n  - model: {m['a']}\n  - model: {m['b']}\n"
        "parameters: {t: 0.5}\ntokenizer_source: base\n"
    )
    assert plan.tokenizer_source == Path(m["a"])
    assert plan.out_config["vocab_size"] == 128


def test_tokenizer_source_with_other_vocabulary_reindexes_the_embeddings(m):
    # another model's vocabulary: token w<i+1> has id i there, id i + 1 in a and b; w128 is in neither
    plan = plan_of(
        f"merge_method: slerp\nbase_model: {m['a']}\nmodels:\n  - model: {m['a']}\n  - model: {m['b']}\n"
        f"parameters: {{t: 0.5}}\ntokenizer_source: {m['shift']}\n"
    )
    embed = next(t for t in plan.tensors if t.name == "model.embed_tokens.weight")
    rows = embed.inputs[0].rows
    assert rows is not None and rows.size == 128
    assert list(rows.rows[:5]) == [0, 1, 2, 4, 5] and rows.rows[127] == -1  # w128: a zero row
    assert plan.out_config["vocab_size"] == 128
    assert all(t.inputs[0].rows is None for t in plan.tensors if "layers" in t.name)


# --------------------------------------------------------------------------------------------------
# Errors, before any tensor data is read


def test_layer_range_past_the_end(m):
    with pytest.raises(
        ConfigError, match=r"slices\[1\]\.sources\[0\]\.layer_range: \[2, 6\] goes past the last layer"
    ):
        plan_of(
            f"merge_method: passthrough\nslices:\n  - sources:\n      - {{model: {m['a']}, layer_range: [0, 2]}}\n"
            f"  - sources:\n      - {{model: {m['a']}, layer_range: [2, 6]}}\n"
        )


def test_models_with_different_layer_counts(m):
    with pytest.raises(
        ConfigError, match=r"models: all inputs of a slice must have the same number of layers"
    ):
        plan_of(
            f"merge_method: linear\nmodels:\n  - model: {m['a']}\n  - model: {m['l8']}\nparameters: {{weight: 1}}\n"
        )


def test_shape_mismatch_names_both_models_and_the_tensor(m):
    with pytest.raises(ConfigError) as info:
        plan_of(
            f"merge_method: linear\nmodels:\n  - model: {m['a']}\n  - model: {m['wide']}\nparameters: {{weight: 1}}\n"
        )
    msg = str(info.value)
    assert "shape mismatch" in msg and m["a"] in msg and m["wide"] in msg and "embed_tokens" in msg


def test_missing_tensor_is_named(m, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(m["b"], broken)
    sd = load_file(str(broken / "model.safetensors"))
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConfigError) as info:
        plan_of(
            f"merge_method: linear\nmodels:\n  - model: {m['a']}\n  - model: {broken}\nparameters: {{weight: 1}}\n"
        )
    msg = str(info.value)
    assert "model.layers.1.mlp.up_proj.weight" in msg and str(broken) in msg and "models[1]" in msg


def test_missing_model_directory(m, tmp_path):
    with pytest.raises(ConfigError, match=r"models\[1\]\.model: .*nope"):
        plan_of(
            f"merge_method: linear\nmodels:\n  - model: {m['a']}\n  - model: {tmp_path / 'nope'}\nparameters: {{weight: 1}}\n"
        )


def test_shared_parameter_under_model_fails_like_mergekit(m):
    with pytest.raises(ConfigError, match="Missing required parameter t"):
        plan_of(
            f"merge_method: slerp\nbase_model: {m['a']}\nmodels:\n  - model: {m['a']}\n  - model: {m['b']}\n"
            "    parameters: {t: 0.5}\n"
        )


@pytest.mark.mergekit
def test_shared_parameter_under_model_fails_in_mergekit_too(m):
    with pytest.raises(RuntimeError, match="Missing required parameter t"):
        mergekit_plan(
            f"merge_method: slerp\nbase_model: {m['a']}\nmodels:\n  - model: {m['a']}\n  - model: {m['b']}\n"
            "    parameters: {t: 0.5}\n"
        )


def test_mixing_architectures_needs_allow_crimes(m):
    text = f"merge_method: slerp\nbase_model: {m['a']}\nmodels:\n  - model: {m['a']}\n  - model: {m['mi']}\nparameters: {{t: 0.5}}\n"
    with pytest.raises(ConfigError, match="allow-crimes"):
        plan_of(text)
    plan = build_plan(parse_config(text), allow_crimes=True)
    assert len(plan.tensors) == 39


def test_moe_models_are_planned_in_the_fused_layout(tmp_path):
    # mergekit 0.1.5 plans MoE models from its definitions (mixtral.json: the fused expert tensors of
    # transformers 5) and converts per-expert checkpoints while loading; the plan reads them as parts
    from mergekit_fast.testing import make_model

    moe = make_model(tmp_path / "moe", "mixtral", num_layers=2, seed=1)
    plan = plan_of(
        f"merge_method: passthrough\nslices:\n  - sources:\n      - {{model: {moe}, layer_range: [0, 2]}}\n"
    )
    by = {t.name: t for t in plan.tensors}
    gu = by["model.layers.1.mlp.experts.gate_up_proj"]
    assert gu.shape == (4, 128, 32) and gu.inputs[0].parts == tuple(
        f"model.layers.1.block_sparse_moe.experts.{e}.{w}.weight" for e in range(4) for w in ("w1", "w3")
    )
    assert (
        by["model.layers.0.mlp.gate.weight"].inputs[0].tensor == "model.layers.0.block_sparse_moe.gate.weight"
    )
    assert not any("block_sparse_moe" in n for n in by)


def test_layers_named_off_the_llama_pattern_follow_the_definition(tmp_path):
    # GPT-2 names its layers transformer.h.<i>.: planned from mergekit's gpt2.json (tests/test_architectures.py
    # compares such plans with mergekit's)
    import transformers

    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2")
    plan = plan_of(
        f"merge_method: passthrough\nslices:\n  - sources:\n      - {{model: {tmp_path / 'gpt2'}, layer_range: [1, 2]}}\n"
    )
    names = [t.name for t in plan.tensors]
    assert "transformer.h.0.attn.c_attn.weight" in names and not any("transformer.h.1." in n for n in names)
    assert plan.out_config["n_layer"] == 1 and plan.architecture == "gpt2"


def test_attention_bias_llama_keeps_biases(m):
    # mergekit's Llama definition lists no biases and would drop them; mergekit_fast merges them
    plan = plan_of(f"merge_method: passthrough\nmodels:\n  - model: {m['bias']}\n")
    names = {t.name for t in plan.tensors}
    assert "model.layers.0.self_attn.q_proj.bias" in names and len(names) == len(
        ModelSource.open(m["bias"]).tensors
    )


def test_given_sources_are_reused(m):
    src = ModelSource.open(m["a"])
    plan = build_plan(
        parse_config(f"merge_method: passthrough\nmodels:\n  - model: {m['a']}\n"), sources={m["a"]: src}
    )
    assert plan.sources[m["a"]] is src
    assert plan.config_yaml.startswith("merge_method: passthrough")


def test_out_config_without_transformers_edits_the_dict(m):
    text = f"merge_method: passthrough\nslices:\n  - sources:\n      - {{model: {m['l8']}, layer_range: [0, 6]}}\nout_dtype: float16\n"
    a = build_plan(parse_config(text), use_transformers=True).out_config
    b = build_plan(parse_config(text), use_transformers=False).out_config
    assert a == b  # config.json written by transformers 5.24 round-trips unchanged
    assert b["num_hidden_layers"] == 6 and b["dtype"] == "float16"


# --------------------------------------------------------------------------------------------------
# The vendored architecture table against mergekit's JSON definitions


@pytest.mark.mergekit
def test_known_architectures_match_mergekit_definitions():
    import re

    from mergekit.architecture.json_definitions import NAME_TO_ARCH, JsonModuleArchitecture

    layer = re.compile(r"(?:^|\.)layers\.\$\{layer_index\}\.")

    def definition(name, model_type):
        cands = NAME_TO_ARCH[name]
        arch = cands[0] if len(cands) == 1 else next(c for c in cands if c.expected_model_type == model_type)
        return arch, arch.modules["default"].architecture.definition

    for name, k in KNOWN_ARCHITECTURES.items():
        arch, d = definition(name, k.model_type)
        loose = d.pre_weights + d.post_weights
        assert all(layer.search(w.name) for w in d.layer_templates.weights), name
        assert {w.name: w.tied_names[0] for w in loose if w.tied_names} == dict(k.tied), name
        assert sorted(w.name for w in loose if w.optional and not w.tied_names) == list(k.optional), name
        opt_layer = sorted(layer.split(w.name)[-1] for w in d.layer_templates.weights if w.optional)
        assert opt_layer == list(k.optional_layer), name
        assert all(is_pre_weight(w.name) for w in d.pre_weights), name
        assert not any(is_pre_weight(w.name) for w in d.post_weights), name
    # same family <=> mergekit considers the definitions equal (no --allow-crimes needed)
    items = list(KNOWN_ARCHITECTURES.items())
    for n1, k1 in items:
        for n2, k2 in items:
            same = definition(n1, k1.model_type)[0] == definition(n2, k2.model_type)[0]
            assert same == (k1.family == k2.family), (n1, n2)
    # and nothing dense with the layer pattern is missing from the table
    from mergekit.architecture.json_definitions import JSON_ARCHITECTURES

    from mergekit_fast.plan import MOE_ARCHITECTURES

    for arch in JSON_ARCHITECTURES:
        mod = arch.modules.get("default")
        if len(arch.modules) != 1 or not isinstance(
            getattr(mod, "architecture", None), JsonModuleArchitecture
        ):
            continue
        d = mod.architecture.definition
        if not all(layer.search(w.name) for w in d.layer_templates.weights):
            continue
        if any("${" in w.name for w in d.pre_weights + d.post_weights):
            continue  # phi-1's embeddings and head are themselves numbered layers
        for name in arch.architectures:
            assert name in KNOWN_ARCHITECTURES or name in MOE_ARCHITECTURES, name


def test_deferred_out_config_equals_the_direct_one(tmp_path):
    """defer_config (the CLI's): the donor's config goes through transformers on a background thread; the
    plan's out_config is the one computed directly, and a plan that travels (pickled) carries it."""
    import pickle

    from mergekit_fast.plan import DeferredConfig
    from mergekit_fast.testing import make_synthetic_model

    a = make_synthetic_model(tmp_path / "a", seed=1, num_layers=2)  # no transformers_version: normalised
    text = f"merge_method: passthrough\nslices:\n  - sources:\n      - {{model: {a}, layer_range: [0, 1]}}\ndtype: float16\n"
    direct = build_plan(parse_config(text))
    deferred = build_plan(parse_config(text), defer_config=True)
    assert isinstance(deferred.__dict__["_out_config"], DeferredConfig)
    assert "transformers_version" in direct.out_config  # went through transformers
    assert deferred.out_config == direct.out_config
    assert not isinstance(deferred.__dict__["_out_config"], DeferredConfig)  # resolved once
    again = pickle.loads(pickle.dumps(build_plan(parse_config(text), defer_config=True)))
    assert again.out_config == direct.out_config and again.out_config["num_hidden_layers"] == 1
