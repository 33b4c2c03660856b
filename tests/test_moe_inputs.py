"""MoE models as merge inputs (issue 19): Mixtral, Qwen2-MoE and Qwen3-MoE in both checkpoint layouts
(per-expert tensors as transformers saves them, and the fused tensors of transformers 5's modules), merged
by mergekit-fast and by mergekit-yaml 0.1.5 (the oracle), with filters on the fused names; transformers
loads every output, whose logits sit between the inputs'."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import assert_same_model, read_model, run_mergekit, run_ours

from mergekit_fast import cli
from mergekit_fast.testing import make_model

pytestmark = pytest.mark.mergekit


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_inputs")
    out = {}
    for arch in ("mixtral", "qwen2_moe", "qwen3_moe"):
        for fused in (False, True):
            for seed in (1, 2):
                tag = f"{arch}-{'fused' if fused else 'experts'}-{seed}"
                out[tag] = make_model(root / tag, arch, num_layers=2, seed=seed, fused_experts=fused,
                                      tokenizer=seed == 1)  # fmt: skip
    return out


SLERP = """
models:
  - model: {a}
  - model: {b}
merge_method: slerp
base_model: {a}
parameters:
  t:
    - filter: experts
      value: [0.2, 0.7]
    - filter: gate
      value: 0.9
    - value: 0.5
dtype: bfloat16
"""

LINEAR = """
models:
  - model: {a}
    parameters:
      weight:
        - filter: mlp.experts
          value: 0.8
        - value: 0.4
  - model: {b}
    parameters: {{weight: 0.6}}
merge_method: linear
dtype: float32
out_dtype: bfloat16
"""


TIES = """
models:
  - model: {b}
    parameters:
      weight: 0.7
      density:
        - filter: experts
          value: 0.4
        - value: 0.8
merge_method: ties
base_model: {a}
dtype: bfloat16
"""

CONFIGS = {"slerp": SLERP, "linear": LINEAR, "ties": TIES}


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe"])
@pytest.mark.parametrize("layouts", [("experts", "experts"), ("fused", "fused"), ("experts", "fused")])
@pytest.mark.parametrize("config", ["slerp", "linear", "ties"])
def test_moe_inputs_match_mergekit(moe, tmp_path, arch, layouts, config):
    a, b = moe[f"{arch}-{layouts[0]}-1"], moe[f"{arch}-{layouts[1]}-2"]
    cfg = CONFIGS[config].format(a=a, b=b)
    ours = run_ours(cfg, tmp_path / "ours", "--verify", "all")
    theirs = run_mergekit(cfg, tmp_path / "theirs")
    assert_same_model(ours, theirs, slerp_inputs=(a, b) if config == "slerp" else None)
    names = read_model(ours)
    assert any(n.endswith("mlp.experts.gate_up_proj") for n in names)  # the fused layout, as mergekit writes
    assert not any(".experts.0." in n for n in names)


def test_every_layout_gives_the_same_output(moe, tmp_path):
    outs = []
    for la, lb in (("experts", "experts"), ("fused", "fused"), ("fused", "experts")):
        cfg = SLERP.format(a=moe[f"mixtral-{la}-1"], b=moe[f"mixtral-{lb}-2"])
        outs.append(read_model(run_ours(cfg, tmp_path / f"{la}-{lb}")))
    for o in outs[1:]:
        assert o.keys() == outs[0].keys() and all(torch.equal(o[k], outs[0][k]) for k in o)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_outputs_load_and_logits_sit_between_the_inputs(moe, tmp_path, arch):
    import transformers

    a, b = moe[f"{arch}-experts-1"], moe[f"{arch}-fused-2"]
    cfg = LINEAR.format(a=a, b=b).replace("out_dtype: bfloat16", "out_dtype: float32")
    out = run_ours(cfg, tmp_path / "out")
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])

    def logits(path):
        model, info = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                                      output_loading_info=True)  # fmt: skip
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        with torch.no_grad():
            return model(ids).logits

    la, lb, lm = logits(a), logits(b), logits(out)
    assert torch.isfinite(lm).all()
    mid = (la + lb) / 2
    assert (lm - mid).norm() < (la - lb).norm()  # nearer the inputs' middle than they are to each other
    assert json.loads((out / "config.json").read_text())["model_type"] == arch


def test_dus_of_an_moe_model(moe, tmp_path):
    """Depth up-scaling copies the (per-expert or fused) layers file to file, in the fused layout."""
    a = moe["mixtral-experts-1"]
    cfg = f"slices:\n  - sources:\n      - model: {a}\n        layer_range: [0, 2]\n  - sources:\n      - model: {a}\n        layer_range: [1, 2]\nmerge_method: passthrough\n"
    ours = run_ours(cfg, tmp_path / "ours")
    theirs = run_mergekit(cfg, tmp_path / "theirs")
    assert_same_model(ours, theirs)
    assert json.loads((ours / "config.json").read_text())["num_hidden_layers"] == 3


def test_moe_merge_runs_on_the_torch_backend_too(moe, tmp_path):
    cfg = SLERP.format(a=moe["qwen3_moe-experts-1"], b=moe["qwen3_moe-experts-2"])
    (tmp_path / "c.yml").write_text(cfg)
    for backend in ("torch", "auto"):
        assert (
            cli.main(["merge", str(tmp_path / "c.yml"), str(tmp_path / backend), "-q", "--backend", backend])
            == 0
        )
    x, y = read_model(tmp_path / "torch"), read_model(tmp_path / "auto")
    assert all(torch.equal(x[k], y[k]) for k in x)


# ----------------------------------------------------------------------------- bounded memory

_RSS = (
    "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]).returncode; "
    "print(r, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)"
)


def _peak_rss(cfg, out, budget: str) -> int:
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "mergekit_fast.cli", "merge", str(cfg), str(out), "--no-progress", "-q",
           "--max-memory", budget]  # fmt: skip
    rc, rss = subprocess.run(
        [sys.executable, "-c", _RSS, *cmd], capture_output=True, text=True
    ).stdout.split()
    assert rc == "0"
    return int(rss)


@pytest.fixture(scope="module")
def big_moe_pair(tmp_path_factory):
    """Two Mixtral checkpoints with 1.07 GB fused expert tensors and two tiny ones, written once for the
    module and removed after it (pytest keeps the last three runs' temporary directories: 14 GB each
    with these left behind)."""
    import shutil

    from mergekit_fast.testing import make_synthetic_moe

    root = tmp_path_factory.mktemp("big_moe")
    kw = dict(hidden_size=2048, intermediate_size=16384, num_experts=8, vocab_size=256)
    try:
        a, b = (make_synthetic_moe(root / n, seed=s, **kw) for n, s in (("a", 1), ("b", 2)))
        small = [make_synthetic_moe(root / f"s{s}", seed=s) for s in (1, 2)]
        yield a, b, small
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["slerp", "linear"])
def test_a_1gb_fused_tensor_merges_in_bounded_memory(big_moe_pair, tmp_path, method):
    """Two Mixtral checkpoints whose gate_up_proj is 1.07 GB each (8 x 32768 x 2048 bf16), merged under
    --max-memory 256M: the whole-tensor method streams over chunks (reduce pass, then apply pass), so peak
    RSS stays within the budget plus the fixed overhead of a tiny model's merge, and the result equals the
    merge of the same tensors in memory."""
    import shutil

    a, b, small = big_moe_pair
    try:
        _check_big_merge(a, b, small, tmp_path, method)
    finally:
        for out in ("o_big", "o_ref"):  # 2.1 GB each
            shutil.rmtree(tmp_path / out, ignore_errors=True)


def _check_big_merge(a, b, small, tmp_path, method):
    text = (
        "models:\n  - model: {a}\n  - model: {b}\nmerge_method: slerp\nbase_model: {a}\nparameters: {{t: 0.4}}\n"
        if method == "slerp"
        else "models:\n  - model: {a}\n    parameters: {{weight: 0.7}}\n  - model: {b}\n    parameters: {{weight: 0.3}}\nmerge_method: linear\n"
    )
    cfg_big, cfg_small = tmp_path / "big.yml", tmp_path / "small.yml"
    cfg_big.write_text(text.format(a=a, b=b))
    cfg_small.write_text(text.format(a=small[0], b=small[1]))
    base = _peak_rss(cfg_small, tmp_path / "o_small", "256M")
    big = _peak_rss(cfg_big, tmp_path / "o_big", "256M")
    print(f"peak RSS: tiny MoE {base / 2**20:.0f} MiB, 1 GB fused tensors {big / 2**20:.0f} MiB")
    assert big - base <= (256 + 96) << 20, (big - base) / 2**20  # the budget, plus allocator/page-table noise
    # the streamed result equals the whole-tensor one (a budget that holds everything)
    from safetensors import safe_open

    ref = tmp_path / "o_ref"
    assert cli.main(["merge", str(cfg_big), str(ref), "-q", "--max-memory", "16G"]) == 0
    name = "model.layers.0.mlp.experts.gate_up_proj"
    with (
        safe_open(str(tmp_path / "o_big" / "model.safetensors"), "pt") as x,
        safe_open(str(ref / "model.safetensors"), "pt") as y,
    ):
        for k in range(0, 8, 3):  # a few expert slabs
            assert torch.equal(x.get_slice(name)[k], y.get_slice(name)[k]), k
