"""`mergekit-fast moe` against mergekit-moe 0.1.5 (run in this process) on tiny random models.

Parity: every tensor (name, shape, dtype, bits), the write order, config.json key by key and the tokenizer
files are identical for the cheap_embed and hidden gate modes and for random / uniform_random with a seed
(mergekit seeds torch's CPU generator with --random-seed and draws the gates first; so do we). Noise is
reproducible with a seed but is not mergekit's random stream (checked by distribution instead). End to end:
the outputs load in transformers and run a forward, and one MoE layer agrees with mergekit_fast's MoE block.
Bad input: a clear error before anything is written.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from fixtures_models import make_model
from helpers import HAS_GPU
from safetensors import safe_open

from mergekit_fast import cli
from mergekit_fast.engine import MergeError, MergeOptions
from mergekit_fast.io.safetensors import read_header
from mergekit_fast.moe.build import run_moe
from mergekit_fast.ops import _verify

os.environ["HF_HUB_OFFLINE"] = "1"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_models")
    m = {}
    for arch, n in (("mistral", 4), ("llama", 3), ("qwen2", 3), ("qwen3", 3)):
        for s in range(n):
            m[f"{arch}{s}"] = make_model(root / f"{arch}{s}", arch, seed=s, tokenizer=True)
    m["mistral_f32"] = make_model(
        root / "mistral_f32", "mistral", seed=7, dtype=torch.float32, tokenizer=True
    )
    m["mistral_i96"] = make_model(root / "mistral_i96", "mistral", seed=8, intermediate_size=96)
    m["mistral_l3"] = make_model(root / "mistral_l3", "mistral", seed=9, num_layers=3)
    m["mistral_tied"] = make_model(
        root / "mistral_tied", "mistral", seed=10, tie_word_embeddings=True, tokenizer=True
    )
    return m


def read_model(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                out[k] = st.get_tensor(k)
    return out


def shard_layout(path: Path) -> dict[str, list[str]]:
    """Shard file -> its tensor names. Which tensors share a shard follows the write order (a shard is
    closed when the next tensor would overflow it); inside a file the safetensors layout sorts them."""
    return {f.name: sorted(read_header(f)[0]) for f in sorted(path.glob("*.safetensors"))}


def expert(model, pos=None, neg=None, **kw) -> str:
    lines = [f"  - source_model: {model}"]
    if pos is not None:
        lines.append(f"    positive_prompts: {json.dumps(pos)}")
    if neg is not None:
        lines.append(f"    negative_prompts: {json.dumps(neg)}")
    lines += [f"    {k}: {v}" for k, v in kw.items()]
    return "\n".join(lines)


def moe_yaml(base, experts: list[str], shared: list[str] | None = None, **top) -> str:
    lines = [f"base_model: {base}"] + [f"{k}: {v}" for k, v in top.items()]
    lines += ["experts:"] + experts
    if shared:
        lines += ["shared_experts:"] + shared
    return "\n".join(lines) + "\n"


# Small shards, so that the shard layout (which follows the write order) is compared too.
SHARD = 30_000


def run_mergekit_moe(
    config: str, out: Path, *, seed: int | None = None, allow_same: bool = False, device: str = "cpu"
) -> Path:
    """mergekit-moe's main() minus click: MergeOptions, the seed as apply_global_options sets it, build()."""
    import transformers
    import yaml
    from mergekit.moe.config import MoEMergeConfig
    from mergekit.options import MergeOptions as MkOptions
    from mergekit.scripts.moe import build

    opts = MkOptions(quiet=True, device=device, random_seed=seed, out_shard_size=SHARD)
    if seed is not None:
        transformers.trainer_utils.set_seed(seed)
    build(MoEMergeConfig.model_validate(yaml.safe_load(config)), out_path=str(out), merge_options=opts,
          device=opts.device, allow_all_same=allow_same)  # fmt: skip
    return out


def run_ours(config: str, out: Path, *, device: str = "cpu", **kw) -> Path:
    opts = MergeOptions(device=device, write_model_card=False, progress=False, out_shard_size=SHARD)
    run_moe(config, out, opts, **kw)
    return out


def assert_same_output(ours: Path, theirs: Path) -> None:
    a, b = read_model(ours), read_model(theirs)
    assert sorted(a) == sorted(b), set(a) ^ set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(a[name], b[name]), f"{name} differs"
    assert shard_layout(ours) == shard_layout(theirs)
    if (theirs / "model.safetensors.index.json").exists():
        wm = lambda p: json.loads((p / "model.safetensors.index.json").read_text())["weight_map"]  # noqa: E731
        assert wm(ours) == wm(theirs)
    ca = json.loads((ours / "config.json").read_text())
    cb = json.loads((theirs / "config.json").read_text())
    assert ca.keys() == cb.keys()
    for k in ca:
        assert ca[k] == cb[k], k
    for f in TOKENIZER_FILES:
        assert (ours / f).exists() == (theirs / f).exists(), f
        if (ours / f).exists():
            assert (ours / f).read_bytes() == (theirs / f).read_bytes(), f


# ------------------------------------------------------------------------------------------- parity


def _parity_configs(m):
    p = lambda *xs: list(xs)  # noqa: E731
    mis = [
        expert(m["mistral1"], p("w5 w6 w7", "w8"), p("w20")),
        expert(m["mistral2"], p("w30 w31"), residual_scale=0.5),
        expert(m["mistral3"], p("w40 w41 w42 w43", "w44", "w45 w46")),
    ]
    return {
        "mixtral-cheap_embed": moe_yaml(m["mistral0"], mis, gate_mode="cheap_embed", dtype="bfloat16"),
        "mixtral-hidden": moe_yaml(
            m["mistral0"], mis, gate_mode="hidden", dtype="bfloat16", experts_per_token=1
        ),
        "mixtral-hidden_avg-llama": moe_yaml(
            m["llama0"],
            [expert(m["llama1"], p("w5 w6")), expert(m["llama2"], p("w7", "w9 w10 w11"))],
            gate_mode="hidden_avg",
        ),  # fmt: skip
        # no dtype: the base config's; mixed fp32/bf16 experts (residual_scale in each input's own dtype)
        "mixtral-mixed-dtypes": moe_yaml(
            m["mistral0"],
            [
                expert(m["mistral_f32"], p("w5"), residual_scale=0.3),
                expert(m["mistral1"], p("w6"), residual_scale=0.7),
            ],
            gate_mode="cheap_embed",
        ),  # fmt: skip
        # float32 output from bf16 experts: residual_scale in bf16, then the cast (as mergekit)
        "mixtral-f32-out-tied": moe_yaml(
            m["mistral_tied"],
            [expert(m["mistral1"], p("w5"), residual_scale=0.3), expert(m["mistral2"], p("w6"))],
            gate_mode="hidden_last",
            dtype="float32",
        ),  # fmt: skip
        "qwen2moe-hidden-shared": moe_yaml(
            m["qwen20"],
            [expert(m["qwen21"], p("w5 w6"), p("w9")), expert(m["qwen22"], p("w7"))],
            shared=[expert(m["qwen20"], p("w11 w12"), residual_scale=0.5)],
            gate_mode="hidden",
            dtype="bfloat16",
        ),  # fmt: skip
        # llama inputs: no attention biases -> zeros (float32: no dtype and... the base config's bf16)
        "qwen2moe-llama-zero-bias": moe_yaml(
            m["llama0"],
            [expert(m["llama1"], p("w5")), expert(m["llama2"], p("w7"))],
            shared=[expert(m["llama0"], p("w11"))],
            gate_mode="cheap_embed",
            architecture="qwen",
        ),  # fmt: skip
        "qwen3moe-cheap_embed": moe_yaml(
            m["qwen30"],
            [expert(m["qwen31"], p("w5 w6")), expert(m["qwen32"], p("w7"), residual_scale=2.0)],
            gate_mode="cheap_embed",
            dtype="bfloat16",
        ),  # fmt: skip
    }


PARITY = [
    "mixtral-cheap_embed",
    "mixtral-hidden",
    "mixtral-hidden_avg-llama",
    "mixtral-mixed-dtypes",
    "mixtral-f32-out-tied",
    "qwen2moe-hidden-shared",
    "qwen2moe-llama-zero-bias",
    "qwen3moe-cheap_embed",
]


@pytest.mark.mergekit
@pytest.mark.parametrize("case", PARITY)
def test_parity_with_mergekit_moe(models, tmp_path, case):
    config = _parity_configs(models)[case]
    theirs = run_mergekit_moe(config, tmp_path / "theirs")
    ours = run_ours(config, tmp_path / "ours")
    assert_same_output(ours, theirs)
    arch = json.loads((ours / "config.json").read_text())["architectures"][0]
    want = {
        "mixtral": "MixtralForCausalLM",
        "qwen2moe": "Qwen2MoeForCausalLM",
        "qwen3moe": "Qwen3MoeForCausalLM",
    }
    assert arch == want[case.split("-")[0]]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.mergekit
def test_parity_on_cuda(models, tmp_path):
    """Hidden-state gates from a bf16 forward on the GPU equal `mergekit-moe --cuda`'s; the engine runs the
    noise-free experts file to file and the gate constants through the CUDA path."""
    config = _parity_configs(models)["mixtral-hidden"]
    theirs = run_mergekit_moe(config, tmp_path / "theirs", device="cuda")
    ours = run_ours(config, tmp_path / "ours", device="cuda")
    assert_same_output(ours, theirs)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
def test_noise_same_on_cuda_and_cpu(models, tmp_path):
    m = models
    config = moe_yaml(m["mistral0"], [expert(m["mistral1"], ["w5"], noise_scale=0.01, residual_scale=0.5),
                                      expert(m["mistral2"], ["w6"])], gate_mode="cheap_embed")  # fmt: skip
    a = read_model(run_ours(config, tmp_path / "cpu", random_seed=2))
    b = read_model(run_ours(config, tmp_path / "cuda", random_seed=2, device="cuda"))
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.mergekit
@pytest.mark.parametrize("mode", ["random", "uniform_random"])
def test_random_gates_equal_mergekit_with_seed(models, tmp_path, mode):
    m = models
    # mergekit 0.1.5 wants prompts even for uniform_random (see test_uniform_random_needs_no_prompts).
    config = moe_yaml(m["qwen20"], [expert(m["qwen21"], ["w5"]), expert(m["qwen22"], ["w6"])],
                      shared=[expert(m["qwen20"], ["w7"])], gate_mode=mode, dtype="bfloat16")  # fmt: skip
    theirs = run_mergekit_moe(config, tmp_path / "theirs", seed=1234)
    ours = run_ours(config, tmp_path / "ours", random_seed=1234)
    assert_same_output(ours, theirs)


@pytest.mark.parametrize("mode", ["random", "uniform_random"])
def test_random_gates_distribution_and_seed(models, tmp_path, mode):
    m = models
    config = moe_yaml(
        m["mistral0"], [expert(m[f"mistral{i}"]) for i in (1, 2, 3)], gate_mode=mode, dtype="float32"
    )
    a = read_model(run_ours(config, tmp_path / "a", random_seed=5))
    b = read_model(run_ours(config, tmp_path / "b", random_seed=5))
    c = read_model(run_ours(config, tmp_path / "c", random_seed=6))
    gates = torch.stack([a[f"model.layers.{i}.mlp.gate.weight"] for i in range(4)])
    assert gates.shape == (4, 3, 32) and gates.dtype == torch.float32
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert not torch.equal(gates, torch.stack([c[f"model.layers.{i}.mlp.gate.weight"] for i in range(4)]))
    n = gates.numel()  # 384 draws
    if mode == "random":
        # N(0, 1): mean within 5 standard errors, variance within 30 % (chi-square, n = 384: sd ~ 7 %)
        assert abs(gates.mean()) < 5 / math.sqrt(n) and abs(gates.var() - 1) < 0.3
    else:
        s = 1 / math.sqrt(32)
        assert gates.abs().max() <= s and gates.abs().max() > 0.9 * s
        assert abs(gates.var() - s * s / 3) < 0.3 * s * s / 3  # U(-s, s) has variance s^2 / 3


def test_noise_reproducible_and_distributed(models, tmp_path):
    m = models
    # float32 experts so the noise itself is visible exactly (no bf16 rounding of x + noise)
    cfg = lambda scale: moe_yaml(  # noqa: E731
        m["mistral0"], [expert(m["mistral_f32"], ["w5"], noise_scale=scale), expert(m["mistral1"], ["w6"])],
        gate_mode="cheap_embed", dtype="float32",
    )  # fmt: skip
    clean = read_model(run_ours(cfg("null"), tmp_path / "clean"))
    a = read_model(run_ours(cfg(0.01), tmp_path / "a", random_seed=3))
    b = read_model(run_ours(cfg(0.01), tmp_path / "b", random_seed=3))
    c = read_model(run_ours(cfg(0.01), tmp_path / "c", random_seed=4))
    name = "model.layers.1.mlp.experts.gate_up_proj"
    assert torch.equal(a[name], b[name]) and not torch.equal(a[name], c[name])
    d = a[name] - clean[name]
    assert torch.equal(d[1], torch.zeros_like(d[1]))  # expert 1 has no noise
    assert abs(d[0].std() - 0.01) < 0.001 and abs(d[0].mean()) < 0.001  # 4096 draws: sd error ~1 %
    # distinct tensors get distinct noise
    assert not torch.allclose(d[0, :64], d[0, 64:])
    assert torch.equal(a["model.layers.0.mlp.gate.weight"], clean["model.layers.0.mlp.gate.weight"])


# ------------------------------------------------------------------------------------------ end to end


def block_error_ulps(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Max error in bf16 ulps of each token's largest output element. The MoE block does transformers'
    GEMMs in the same order; its routing weights differ from transformers' by a few fp32 ulps (its own
    exp and softmax over the chosen logits, see tests/test_moe_block.py), which can move a bf16 result
    that sits on a rounding boundary by one ulp of the token's scale. No routing tie occurs in these
    inputs (a tie could pick another expert: a large error, which the bound would catch)."""
    H = ref.shape[-1]
    g, r = got.reshape(-1, H), ref.reshape(-1, H)
    scale = r.float().abs().amax(dim=1, keepdim=True).expand_as(r)
    return _verify.max_errors(g, r, scale)[1]


@pytest.fixture(scope="module")
def mixtral4(models, tmp_path_factory):
    m = models
    experts = [expert(m[f"mistral{i}"], [f"w{10 + 7 * i} w{11 + 7 * i}", f"w{12 + 7 * i}"]) for i in range(4)]
    out = tmp_path_factory.mktemp("e2e") / "mixtral4"
    run_ours(moe_yaml(m["mistral0"], experts, gate_mode="hidden", dtype="bfloat16"), out)
    return out


def test_mixtral_loads_in_transformers_and_matches_our_block(models, mixtral4):
    import transformers

    from mergekit_fast.moe.block import MoEBlock

    model = transformers.AutoModelForCausalLM.from_pretrained(
        mixtral4, dtype=torch.bfloat16, experts_implementation="eager"
    )
    assert type(model).__name__ == "MixtralForCausalLM"
    assert model.config.num_local_experts == 4 and model.config.num_experts_per_tok == 2
    ids = torch.randint(3, 128, (2, 9))
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (2, 9, 128) and torch.isfinite(logits).all()

    files = read_model(mixtral4)
    # transformers holds exactly the written tensors (no conversion on load)...
    mlp = model.model.layers[2].mlp
    assert torch.equal(mlp.experts.gate_up_proj, files["model.layers.2.mlp.experts.gate_up_proj"])
    # ...and they are the experts' dense weights: gate rows, then up rows; expert e = model e.
    dense = read_model(models["mistral3"])
    gu = files["model.layers.2.mlp.experts.gate_up_proj"][3]
    assert torch.equal(gu[:64], dense["model.layers.2.mlp.gate_proj.weight"])
    assert torch.equal(gu[64:], dense["model.layers.2.mlp.up_proj.weight"])
    assert torch.equal(
        files["model.layers.2.mlp.experts.down_proj"][3], dense["model.layers.2.mlp.down_proj.weight"]
    )

    # One MoE layer: mergekit_fast's block on the file tensors vs transformers' MixtralSparseMoeBlock.
    x = torch.randn(2, 9, 32, dtype=torch.bfloat16)
    block = MoEBlock(gate_weight=files["model.layers.2.mlp.gate.weight"],
                     gate_up_proj=files["model.layers.2.mlp.experts.gate_up_proj"],
                     down_proj=files["model.layers.2.mlp.experts.down_proj"], k=2)  # fmt: skip
    with torch.no_grad():
        ref = mlp(x)
        got = block(x, backend="torch")
        # The control: the same weights with gate and up swapped must NOT pass the check below.
        gu = block.gate_up_proj
        swapped = MoEBlock(block.gate_weight, torch.cat([gu[:, 64:], gu[:, :64]], 1), block.down_proj, k=2)
        wrong = swapped(x, backend="torch")
    assert block_error_ulps(got, ref) <= 1.0
    assert block_error_ulps(wrong, ref) > 16.0


@pytest.mark.mergekit
def test_qwen2moe_loads_and_matches_our_block(models, tmp_path):
    import transformers

    from mergekit_fast.moe.block import MoEBlock

    m = models
    config = _parity_configs(m)["qwen2moe-hidden-shared"]
    out = run_ours(config, tmp_path / "q")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.bfloat16, experts_implementation="eager"
    )
    assert type(model).__name__ == "Qwen2MoeForCausalLM"
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(3, 128, (1, 7))).logits).all()
    files = read_model(out)
    mlp = model.model.layers[1].mlp
    # transformers fuses the per-expert tensors on load: gate rows then up rows
    assert torch.equal(
        mlp.experts.gate_up_proj[1, :64], files["model.layers.1.mlp.experts.1.gate_proj.weight"]
    )
    assert torch.equal(mlp.shared_expert_gate.weight, files["model.layers.1.mlp.shared_expert_gate.weight"])
    x = torch.randn(1, 7, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = mlp(x)
        got = MoEBlock.from_transformers(mlp)(x, backend="torch")
    assert block_error_ulps(got, ref) <= 1.0


def test_verify_and_model_card(models, tmp_path):
    m = models
    config = moe_yaml(m["mistral0"], [expert(m["mistral1"], ["w5"], residual_scale=0.5, noise_scale=0.01),
                                      expert(m["mistral2"], ["w6"])], gate_mode="cheap_embed")  # fmt: skip
    out = tmp_path / "v"
    res = run_moe(config, out, MergeOptions(device="cpu", verify=-1, progress=False), random_seed=1)
    assert res.verify_max_ulp == 0.0
    assert (out / "mergekit_moe_config.yml").read_text() == config
    assert "Mixtral" in (out / "README.md").read_text()
    assert not (out / "mergekit_config.yml").exists()


def test_cli_and_alias(models, tmp_path):
    m = models
    cfg = tmp_path / "moe.yml"
    cfg.write_text(moe_yaml(m["mistral0"], [expert(m["mistral1"], ["w5"]), expert(m["mistral2"], ["w6"])],
                            gate_mode="cheap_embed"))  # fmt: skip
    assert cli.main(["moe", str(cfg), str(tmp_path / "a"), "--no-progress", "-q", "--device", "cpu"]) == 0
    assert (
        cli.moe_alias_main([str(cfg), str(tmp_path / "b"), "--no-progress", "-q", "--random-seed", "3"]) == 0
    )
    assert read_model(tmp_path / "a").keys() == read_model(tmp_path / "b").keys()


# ---------------------------------------------------------------------------------------- bad input


def _bad_cases(m):
    two = [expert(m["mistral1"], ["w5"]), expert(m["mistral2"], ["w6"])]
    return {
        "too many per token": (
            moe_yaml(m["mistral0"], two, experts_per_token=3),
            "experts_per_token: 3 is more than the number of experts (2)",
        ),
        "no prompts": (
            moe_yaml(m["mistral0"], [expert(m["mistral1"], ["w5"]), expert(m["mistral2"])]),
            "experts[1].positive_prompts: gate_mode 'hidden' needs positive prompts",
        ),
        "same prompts": (
            moe_yaml(m["mistral0"], [expert(m["mistral1"], ["w5"]), expert(m["mistral2"], ["w5"])]),
            "the positive and negative prompts are identical for all experts",
        ),
        "same experts": (
            moe_yaml(m["mistral0"], [expert(m["mistral1"], ["w5"]), expert(m["mistral1"], ["w6"])]),
            "all expert models are the same",
        ),
        "unknown architecture": (
            moe_yaml(m["mistral0"], two, architecture="gpt"),
            "architecture: no output architecture matches 'gpt'",
        ),
        "mixed architectures": (
            moe_yaml(m["mistral0"], [expert(m["mistral1"], ["w5"]), expert(m["qwen31"], ["w6"])]),
            "Mixtral requires all input models to have the same architecture",
        ),
        "qwen3 forced on mistral": (
            moe_yaml(m["mistral0"], two, architecture="qwen3"),
            "Qwen3 MoE only supports qwen3 input models",
        ),
        "intermediate size": (
            moe_yaml(m["mistral0"], [expert(m["mistral1"], ["w5"]), expert(m["mistral_i96"], ["w6"])]),
            "experts[1].source_model: ",
        ),
        "layer count": (
            moe_yaml(m["mistral0"], [expert(m["mistral_l3"], ["w5"]), expert(m["mistral2"], ["w6"])]),
            "experts[0].source_model: ",
        ),
        "gate mode": (
            moe_yaml(m["mistral0"], two, gate_mode="hiden"),
            "gate_mode: unknown gate mode 'hiden'",
        ),
        "unknown key": (
            moe_yaml(m["mistral0"], [expert(m["mistral1"], ["w5"], postive_prompts="[w1]"), two[1]]),
            "experts[0].postive_prompts: unknown key",
        ),
        "deepseek": (
            moe_yaml(
                m["llama0"],
                [expert(m["llama1"], ["w5"]), expert(m["llama2"], ["w6"])],
                shared=[expert(m["llama0"])],
                gate_mode="cheap_embed",
            ),  # fmt: skip
            "DeepSeek MoE output is not supported yet",
        ),
        "missing model": (moe_yaml(m["mistral0"] / "nope", two), "no such directory"),
        "mixed shared prompts": (
            moe_yaml(
                m["qwen20"],
                [expert(m["qwen21"], ["w5"]), expert(m["qwen22"], ["w6"])],
                shared=[expert(m["qwen20"], ["w7"]), expert(m["qwen21"])],
            ),  # fmt: skip
            "give positive_prompts to all shared experts or to none",
        ),
    }


BAD = [
    "too many per token",
    "no prompts",
    "same prompts",
    "same experts",
    "unknown architecture",
    "mixed architectures",
    "qwen3 forced on mistral",
    "intermediate size",
    "layer count",
    "gate mode",
    "unknown key",
    "deepseek",
    "missing model",
    "mixed shared prompts",
]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_fails_before_writing(models, tmp_path, case, capsys):
    config, message = _bad_cases(models)[case]
    cfg = tmp_path / "moe.yml"
    cfg.write_text(config)
    out = tmp_path / "out"
    rc = cli.main(["moe", str(cfg), str(out), "--no-progress", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err, err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moe.yml"]  # no temporary directory either


def test_shape_errors_name_the_tensor(models, tmp_path):
    m = models
    config = moe_yaml(m["mistral0"], [expert(m["mistral1"], ["w5"]), expert(m["mistral_i96"], ["w6"])])
    with pytest.raises(ValueError, match="intermediate_size 96, the base model 64"):
        run_ours(config, tmp_path / "o")


def test_allow_same_and_existing_out(models, tmp_path):
    m = models
    config = moe_yaml(m["mistral0"], [expert(m["mistral1"], ["w5"]), expert(m["mistral1"], ["w6"])],
                      gate_mode="cheap_embed")  # fmt: skip
    out = run_ours(config, tmp_path / "o", allow_same=True)
    t = read_model(out)["model.layers.0.mlp.experts.down_proj"]
    assert torch.equal(t[0], t[1])
    with pytest.raises(MergeError, match="exists; pass --force"):
        run_ours(config, out, allow_same=True)


@pytest.mark.mergekit
def test_random_mode_allows_identical_experts_like_mergekit(models, tmp_path):
    m = models
    config = moe_yaml(m["mistral0"], [expert(m["mistral1"]), expert(m["mistral1"])], gate_mode="random")
    theirs = run_mergekit_moe(config, tmp_path / "theirs", seed=9)
    ours = run_ours(config, tmp_path / "ours", random_seed=9)
    assert_same_output(ours, theirs)


@pytest.mark.mergekit
def test_uniform_random_needs_no_prompts(models, tmp_path):
    """Documented difference: mergekit 0.1.5 refuses uniform_random without prompts (it never reads them)."""
    m = models
    config = moe_yaml(
        m["mistral0"], [expert(m["mistral1"]), expert(m["mistral2"])], gate_mode="uniform_random"
    )
    with pytest.raises(SystemExit):
        run_mergekit_moe(config, tmp_path / "theirs")
    out = run_ours(config, tmp_path / "ours", random_seed=0)
    assert read_model(out)["model.layers.0.mlp.gate.weight"].shape == (2, 32)
