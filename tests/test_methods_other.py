"""The non-task-arithmetic methods of mergekit 0.1.5 (sce, model_stock, nuslerp, multislerp, karcher,
nearswap, arcee_fusion, ram, ramplus_tl) against mergekit itself.

Each parity case merges one config with ``mergekit-fast merge --verify all`` and with mergekit 0.1.5
(in this process) and compares the outputs tensor by tensor: names, shapes and dtypes equal; values
within one ulp of the output dtype on at most 0.1% of the elements, the ulp taken at the terms' scale
(sum of the inputs' magnitudes, as the SLERP tests do). Our torch code performs mergekit's operations
in mergekit's dtypes, so on this CPU nearly every tensor is bit-identical; the ulp bound is the
issue's criterion, kept as the assertion so that a legitimate reordering of a reduction would pass.

Inputs are a tiny random base model and "fine-tunes" of it: each changes a random part of every tensor
(so that ram's overlaps, sce's consensus and nearswap's clamp all see both cases) by a mix of a shared
and an own random direction (so that model_stock's and karcher's angles are not all 90 degrees).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from fixtures_models import make_model
from helpers import read_model, run_mergekit, run_ours
from safetensors import safe_open
from safetensors.torch import save_file

from mergekit_fast import methods
from mergekit_fast.config import ConfigError
from mergekit_fast.ops._verify import ulp

pytestmark = pytest.mark.mergekit


def fine_tune(src: Path, dst: Path, *, seed: int, density: float, scale: float = 0.02, dtype=None,
              drop=lambda name: False) -> Path:  # fmt: skip
    """A copy of model ``src`` at ``dst`` with a random ``density`` of every tensor's elements moved by
    scale * (0.5 shared + own) normal noise (the shared part is the same for every seed); ``drop(name)``
    tensors are left out (an optional weight some models lack)."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, dst / f.name)
    out = {}
    with safe_open(str(src / "model.safetensors"), framework="pt") as st:
        for k in st.keys():
            if drop(k):
                continue
            x = st.get_tensor(k)
            g = torch.Generator().manual_seed(seed * 1000 + len(out))
            common = torch.randn(x.shape, generator=torch.Generator().manual_seed(len(out)))
            own = torch.randn(x.shape, generator=g)
            keep = torch.rand(x.shape, generator=g) < density
            out[k] = (x.float() + keep * (0.5 * common + own) * scale).to(dtype or x.dtype)
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def m(tmp_path_factory):
    root = tmp_path_factory.mktemp("other_methods")
    kw = dict(num_layers=2)
    models = {}
    models["a"] = make_model(root / "a", seed=11, **kw)
    for name, seed, density in (("b", 1, 0.5), ("c", 2, 0.3), ("d", 3, 0.7)):
        models[name] = fine_tune(models["a"], root / name, seed=seed, density=density)
    models["qa"] = make_model(root / "qa", "qwen2", seed=12, **kw)
    for name, seed, density in (("qb", 4, 0.6), ("qc", 5, 0.4), ("qd", 6, 0.5)):
        models[name] = fine_tune(models["qa"], root / name, seed=seed, density=density)
    models["fa"] = make_model(root / "fa", seed=13, dtype=torch.float32, **kw)
    for name, seed, density in (("fb", 7, 0.5), ("fc", 8, 0.4)):
        models[name] = fine_tune(models["fa"], root / name, seed=seed, density=density)
    models["ra"] = make_model(root / "ra", seed=14, **kw)  # unrelated models (no common base)
    models["rb"] = make_model(root / "rb", seed=15, **kw)
    models["rc"] = make_model(root / "rc", seed=16, **kw)
    models["ta"] = make_model(root / "ta", seed=17, tie_word_embeddings=True, **kw)  # no lm_head in its files
    return models


def assert_parity(ours: Path, theirs: Path, inputs: list[Path]) -> int:
    """The issue's criterion (module docstring); returns how many tensors differ at all."""
    a, b = read_model(ours), read_model(theirs)
    assert sorted(a) == sorted(b), set(a) ^ set(b)
    ins = [read_model(p) for p in inputs]
    differing = 0
    for name in a:
        x, y = a[name], b[name]
        assert x.shape == y.shape and x.dtype == y.dtype, (name, x.dtype, y.dtype)
        if torch.equal(x, y):
            continue
        differing += 1
        terms = sum(i[name].double().abs() for i in ins if name in i)
        diff = (x.double() - y.double()).abs()
        assert bool((diff <= ulp(terms, x.dtype)).all()), (name, float(diff.max()))
        assert (diff > 0).double().mean() <= 1e-3, name
    assert json.loads((ours / "config.json").read_text()) == json.loads((theirs / "config.json").read_text())
    return differing


def models_config(method: str, entries: list, *, base=None, params=None, dtype="bfloat16", extra="") -> str:
    """A `models:` config: entries are (model path, per-model parameters or None)."""
    lines = ["models:"]
    for path, p in entries:
        lines.append(f"  - model: {path}")
        if p:
            lines.append(f"    parameters: {json.dumps(p)}")
    lines.append(f"merge_method: {method}")
    if base:
        lines.append(f"base_model: {base}")
    if params:
        lines.append(f"parameters: {json.dumps(params)}")
    if dtype:
        lines.append(f"dtype: {dtype}")
    return "\n".join(lines) + "\n" + extra


# (id, method, base, [(model, per-model params)], shared params, dtype): in the style of mergekit's own
# tests -- 2 and 3 models plus a base, Llama and Qwen2 shapes, bf16 and fp32, options on and off.
CASES = [
    ("sce-3-topk", "sce", "a", [("b", None), ("c", None), ("d", None)], {"select_topk": 0.5}, "bfloat16"),
    ("sce-2-qwen-fp32", "sce", "qa", [("qb", None), ("qc", None)], None, "float32"),
    ("sce-int8-gradient", "sce", "qa", [("qb", None), ("qc", None), ("qd", None)],
     {"select_topk": [0.3, 0.8], "int8_mask": True}, "bfloat16"),
    ("model_stock-2", "model_stock", "a", [("b", None), ("c", None)], None, "bfloat16"),
    ("model_stock-3-filter-qwen-fp32", "model_stock", "qa", [("qb", None), ("qc", None), ("qd", None)],
     {"filter_wise": True}, "float32"),
    ("nuslerp-nobase", "nuslerp", None, [("ra", {"weight": 0.3}), ("rb", {"weight": 0.7})], None, "bfloat16"),
    ("nuslerp-base-rows-qwen", "nuslerp", "qa", [("qb", {"weight": 1.0}), ("qc", {"weight": 0.5})],
     {"nuslerp_flatten": False}, "bfloat16"),
    ("nuslerp-base-cols-negative-fp32", "nuslerp", "a", [("b", {"weight": -0.2}), ("c", {"weight": 1.0})],
     {"nuslerp_flatten": False, "nuslerp_row_wise": True}, "float32"),
    ("multislerp-3-nobase", "multislerp", None,
     [("ra", {"weight": 0.2}), ("rb", {"weight": 0.5}), ("rc", {"weight": 0.3})], None, "bfloat16"),
    ("multislerp-base-unnormalized-qwen-fp32", "multislerp", "qa",
     [("qb", {"weight": 0.7}), ("qc", {"weight": 0.6})], {"normalize_weights": False}, "float32"),
    ("multislerp-base-one", "multislerp", "a", [("b", {"weight": 1.0})], None, "bfloat16"),
    ("karcher-3", "karcher", None, [("a", None), ("b", None), ("c", None)], None, "bfloat16"),
    ("karcher-base-is-an-input", "karcher", "a", [("b", None), ("d", None)], None, "bfloat16"),
    ("karcher-2-qwen-fp32", "karcher", None, [("qb", None), ("qc", None)], {"max_iter": 3, "tol": 1e-6},
     "float32"),
    ("nearswap", "nearswap", "a", [("b", None)], {"t": 0.01}, "bfloat16"),
    ("nearswap-gradient-qwen-fp32", "nearswap", "qa", [("qb", None)], {"t": [0.0001, 0.05]}, "float32"),
    ("nearswap-t-outside", "nearswap", "a", [("b", None)], {"t": 2.5}, "bfloat16"),
    ("nearswap-t-negative", "nearswap", "a", [("b", None)], {"t": -0.5}, "bfloat16"),
    ("arcee_fusion", "arcee_fusion", "a", [("b", None)], None, "bfloat16"),
    ("arcee_fusion-qwen-fp32", "arcee_fusion", "qa", [("qb", None)], None, "float32"),
    ("arcee_fusion-stored-fp32", "arcee_fusion", "fa", [("fb", None)], None, None),
    ("ram-3", "ram", "a", [("b", None), ("c", None), ("d", None)], None, "bfloat16"),
    ("ram-2-qwen-fp32", "ram", "qa", [("qb", None), ("qc", None)], {"epsilon": 1e-3}, "float32"),
    ("ramplus_tl-3", "ramplus_tl", "a", [("b", None), ("c", None), ("d", None)], None, "bfloat16"),
    ("ramplus_tl-2-qwen-fp32", "ramplus_tl", "qa", [("qb", None), ("qc", None)],
     {"r": 0.5, "alpha": 0.5, "epsilon": 1e-3}, "float32"),
    # filters: a shared bool by tensor name, per-model weights by input tensor name
    ("model_stock-filter-by-name", "model_stock", "a", [("b", None), ("c", None)],
     {"filter_wise": [{"filter": "mlp", "value": True}, {"value": False}]}, "bfloat16"),
    ("multislerp-weight-filters", "multislerp", "a",
     [("b", {"weight": [{"filter": "self_attn", "value": 0.9}, {"value": 0.5}]}), ("c", {"weight": 0.5})], None,
     "bfloat16"),
    # a tied lm_head missing from the base's files is read from its embedding, in both tools
    ("nearswap-tied-base", "nearswap", "ta", [("ra", None)], {"t": 0.05}, "bfloat16"),
    ("arcee_fusion-tied-base", "arcee_fusion", "ta", [("rb", None)], None, "bfloat16"),
    ("ramplus_tl-stored-fp32", "ramplus_tl", "fa", [("fb", None), ("fc", None)], None, None),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_mergekit(m, tmp_path, case):
    _, method, base, entries, params, dtype = case
    entries = [(m[k], p) for k, p in entries]
    cfg = models_config(method, entries, base=m[base] if base else None, params=params, dtype=dtype)
    ours = run_ours(cfg, tmp_path / "ours", "--verify", "all")
    theirs = run_mergekit(cfg, tmp_path / "theirs")
    inputs = [p for p, _ in entries] + ([m[base]] if base else [])
    assert_parity(ours, theirs, inputs)


# ----------------------------------------------------------------------------- optional-tensor policies
# Granite's definition marks its attention and MLP biases optional: models without them are the
# "optional tensor missing from some inputs" case of mergekit's task_adapter.


@pytest.fixture(scope="module")
def g(tmp_path_factory):
    import transformers

    root = tmp_path_factory.mktemp("granite")
    cfg = transformers.GraniteConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, vocab_size=128, num_attention_heads=4,
        num_key_value_heads=2, attention_bias=True, mlp_bias=True, max_position_embeddings=256,
    )  # fmt: skip
    torch.manual_seed(21)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(root / "a")
    out = {"a": root / "a"}
    no_bias = lambda name: name.endswith(".bias")  # noqa: E731
    out["a_nb"] = fine_tune(out["a"], root / "a_nb", seed=30, density=0.0, drop=no_bias)
    for i, name in enumerate("bcd"):
        out[name] = fine_tune(out["a"], root / name, seed=31 + i, density=0.5)
        out[name + "_nb"] = fine_tune(out["a"], root / (name + "_nb"), seed=31 + i, density=0.5, drop=no_bias)
    return out


BIAS = "model.layers.0.self_attn.q_proj.bias"

# (id, method, base, [(model, per-model params)], shared params, what the bias becomes:
#  a model key (copied from it), "merged" (merged from the models that have it), None (not written))
POLICY_CASES = [
    ("nuslerp-singleton", "nuslerp", None, [("b", {"weight": 0.4}), ("c_nb", {"weight": 0.6})], None, "b"),
    ("arcee_fusion-singleton-other", "arcee_fusion", "a_nb", [("b", None)], None, "b"),
    ("arcee_fusion-singleton-base", "arcee_fusion", "a", [("c_nb", None)], None, "a"),
    ("nearswap-base-singleton", "nearswap", "a", [("b_nb", None)], {"t": 0.01}, "a"),
    ("model_stock-base-only", "model_stock", "a", [("b_nb", None), ("c_nb", None)], None, "a"),
    ("model_stock-skip-one-other", "model_stock", "a_nb", [("b", None), ("c_nb", None)], None, None),
    ("model_stock-skip-two-of-three", "model_stock", "a", [("b", None), ("c_nb", None)], None, None),
    ("model_stock-three-of-four", "model_stock", "a", [("b", None), ("c", None), ("d_nb", None)], None,
     "merged"),
    ("ram-error-policy-merges-present", "ram", "a", [("b", None), ("c_nb", None)], None, "merged"),
    ("multislerp-error-policy-one-left", "multislerp", None, [("b", {"weight": 1}), ("c_nb", {"weight": 2})],
     None, "b"),
]  # fmt: skip


@pytest.mark.parametrize("case", POLICY_CASES, ids=[c[0] for c in POLICY_CASES])
def test_optional_tensor_policy_matches_mergekit(g, tmp_path, case):
    _, method, base, entries, params, expect = case
    entries = [(g[k], p) for k, p in entries]
    cfg = models_config(method, entries, base=g[base] if base else None, params=params)
    ours = run_ours(cfg, tmp_path / "ours", "--verify", "all")
    theirs = run_mergekit(cfg, tmp_path / "theirs")
    assert_parity(ours, theirs, [p for p, _ in entries] + ([g[base]] if base else []))
    out = read_model(ours)
    if expect is None:
        assert BIAS not in out
    elif expect == "merged":
        assert BIAS in out and all(not torch.equal(out[BIAS], read_model(p)[BIAS]) for p in (g["a"], g["b"]))
    else:
        assert torch.equal(out[BIAS], read_model(g[expect])[BIAS])


@pytest.mark.parametrize(
    "method, base, entries, params",
    [
        ("nearswap", "a_nb", ["b"], {"t": 0.01}),  # only the other model has it: the base is required
        ("ram", "a_nb", ["b", "c"], None),
        ("sce", "a_nb", ["b", "c"], None),
    ],
)
def test_optional_tensor_without_the_required_base_fails_in_both(g, tmp_path, method, base, entries, params):
    from mergekit_fast.config import parse_config
    from mergekit_fast.plan import build_plan

    cfg = models_config(method, [(g[k], None) for k in entries], base=g[base], params=params)
    with pytest.raises(
        ConfigError, match=r"output tensor model\.layers\.0\..*bias: base_model .* is not one of"
    ):
        build_plan(parse_config(cfg))
    with pytest.raises(Exception, match="Base input is not present"):
        run_mergekit(cfg, tmp_path / "theirs")


# ----------------------------------------------------------------------------- what mergekit rejects

REJECTED = [
    ("model_stock", ["b"], "a", None, r"^models: merge_method model_stock needs at least 3 input model\(s\)", "requires at least 3 inputs"),
    ("nearswap", ["b"], "a", None, r"^parameters\.t: Missing required parameter t", "Missing required parameter t"),
    ("nearswap", ["b", "c"], "a", {"t": 0.1}, r"^models: merge_method nearswap needs exactly 2 input model", "requires exactly 2 inputs"),
    ("arcee_fusion", ["b", "c"], "a", None, r"^models: merge_method arcee_fusion needs exactly 2 input", "requires exactly 2 inputs"),
    ("nuslerp", ["b", "c", "d"], None, None, r"^models: merge_method nuslerp needs exactly 2 model\(s\) besides", "requires exactly 2 non-base inputs"),
    ("nuslerp", ["b"], "a", None, r"^models: merge_method nuslerp needs exactly 2 model\(s\) besides the base", "requires at least 2 non-base inputs"),
    ("multislerp", [], "a", None, r"^models: merge_method multislerp needs at least 1 model\(s\) besides", "requires at least 1 non-base inputs"),
    ("karcher", ["a", "b"], None, {"max_iter": 2.5}, r"^parameters\.max_iter: 2\.5 is not a valid value", "valid integer"),
    ("sce", ["b", "c"], None, None, r"^models: merge_method sce needs a base_model", "requires a base input"),
    ("model_stock", ["b", "c", "d"], None, None, r"^models: merge_method model_stock needs a base_model", "requires a base input"),
    ("nearswap", ["a", "b"], None, {"t": 0.1}, r"^models: merge_method nearswap needs a base_model", "requires a base input"),
    ("arcee_fusion", ["a", "b"], None, None, r"^models: merge_method arcee_fusion needs a base_model", "requires a base input"),
    ("ram", ["b", "c"], None, None, r"^models: merge_method ram needs a base_model", "requires a base input"),
    ("ramplus_tl", ["b", "c"], None, None, r"^models: merge_method ramplus_tl needs a base_model", "requires a base input"),
]  # fmt: skip


@pytest.mark.parametrize("method, models, base, params, message, theirs", REJECTED,
                         ids=[f"{r[0]}-{i}" for i, r in enumerate(REJECTED)])  # fmt: skip
def test_rejected_in_the_config_as_in_mergekit(m, tmp_path, method, models, base, params, message, theirs):
    """Our message (ConfigError, before any model is opened) names the key path; mergekit's error is
    the same rejection, raised while it plans."""
    from mergekit_fast.config import parse_config

    weights = {"weight": 0.5} if methods.get(method).param("weight") else None
    cfg = models_config(
        method, [(m[k], weights) for k in models], base=m[base] if base else None, params=params
    )
    if not models:  # a config with only a base
        cfg = cfg.replace("models:\n", f"models:\n  - model: {m[base]}\n")
    with pytest.raises(ConfigError, match=message):
        parse_config(cfg)
    with pytest.raises(Exception, match=theirs):  # ValueError, RuntimeError or pydantic's ValidationError
        run_mergekit(cfg, tmp_path / "theirs")


ACCEPTED = [
    ("sce-topk-above-1", "sce", "a", [("b", None), ("c", None)], {"select_topk": 1.5}, "bfloat16"),
    ("sce-topk-negative", "sce", "a", [("b", None), ("c", None)], {"select_topk": -0.1}, "bfloat16"),
    ("sce-base-only-slice", "sce", "a", [], None, "bfloat16"),
    ("multislerp-negative-weight", "multislerp", None, [("ra", {"weight": -0.3}), ("rb", {"weight": 1.0})],
     None, "bfloat16"),
    ("nuslerp-weights-cancel", "nuslerp", None, [("ra", {"weight": 1.0}), ("rb", {"weight": -1.0})], None,
     "bfloat16"),
    ("karcher-no-iterations", "karcher", None, [("ra", None), ("rb", None)], {"max_iter": 0}, "bfloat16"),
    ("karcher-one-model", "karcher", None, [("ra", None)], None, "bfloat16"),
    ("ramplus_tl-negative-r", "ramplus_tl", "a", [("b", None), ("c", None)], {"r": -1.0, "alpha": 2},
     "bfloat16"),
    ("arcee_fusion-out-dtype", "arcee_fusion", "a", [("b", None)], None, "bfloat16"),
]  # fmt: skip


@pytest.mark.parametrize("case", ACCEPTED, ids=[c[0] for c in ACCEPTED])
def test_accepted_as_in_mergekit(m, tmp_path, case):
    name, method, base, entries, params, dtype = case
    entries = [(m[k], p) for k, p in entries]
    extra = "out_dtype: bfloat16\n" if name.endswith("out-dtype") else ""
    cfg = models_config(
        method, entries, base=m[base] if base else None, params=params, dtype=dtype, extra=extra
    )
    if not entries:
        cfg = cfg.replace("models:\n", f"models:\n  - model: {m[base]}\n")
    ours = run_ours(cfg, tmp_path / "ours", "--verify", "all")
    theirs = run_mergekit(cfg, tmp_path / "theirs")
    assert_parity(ours, theirs, [p for p, _ in entries] + ([m[base]] if base else []))
    if extra:
        assert {t.dtype for t in read_model(ours).values()} == {torch.bfloat16}


# ----------------------------------------------------------------------------- arcee_fusion's random sample

BIG = ("model.embed_tokens.weight", "lm_head.weight")  # 8192 x 128 = 1,048,576 elements: sampled


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """A base and a fine-tune whose embeddings and lm_head exceed arcee_fusion's 1M-element sample."""
    root = tmp_path_factory.mktemp("arcee_big")
    kw = dict(num_layers=1, hidden_size=128, intermediate_size=256, vocab_size=8192)
    a = make_model(root / "a", seed=41, **kw)
    return a, fine_tune(a, root / "b", seed=42, density=0.5)


def _fusion_parts(base: torch.Tensor, other: torch.Tensor):
    """(importance scores, value where kept, value where dropped), as mergekit computes them (fp32)."""
    from mergekit_fast.methods.arcee_fusion import importance

    return importance(base, other), base + (other - base).float(), base.float()


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_arcee_fusion_sampled_threshold_within_sampling_error(big, tmp_path, dtype):
    a, b = big
    cfg = models_config("arcee_fusion", [(b, None)], base=a, dtype=dtype)
    ours = read_model(run_ours(cfg, tmp_path / "ours", "--random-seed", "7", "--verify", "all", "-j", "1"))
    theirs = read_model(run_mergekit(cfg, tmp_path / "theirs"))
    small = sorted(set(ours) - set(BIG))
    assert small and all(torch.equal(ours[k], theirs[k]) for k in small)  # nothing drawn: exact
    cast = getattr(torch, dtype)
    ma, mb = ({k: v.to(cast) for k, v in read_model(p).items()} for p in (a, b))
    for name in BIG:
        scores, kept, dropped = _fusion_parts(ma[name], mb[name])
        s = scores.reshape(-1).double()
        n = s.numel()
        assert n > 1_000_000
        fractions = []
        for out in (ours[name], theirs[name]):
            # Everything but the threshold is exact: each element is the kept or the dropped value, and
            # the kept ones are exactly those whose score is at or above one threshold.
            keep = (out == kept) & (kept != dropped)
            assert bool(((out == kept) | (out == dropped)).all()), name
            moved = (kept != dropped).reshape(-1)
            k = keep.reshape(-1)
            assert float(s[k].min()) >= float(s[moved & ~k].max()), name
            fractions.append(float((s >= float(s[k].min())).double().mean()))
        # Sampling error: a sample quantile of 1M draws with replacement sits at a population rank within
        # delta = 5 sqrt(p (1 - p) / 1M) of p (5 sigma of the binomial); the bf16 arithmetic of
        # median + 1.5 IQR adds a relative 2^-6 at most. The threshold lies between the thresholds so
        # bounded, and the kept fraction of both tools between the fractions those keep.
        srt = s.sort().values
        delta = 5 * (0.25 * 0.75 / 1e6) ** 0.5

        def q(p, srt=srt, n=n):
            return float(srt[min(n - 1, max(0, int(p * (n - 1))))])

        lo = (q(0.5 - delta) + 1.5 * (q(0.75 - delta) - q(0.25 + delta))) * (1 - 2**-6)
        hi = (q(0.5 + delta) + 1.5 * (q(0.75 + delta) - q(0.25 - delta))) * (1 + 2**-6)
        f_hi, f_lo = float((s >= lo).double().mean()), float((s >= hi).double().mean())
        for f in fractions:
            assert f_lo <= f <= f_hi, (name, f_lo, fractions, f_hi)
        assert 0.01 < fractions[0] < 0.5  # a real selection, not all or nothing


def _bytes(path: Path) -> bytes:
    return (path / "model.safetensors").read_bytes()


def test_arcee_fusion_same_seed_same_bytes(big, tmp_path):
    """fp32: scores are continuous, so another seed's sample moves the threshold (in bf16 the rounded
    quantiles mostly land on the same value whatever the sample)."""
    a, b = big
    cfg = models_config("arcee_fusion", [(b, None)], base=a, dtype="float32")
    # both thread counts and both backends, each changed alone (-j 2 is slow on a loaded 2-core machine)
    runs = [
        ("-j", "1", "--backend", "torch"),
        ("-j", "2", "--backend", "torch"),
        ("-j", "1", "--backend", "auto"),
    ]
    outs = [_bytes(run_ours(cfg, tmp_path / f"o{i}", "--random-seed", "123", *r)) for i, r in enumerate(runs)]
    assert all(o == outs[0] for o in outs[1:])
    other_seed = read_model(run_ours(cfg, tmp_path / "seed124", "--random-seed", "124", "-j", "1"))
    first = read_model(tmp_path / "o0")
    assert not torch.equal(other_seed["lm_head.weight"], first["lm_head.weight"])  # the sample is drawn
    assert torch.equal(other_seed["model.norm.weight"], first["model.norm.weight"])  # small: nothing drawn


@pytest.mark.parametrize(
    "seed, name, stream, n, high",
    [(0, "a", 0, 1, 5), (7, "lm_head.weight", 0, 1_000_000, 1_048_577), (2**63 - 1, "x.y", 3, 13, 2**31 - 1),
     (12345678901, "", 1, 1003, 3)],
)  # fmt: skip
def test_numpy_draws_are_rngs(seed, name, stream, n, high):
    """arcee_fusion draws its CPU sample with _philox_numpy: the same indices as methods/rng.py."""
    from mergekit_fast.methods import _philox_numpy, rng

    assert torch.equal(
        _philox_numpy.randint(high, seed, name, stream, n), rng.randint(high, seed, name, stream, n)
    )
