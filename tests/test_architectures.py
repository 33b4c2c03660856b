"""Architectures: the generated table against mergekit 0.1.5, and other layer layouts against mergekit.

The table (mergekit_fast/data/architectures.json) must be what scripts/gen_architectures.py writes from
the installed mergekit and agree with mergekit's own parsed definitions; plans of GPT-2
(``transformer.h.<i>``), MPT (``transformer.blocks.<i>``, inferred: no definition), StarCoder2, Mamba
(``backbone.layers.<i>``), RoBERTa (``roberta.encoder.layer.<i>``), T5 (encoder-decoder) and Mistral3
(vision-language, weight prefixes) are compared tensor by tensor with mergekit's MergePlanner, a few
merges with mergekit-yaml's files, and every output loads in transformers. Where mergekit 0.1.5 fails on
a transformers-5 checkpoint (GPT-NeoX, Whisper, Qwen2-VL), the output must load with every tensor.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import assert_same_model, assert_same_plan, mergekit_plan, read_model, run_mergekit, run_ours

from mergekit_fast import architectures as archs
from mergekit_fast.config import parse_config
from mergekit_fast.plan import build_plan
from mergekit_fast.testing import OTHER_LAYOUTS, make_layout_model

ROOT = Path(__file__).resolve().parent.parent
PARITY = ["gpt2", "mpt", "starcoder2", "mamba", "roberta", "t5", "mistral3"]


@pytest.fixture(scope="session")
def layouts(tmp_path_factory):
    """Two tiny random models per layout, built on first use."""
    root = tmp_path_factory.mktemp("layouts")
    cache: dict[str, tuple[Path, Path]] = {}

    def get(kind: str) -> tuple[Path, Path]:
        if kind not in cache:
            cache[kind] = (make_layout_model(root / f"{kind}_a", kind, seed=1, dtype=torch.bfloat16),
                           make_layout_model(root / f"{kind}_b", kind, seed=2, dtype=torch.bfloat16))  # fmt: skip
        return cache[kind]

    return get


def slerp_models(a, b, t="[0.2, 0.7]") -> str:
    return f"merge_method: slerp\nbase_model: {a}\nmodels:\n  - model: {a}\n  - model: {b}\nparameters: {{t: {t}}}\n"


def load(kind: str, path: Path):
    import transformers

    cls = getattr(transformers, OTHER_LAYOUTS[kind][0])
    model, info = cls.from_pretrained(path, output_loading_info=True, dtype=torch.float32)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensor
    return model


# --------------------------------------------------------------------------------------------------
# The generated table


def _generator():
    spec = importlib.util.spec_from_file_location(
        "gen_architectures", ROOT / "scripts" / "gen_architectures.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.mergekit
def test_generated_files_are_current():
    for name, text in _generator().render().items():
        assert (ROOT / "mergekit_fast" / "data" / name).read_text() == text, (
            f"{name} is stale: run scripts/gen_architectures.py"
        )


def _weights(ws):
    return [(w.name, w.vocabulary_axis, bool(w.optional), tuple(w.aliases or ()), tuple(w.tied_names or ()),
             w.force_dtype) for w in ws]  # fmt: skip


@pytest.mark.mergekit
def test_every_definition_matches_mergekits():
    from mergekit.architecture.json_definitions import JSON_ARCHITECTURES, JsonModuleArchitecture

    ours = {(tuple(d.architectures), d.model_type): d for d in archs.definitions()}
    assert len(ours) == len(JSON_ARCHITECTURES) == len(archs.definitions())
    for theirs in JSON_ARCHITECTURES:
        d = ours[(tuple(theirs.architectures), theirs.expected_model_type)]
        assert tuple(theirs.tagalong_files or ()) == d.tagalong_files
        assert theirs.vocab_size_config_key == d.vocab_size_config_key
        assert list(theirs.modules) == d.module_names
        for name, mod in theirs.modules.items():
            m = d.module(name)
            assert isinstance(mod.architecture, JsonModuleArchitecture)
            jd = mod.architecture.definition
            assert mod.weight_prefix == m.weight_prefix and jd.expected_model_type == m.model_type
            assert jd.num_layers_config_key == m.num_layers_config_key
            assert jd.override_num_layers == m.override_num_layers
            assert _weights(jd.pre_weights) == _weights(m.pre)
            assert _weights(jd.layer_templates.weights) == _weights(m.layers)
            assert _weights(jd.post_weights) == _weights(m.post)
    # two models merge without --allow-crimes exactly when mergekit finds their definitions equal
    for x in JSON_ARCHITECTURES:
        for y in JSON_ARCHITECTURES:
            dx = ours[(tuple(x.architectures), x.expected_model_type)]
            dy = ours[(tuple(y.architectures), y.expected_model_type)]
            # (model_type is a field of mergekit's definitions: only those of one model_type can be equal)
            same = x.expected_model_type == y.expected_model_type and x == y
            assert same == (dx.family == dy.family)


@pytest.mark.mergekit
def test_lookup_picks_the_definition_mergekit_picks():
    from mergekit.architecture import arch_info_for_config
    from mergekit.architecture.json_definitions import NAME_TO_ARCH

    for name, cands in NAME_TO_ARCH.items():
        if name in archs.MOE_ARCHITECTURES:
            continue  # refused before any lookup (and mergekit's Python MoE definitions need real configs)
        for model_type in [c.expected_model_type for c in cands] + ["something_else"]:
            theirs = arch_info_for_config(SimpleNamespace(architectures=[name], model_type=model_type))
            d = archs.lookup(name, model_type)
            if theirs is None:
                assert d is None, (name, model_type)
            else:
                assert (tuple(theirs.architectures), theirs.expected_model_type) == (
                    d.architectures,
                    d.model_type,
                )


@pytest.mark.mergekit
def test_template_substitution_matches_mergekit():
    from mergekit.architecture.json_definitions import _template_substitution

    for template in ("model.layers.${layer_index}.mlp.up_proj.weight", "layers.${num_layers}.linear.weight",
                     "h.${layer_index+1}.x", "a.${layer_index-1}.${num_layers-1}", "no.template.here",
                     "layers.$layer_index.x", "cost.$$5.${layer_index}"):  # fmt: skip
        assert archs.substitute(template, 6, 3) == _template_substitution(template, 6, 3), template
    assert archs.substitute("plain.${num_layers+1}", 6) == _template_substitution("plain.${num_layers+1}", 6)


def test_inference_from_names():
    d = archs.infer(["transformer.wte.weight", "transformer.blocks.0.attn.Wqkv.weight",
                     "transformer.blocks.1.attn.Wqkv.weight", "transformer.norm_f.weight"])  # fmt: skip
    (m,) = d.modules
    assert d.inferred and m.name == "default" and m.override_num_layers == 2
    assert [w.name for w in m.layers] == ["transformer.blocks.${layer_index}.attn.Wqkv.weight"]
    assert [w.name for w in m.pre] == ["transformer.wte.weight", "transformer.norm_f.weight"]
    multi = archs.infer(["lm.layers.0.w", "vis.blocks.0.w", "vis.blocks.1.w", "proj.weight"])
    assert [(m.name, m.override_num_layers) for m in multi.modules] == [("default", 0), ("lm.layers", 1),
                                                                        ("vis.blocks", 2)]  # fmt: skip


def test_a_plain_llama_needs_neither_transformers_nor_torch():
    import subprocess
    import sys

    code = (
        "import sys; from mergekit_fast import architectures as a; d = a.lookup('LlamaForCausalLM', 'llama'); "
        "assert d.family == 'llama' and d.modules[0].stacks == ('model.layers.',); "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------------------------------
# Plans and merges of other layouts against mergekit


@pytest.mark.mergekit
@pytest.mark.parametrize("kind", PARITY)
def test_plan_matches_mergekit(layouts, kind):
    a, b = layouts(kind)
    text = slerp_models(a, b)
    ours = build_plan(parse_config(text))
    rows, out_cfg = mergekit_plan(text)
    assert_same_plan(ours, rows, out_cfg=out_cfg)
    n_files = len(read_model(a))
    assert len(ours.tensors) == n_files  # every tensor of the checkpoint, none dropped
    assert ours.architecture == ("" if kind == "mpt" else ours.architecture)


@pytest.mark.mergekit
@pytest.mark.parametrize("kind", ["gpt2", "mamba", "mpt"])
def test_depth_upscaling_plan_matches_mergekit(layouts, kind):
    a, b = layouts(kind)
    text = (
        f"merge_method: passthrough\nslices:\n  - sources:\n      - {{model: {a}, layer_range: [0, 2]}}\n"
        f"  - sources:\n      - {{model: {b}, layer_range: [1, 2]}}\n"
    )
    ours = build_plan(parse_config(text))
    rows, out_cfg = mergekit_plan(text)
    # mergekit leaves the layer count of an inferred architecture (mpt); mergekit_fast sets it
    assert_same_plan(ours, rows, out_cfg=out_cfg, check_config=kind != "mpt")
    key = {"gpt2": "n_layer", "mamba": "num_hidden_layers", "mpt": "n_layers"}[kind]
    assert ours.out_config[key] == 3


@pytest.mark.mergekit
@pytest.mark.parametrize(
    "kind,text",
    [
        ("gpt2", "slerp"),
        ("t5", "linear"),
        ("mistral3", "linear"),
    ],
)
def test_merge_matches_mergekit_and_loads(layouts, tmp_path, kind, text):
    a, b = layouts(kind)
    if text == "slerp":
        cfg = slerp_models(a, b, "0.4")
    else:
        cfg = (f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.3}}\n"
               f"  - model: {b}\n    parameters: {{weight: 0.7}}\n")  # fmt: skip
    ours = run_ours(cfg, tmp_path / "ours")
    theirs = run_mergekit(cfg, tmp_path / "theirs")
    assert_same_model(ours, theirs, slerp_inputs=(a, b) if text == "slerp" else None)
    load(kind, ours)


@pytest.mark.parametrize("kind", ["gpt_neox", "whisper", "qwen2_vl"])
def test_where_mergekit_fails_the_output_loads_complete(layouts, tmp_path, kind):
    # GPT-NeoX: mergekit's definition lists attention.bias / masked_bias buffers transformers 5 no longer
    # saves; whisper.json's decoder prefix lacks its dot; Qwen2-VL's layer count moved to text_config.
    # mergekit 0.1.5 fails on each ("required but not present", no attribute num_hidden_layers).
    a, b = layouts(kind)
    out = run_ours(slerp_models(a, b, "0.5"), tmp_path / "out")
    merged = read_model(out)
    assert sorted(merged) == sorted(read_model(a))
    load(kind, out)


def test_extra_tensors_of_a_layer_are_merged_with_it(layouts):
    # T5's definition lists no relative_attention_bias beyond block 0 and gated-gelu's wi_0/wi_1 only; a
    # non-gated T5 stores wi: planned with its layer, renumbered
    import transformers

    tmp = Path(layouts("t5")[0]).parent
    cfg = transformers.T5Config(num_layers=2, num_decoder_layers=2, d_model=32, d_kv=8, d_ff=64, num_heads=4,
                                vocab_size=128, decoder_start_token_id=0)  # fmt: skip
    path = tmp / "t5_plain"
    if not path.exists():
        transformers.T5ForConditionalGeneration(cfg).save_pretrained(path)
    text = f"merge_method: passthrough\nmodules:\n  decoder:\n    slices:\n      - sources:\n          - {{model: {path}, layer_range: [1, 2]}}\n"
    plan = build_plan(parse_config(text))
    names = {t.name: t.inputs[0].tensor for t in plan.tensors}
    assert (
        names["decoder.block.0.layer.2.DenseReluDense.wi.weight"]
        == "decoder.block.1.layer.2.DenseReluDense.wi.weight"
    )
    assert not any(n.startswith("encoder.") for n in names)  # only the module the config names
    assert plan.out_config["num_decoder_layers"] == 1 and json.dumps(plan.out_config)
