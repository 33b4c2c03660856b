"""Models with several stacks of layers: mergekit's `modules:` config and its default of merging every module.

Mistral3 (a vision tower, a projector and a text decoder, from mergekit's definition) is planned as
mergekit plans it, module by module, with `modules:` slices and per-module parameters. LLaVA has no
definition: mergekit 0.1.5 infers its layout from transformers 5's module names and writes a model
without its language model and with a renamed vision tower; mergekit_fast infers it from the
checkpoint's own names and writes every tensor, so transformers loads the output and its logits sit
between the inputs'.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import assert_same_model, assert_same_plan, mergekit_plan, read_model, run_mergekit, run_ours

from mergekit_fast.config import ConfigError, parse_config
from mergekit_fast.plan import build_plan
from mergekit_fast.testing import make_layout_model


@pytest.fixture(scope="session")
def vlm(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm")
    return {
        f"{kind}_{s}": make_layout_model(root / f"{kind}_{s}", kind, seed=seed, dtype=torch.bfloat16)
        for kind in ("mistral3", "llava")
        for s, seed in (("a", 1), ("b", 2))
    }


def modules_config(a: Path, b: Path) -> str:
    return f"""
merge_method: slerp
base_model: {a}
modules:
  text_decoder:
    slices:
      - sources:
          - {{model: {a}, layer_range: [0, 2]}}
          - {{model: {b}, layer_range: [0, 2]}}
      - sources:
          - {{model: {a}, layer_range: [1, 2]}}
          - {{model: {b}, layer_range: [1, 2]}}
        parameters: {{t: 0.9}}
    parameters:
      t: [{{filter: mlp, value: [0.1, 0.3]}}]
  vision_tower:
    models:
      - model: {a}
      - model: {b}
    parameters: {{t: 0.25}}
  multi_modal_projector:
    models:
      - model: {a}
      - model: {b}
parameters:
  t: 0.5
"""


@pytest.mark.mergekit
def test_modules_config_plan_matches_mergekit(vlm):
    text = modules_config(vlm["mistral3_a"], vlm["mistral3_b"])
    ours = build_plan(parse_config(text))
    rows, out_cfg = mergekit_plan(text)
    assert_same_plan(ours, rows, out_cfg=out_cfg)
    t = {x.name: dict(x.params).get("t") for x in ours.tensors}
    assert t["language_model.model.layers.0.mlp.up_proj.weight"] == pytest.approx(0.1)  # the module's filter
    assert t["language_model.model.layers.2.self_attn.q_proj.weight"] == 0.9  # the slice's own parameters
    assert t["language_model.model.layers.0.self_attn.q_proj.weight"] == 0.5  # the top level
    assert t["vision_tower.transformer.layers.1.attention.q_proj.weight"] == 0.25
    assert ours.out_config["text_config"]["num_hidden_layers"] == 3


@pytest.mark.mergekit
def test_modules_config_merge_matches_mergekit_and_loads(vlm, tmp_path):
    import transformers

    # the same layout with linear weights: bit-identical to mergekit
    text = modules_config(vlm["mistral3_a"], vlm["mistral3_b"]).replace(
        "merge_method: slerp", "merge_method: linear"
    )
    text = (
        text.replace("{t: 0.9}", "{weight: 0.9}")
        .replace("t: [{", "weight: [{")
        .replace("{t: 0.25}", "{weight: 0.25}")
    )
    text = text.replace("parameters:\n  t: 0.5", "parameters:\n  weight: 0.5")
    ours = run_ours(text, tmp_path / "ours")
    theirs = run_mergekit(text, tmp_path / "theirs")
    assert_same_model(ours, theirs)
    _, info = transformers.Mistral3ForConditionalGeneration.from_pretrained(ours, output_loading_info=True)
    assert not any(info.values()), info


def test_modules_config_merges_only_the_modules_it_names(vlm):
    a, b = vlm["mistral3_a"], vlm["mistral3_b"]
    text = f"merge_method: linear\nmodules:\n  vision_tower:\n    models:\n      - {{model: {a}, parameters: {{weight: 1}}}}\n      - {{model: {b}, parameters: {{weight: 1}}}}\n"
    names = {t.name for t in build_plan(parse_config(text)).tensors}
    assert names and all(n.startswith("vision_tower.") for n in names)


def test_slices_of_a_multi_module_model_need_modules(vlm):
    a = vlm["mistral3_a"]
    with pytest.raises(
        ConfigError, match=r"^slices: the model \(mistral3\) has several modules \(text_decoder, "
    ):
        build_plan(parse_config(f"merge_method: passthrough\nslices:\n  - sources:\n      - {{model: {a}, layer_range: [0, 1]}}\n"))  # fmt: skip
    with pytest.raises(
        ConfigError, match=r"^modules.vision: the model \(mistral3\) has no module 'vision'; its "
    ):
        build_plan(
            parse_config(f"merge_method: passthrough\nmodules:\n  vision:\n    models:\n      - model: {a}\n")
        )


# --------------------------------------------------------------------------------------------------
# LLaVA: no definition; mergekit 0.1.5 drops the language model under transformers 5


def llava_logits(path: Path) -> torch.Tensor:
    import transformers

    model, info = transformers.LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32,
                                                                            output_loading_info=True)  # fmt: skip
    assert not any(info.values()), info  # every tensor in place: none missing, none unexpected
    gen = torch.Generator().manual_seed(0)
    ids = torch.tensor(
        [[1] + [127] * 16 + [5, 9, 33, 70, 2]]
    )  # 16 image tokens: one 32x32 image, 8x8 patches
    pixels = torch.randn(1, 3, 32, 32, generator=gen)
    with torch.no_grad():
        return model.eval()(input_ids=ids, pixel_values=pixels).logits


@pytest.mark.parametrize("method", ["linear", "slerp"])
def test_llava_merge_is_complete_and_loads(vlm, tmp_path, method):
    a, b = vlm["llava_a"], vlm["llava_b"]
    if method == "linear":
        text = (f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.5}}\n"
                f"  - model: {b}\n    parameters: {{weight: 0.5}}\ndtype: float32\n")  # fmt: skip
    else:
        text = f"merge_method: slerp\nbase_model: {a}\nmodels:\n  - model: {a}\n  - model: {b}\nparameters: {{t: 0.5}}\ndtype: float32\n"
    out = run_ours(text, tmp_path / "out")
    merged, ta, tb = read_model(out), read_model(a), read_model(b)
    assert sorted(merged) == sorted(ta)  # the checkpoint's own names, every one of them
    if method == "linear":
        for name, x in merged.items():
            torch.testing.assert_close(x, (ta[name].float() + tb[name].float()) / 2, rtol=0, atol=1e-6)
    la, lb, lm = llava_logits(a), llava_logits(b), llava_logits(out)
    mid = (la + lb) / 2
    # the merge sits between its inputs: nearer their average than to either of them, and nearer than
    # the inputs are to each other
    assert (lm - mid).norm() < min((lm - la).norm(), (lm - lb).norm())
    assert (lm - mid).norm() < (la - lb).norm()


@pytest.mark.mergekit
def test_llava_what_mergekit_writes(vlm, tmp_path):
    # the documented difference: mergekit 0.1.5 infers LLaVA's modules from transformers 5's names
    # (model.language_model.layers, model.vision_tower.encoder.layers), cannot map the language model's
    # checkpoint tensors to them, and writes only the vision tower and projector, renamed
    a, b = vlm["llava_a"], vlm["llava_b"]
    text = (f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.5}}\n"
            f"  - model: {b}\n    parameters: {{weight: 0.5}}\n")  # fmt: skip
    theirs = read_model(run_mergekit(text, tmp_path / "theirs"))
    assert not any("language_model" in n or "lm_head" in n for n in theirs)
    assert all(n.startswith(("model.vision_tower.", "model.multi_modal_projector.")) for n in theirs)
    ours = read_model(run_ours(text, tmp_path / "ours"))
    assert len(ours) == len(read_model(a)) > len(theirs)


def test_tagalong_files_come_with_the_output(vlm, tmp_path):
    # mistral3.json's tagalong_files: the donor's preprocessor_config.json and processor_config.json are
    # copied as they are, as mergekit does
    import shutil

    a = tmp_path / "a"
    shutil.copytree(vlm["mistral3_a"], a)
    (a / "preprocessor_config.json").write_text('{"image_processor_type": "PixtralImageProcessor"}\n')
    text = f"merge_method: linear\nmodels:\n  - {{model: {a}, parameters: {{weight: 1}}}}\n  - {{model: {vlm['mistral3_b']}, parameters: {{weight: 1}}}}\n"
    out = run_ours(text, tmp_path / "out")
    assert (out / "preprocessor_config.json").read_text() == (a / "preprocessor_config.json").read_text()
    assert not (out / "processor_config.json").exists()
