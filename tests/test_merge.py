"""End to end: `mergekit-fast merge` writes what `mergekit-yaml` (mergekit 0.1.5) writes.

Both tools run in this process on the same tiny random models; the outputs are compared tensor by
tensor (names, shapes, dtypes, values) and through transformers (the outputs load and give the
same logits).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from fixtures_models import make_model
from helpers import assert_same_model, logits, needs_native, read_model, run_mergekit, run_ours

from mergekit_fast import cli
from mergekit_fast.testing import slerp_gradient_config

pytestmark = pytest.mark.mergekit


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "a": make_model(root / "a", seed=1, num_layers=6, tokenizer=True),
        "b": make_model(root / "b", seed=2, num_layers=6),
        "c": make_model(root / "c", seed=3, num_layers=6),
        "a_sharded": make_model(root / "a_sharded", seed=1, num_layers=6, max_shard_size="20KB"),
        "tied_a": make_model(root / "tied_a", seed=4, tie_word_embeddings=True),
        "tied_b": make_model(root / "tied_b", seed=5, tie_word_embeddings=True),
        "qwen_a": make_model(root / "qwen_a", "qwen2", seed=6),
        "qwen_b": make_model(root / "qwen_b", "qwen2", seed=7),
    }


SLERP_GRADIENT = slerp_gradient_config("{a}", "{b}", 6)


def test_slerp_gradient_matches_mergekit(models, tmp_path):
    cfg = SLERP_GRADIENT.format(a=models["a"], b=models["b"])
    ours = run_ours(cfg, tmp_path / "ours", "--verify", "all")
    theirs = run_mergekit(cfg, tmp_path / "theirs")
    assert_same_model(ours, theirs, slerp_inputs=(models["a"], models["b"]))
    # Tokenizer and generation config copied from the base model, model card and config written.
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "README.md",
              "mergekit_config.yml", "config.json"):  # fmt: skip
        assert (ours / f).exists(), f
    ids = torch.randint(0, 128, (2, 9))
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), rtol=0.02, atol=0.02)


def test_linear_three_models_identical(models, tmp_path):
    cfg = f"""
models:
  - model: {models["a"]}
    parameters: {{weight: 0.5}}
  - model: {models["b"]}
    parameters: {{weight: [0.2, 0.8]}}
  - model: {models["c"]}
    parameters: {{weight: 0.3}}
merge_method: linear
dtype: bfloat16
"""
    ours = run_ours(cfg, tmp_path / "ours")
    theirs = run_mergekit(cfg, tmp_path / "theirs")
    assert_same_model(ours, theirs)
    ids = torch.randint(0, 128, (1, 7))
    assert torch.equal(logits(ours, ids), logits(theirs, ids))


def test_linear_unnormalized_fp32(models, tmp_path):
    cfg = f"""
models:
  - model: {models["a"]}
    parameters: {{weight: 1.0}}
  - model: {models["b"]}
    parameters: {{weight: -0.25}}
merge_method: linear
parameters: {{normalize: false}}
dtype: float32
"""
    assert_same_model(run_ours(cfg, tmp_path / "ours"), run_mergekit(cfg, tmp_path / "theirs"))


def test_dus_overlapping_slices_and_sharded_output(models, tmp_path):
    cfg = f"""
slices:
  - sources:
      - model: {models["a"]}
        layer_range: [0, 4]
  - sources:
      - model: {models["a"]}
        layer_range: [2, 6]
merge_method: passthrough
dtype: bfloat16
"""
    ours = run_ours(cfg, tmp_path / "ours", "--out-shard-size", "30K")
    theirs = run_mergekit(cfg, tmp_path / "theirs", out_shard_size=30_000)
    assert_same_model(ours, theirs)
    assert json.loads((ours / "config.json").read_text())["num_hidden_layers"] == 8
    index = json.loads((ours / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert sorted(index["weight_map"]) == sorted(read_model(ours))
    ids = torch.randint(0, 128, (1, 5))
    assert torch.equal(logits(ours, ids), logits(theirs, ids))


def test_dus_command_equals_config(models, tmp_path):
    rc = cli.main(["dus", str(models["a"]), str(tmp_path / "dus"), "--drop", "2", "--no-progress", "-q"])
    assert rc == 0
    cfg = f"""
slices:
  - sources:
      - model: {models["a"]}
        layer_range: [0, 4]
  - sources:
      - model: {models["a"]}
        layer_range: [2, 6]
merge_method: passthrough
"""
    theirs = run_mergekit(cfg, tmp_path / "theirs")
    assert_same_model(tmp_path / "dus", theirs)


def test_passthrough_scale_and_sharded_input(models, tmp_path):
    cfg = f"""
slices:
  - sources:
      - model: {models["a_sharded"]}
        layer_range: [0, 6]
        parameters:
          scale:
            - filter: o_proj
              value: 0.5
            - filter: down_proj
              value: 0.25
            - value: 1.0
merge_method: passthrough
"""
    assert_same_model(run_ours(cfg, tmp_path / "ours"), run_mergekit(cfg, tmp_path / "theirs"))


def test_tied_embeddings_and_out_dtype(models, tmp_path):
    cfg = f"""
models:
  - model: {models["tied_a"]}
  - model: {models["tied_b"]}
merge_method: slerp
base_model: {models["tied_a"]}
parameters: {{t: 0.3}}
out_dtype: float16
"""
    ours = run_ours(cfg, tmp_path / "ours")
    theirs = run_mergekit(cfg, tmp_path / "theirs")
    a, b = read_model(ours), read_model(theirs)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype == torch.float16
        # bf16 math, then fp16 output: both round the same bf16 values (1 bf16 ulp apart at most).
        torch.testing.assert_close(a[k].float(), b[k].float(), rtol=2**-7, atol=1e-6)
    ids = torch.randint(0, 128, (1, 5))
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), rtol=0.02, atol=0.02)


def test_qwen2_biases(models, tmp_path):
    cfg = f"""
models:
  - model: {models["qwen_a"]}
  - model: {models["qwen_b"]}
merge_method: slerp
base_model: {models["qwen_a"]}
parameters: {{t: 0.6}}
"""
    ours = run_ours(cfg, tmp_path / "ours")
    assert any(k.endswith("q_proj.bias") for k in read_model(ours))
    assert_same_model(
        ours, run_mergekit(cfg, tmp_path / "theirs"), slerp_inputs=(models["qwen_a"], models["qwen_b"])
    )


# ----------------------------------------------------------------------------- output handling


def test_existing_output_refused_without_force(models, tmp_path):
    cfg = SLERP_GRADIENT.format(a=models["a"], b=models["b"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    cfgf = tmp_path / "c.yml"
    cfgf.write_text(cfg)
    assert cli.main(["merge", str(cfgf), str(out), "--no-progress", "-q"]) == 2
    assert (out / "keep.txt").read_text() == "precious"
    # --force replaces only what looks like a merge output; this directory needs --force-unrecognized
    assert cli.main(["merge", str(cfgf), str(out), "--no-progress", "-q", "--force"]) == 2
    assert (out / "keep.txt").read_text() == "precious"
    assert (
        cli.main(["merge", str(cfgf), str(out), "--no-progress", "-q", "--force", "--force-unrecognized"])
        == 0
    )
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert not list(tmp_path.glob(".out.mergekit_fast-*"))
    # an earlier merge output is replaced by --force alone
    assert cli.main(["merge", str(cfgf), str(out), "--no-progress", "-q", "--force"]) == 0


def test_failed_merge_leaves_nothing(models, tmp_path, monkeypatch):
    from mergekit_fast.engine import staging

    def boom(self, job):
        raise RuntimeError("simulated failure mid-merge")

    monkeypatch.setattr(staging.CpuNative, "compute", boom)
    monkeypatch.setattr(staging.CpuDirect, "compute", boom)
    monkeypatch.setattr(staging.CpuMapped, "compute", boom)
    cfgf = tmp_path / "c.yml"
    cfgf.write_text(SLERP_GRADIENT.format(a=models["a"], b=models["b"]))
    with pytest.raises(RuntimeError, match="simulated"):
        cli.main(["merge", str(cfgf), str(tmp_path / "out"), "--no-progress", "-q"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yml"]


def test_yaml_alias_accepts_mergekit_flags(models, tmp_path, capsys):
    cfgf = tmp_path / "c.yml"
    cfgf.write_text(SLERP_GRADIENT.format(a=models["a"], b=models["b"]))
    out = tmp_path / "out"
    rc = cli.yaml_alias_main([str(cfgf), str(out), "--lazy-unpickle", "--clone-tensors", "--no-cuda",
                              "--out-shard-size", "1B", "--write-threads", "2", "--quiet"])  # fmt: skip
    assert rc == 0 and (out / "model.safetensors").exists()
    assert "--lazy-unpickle changes nothing here" in capsys.readouterr().err


def test_small_memory_budget_still_merges(models, tmp_path):
    # A budget smaller than one tensor: tensors run one at a time, the result is unchanged.
    cfg = SLERP_GRADIENT.format(a=models["a"], b=models["b"])
    small = run_ours(cfg, tmp_path / "small", "--max-memory", "1K")
    big = run_ours(cfg, tmp_path / "big")
    assert read_model(small).keys() == read_model(big).keys()
    for k, v in read_model(small).items():
        assert torch.equal(v, read_model(big)[k])


def test_cli_errors_name_the_problem(models, tmp_path, capsys):
    cfgf = tmp_path / "c.yml"
    cfgf.write_text(SLERP_GRADIENT.format(a=models["a"], b=tmp_path / "missing"))
    assert cli.main(["merge", str(cfgf), str(tmp_path / "out"), "--no-progress", "-q"]) == 2
    assert "missing" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@needs_native
def test_native_cpu_path_equals_the_torch_paths(models, tmp_path, monkeypatch):
    # On the CPU, SLERP without a dtype change runs the native kernel on raw addresses (no torch);
    # the same kernel called through the op, and the torch reference, give the same bits.
    cfg = SLERP_GRADIENT.format(a=models["a"], b=models["b"])
    native = read_model(run_ours(cfg, tmp_path / "native", "--device", "cpu"))
    reference = read_model(run_ours(cfg, tmp_path / "torch", "--device", "cpu", "--backend", "torch"))
    monkeypatch.setenv("MERGEKIT_FAST_VERIFY", "1")  # the op path, each call cross-checked
    op = read_model(run_ours(cfg, tmp_path / "op", "--device", "cpu", "--backend", "cpp"))
    assert native.keys() == reference.keys() == op.keys()
    for k in native:
        assert torch.equal(native[k], op[k]), k
        assert torch.equal(native[k], reference[k]), k


def test_cpu_slerp_merge_does_not_import_torch(models, tmp_path):
    from mergekit_fast import _native

    if _native.C is None:
        pytest.skip("native module not built")
    cfg = tmp_path / "c.yml"
    cfg.write_text(SLERP_GRADIENT.format(a=models["a"], b=models["b"]))
    code = (
        "import sys\nfrom mergekit_fast import cli\n"
        f"rc = cli.main(['merge', {str(cfg)!r}, {str(tmp_path / 'out')!r}, '--device', 'cpu', '-q'])\n"
        "print(rc, 'torch' in sys.modules)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "MERGEKIT_FAST_VERIFY"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    assert proc.stdout.split() == ["0", "False"], proc.stderr
    # The merge in that process is complete.
    assert read_model(tmp_path / "out").keys() == read_model(models["a"]).keys()


@pytest.mark.parametrize("backend", ["auto", "torch"])  # the native CPU path, and the op's own path
def test_slerp_t_outside_0_1_extrapolates_like_mergekit(models, tmp_path, backend):
    """mergekit 0.1.5 accepts any t and extrapolates (t = 1.5 goes half as far again past the other
    model; t = -0.25 away from it); so does mergekit-fast, with mergekit's result."""
    cfg = SLERP_GRADIENT.format(a=models["a"], b=models["b"]).replace("value: 0.5", "value: 1.5")
    cfg = cfg.replace("value: [1, 0.5, 0.7, 0.3, 0]", "value: [-0.25, 0.5, 0.7, 0.3, 1.25]")
    ours = run_ours(cfg, tmp_path / "ours", "--device", "cpu", "--backend", backend, "--verify", "all")
    theirs = run_mergekit(cfg, tmp_path / "theirs")
    assert_same_model(ours, theirs, slerp_inputs=(models["a"], models["b"]), coefficient_bound=2.0)
