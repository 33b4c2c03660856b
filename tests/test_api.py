"""The Python API: merge() as the CLI does it, and mergekit 0.1.5's in-memory entry points.

merge_state_dicts / merge_tensors are compared with mergekit 0.1.5's own (mergekit.merge_methods.api) on
random state dicts: same keys, dtypes and values (SLERP within one ulp of the terms on at most 0.1% of
elements, as everywhere; linear and passthrough bit for bit).
"""

from __future__ import annotations

import hashlib

import pytest
import torch
import yaml

import mergekit_fast as mk
from mergekit_fast import cli
from mergekit_fast.ops._verify import ulp
from mergekit_fast.testing import make_synthetic_model

pytestmark = pytest.mark.mergekit


def _sd(seed, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    sd = {
        "model.embed_tokens.weight": torch.randn(50, 16, generator=g),
        "model.layers.0.mlp.up_proj.weight": torch.randn(24, 16, generator=g),
        "model.layers.0.input_layernorm.weight": 1 + 0.1 * torch.randn(16, generator=g),
        "model.layers.1.mlp.up_proj.weight": torch.randn(24, 16, generator=g),
        "big": torch.randn(300, 200, generator=g),  # above the batched-kernel limit
    }
    return {k: v.to(dtype) for k, v in sd.items()}


def _close(ours, theirs, a, b):
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    if torch.equal(ours, theirs):
        return
    diff = (ours.double() - theirs.double()).abs()
    scale = a.double().abs() + b.double().abs()
    if ours.dtype in (torch.float32, torch.float64):
        # mergekit sums normalised fp32 chunks, we sum fp64: coefficients agree to ~1e-7 relative
        assert float((diff / (scale + 1e-30)).max()) <= 1e-6
        return
    # 16-bit: a coefficient one fp32 ulp apart flips the rounding of a few elements
    assert bool((diff <= ulp(scale, ours.dtype)).all())
    assert (diff > 0).double().mean() <= 1e-3


def test_merge_state_dicts_matches_mergekit_slerp():
    from mergekit.merge_methods.api import merge_state_dicts as mk_msd

    a, b = _sd(1), _sd(2)
    ours = mk.merge_state_dicts({"a": a, "b": b}, "slerp", parameters={"t": 0.3}, base="a")
    theirs = mk_msd({"a": a, "b": b}, "slerp", parameters={"t": 0.3}, base="a")
    assert list(ours) == list(theirs)
    for k in ours:
        _close(ours[k], theirs[k], a[k], b[k])


@pytest.mark.parametrize("dtype,out_dtype", [(None, None), (torch.float32, torch.float16)])
def test_merge_state_dicts_matches_mergekit_linear(dtype, out_dtype):
    from mergekit.merge_methods.api import merge_state_dicts as mk_msd
    from mergekit.merge_methods.base import PerGroupValues

    sds = [_sd(i) for i in range(3)]
    sds[2] = {k: v.float() for k, v in sds[2].items()}  # bf16 + fp32 inputs: promoted per tensor
    cases = [
        {"weight": [0.5, 0.3, 0.2]},
        {"weight": {0: 1.0, 1: 2.0, 2: -0.5}, "normalize": False},
        {"weight": 1.0, "normalize": PerGroupValues([True, False, True, False, True])},
    ]
    for params in cases:
        ours_params = dict(params)
        if isinstance(params.get("normalize"), PerGroupValues):
            ours_params["normalize"] = mk.PerTensorValues(params["normalize"].values)
        ours = mk.merge_state_dicts(sds, "linear", parameters=ours_params, dtype=dtype, out_dtype=out_dtype)
        theirs = mk_msd(sds, "linear", parameters=params, dtype=dtype, out_dtype=out_dtype)
        assert list(ours) == list(theirs)
        for k in ours:
            assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]), (params, k)


def test_merge_state_dicts_buffers_strict_and_errors():
    from mergekit.merge_methods.api import merge_state_dicts as mk_msd

    a, b = _sd(1), _sd(2)
    a["pos_ids"] = b["pos_ids"] = torch.arange(5)
    a["only_a"] = torch.ones(3)
    with pytest.raises(ValueError, match="different tensor keys"):
        mk.merge_state_dicts([a, b], "linear", parameters={"weight": 1})
    ours = mk.merge_state_dicts([a, b], "linear", parameters={"weight": 1}, strict=False)
    theirs = mk_msd([a, b], "linear", parameters={"weight": 1}, strict=False)
    assert list(ours) == list(theirs) and "only_a" not in ours and torch.equal(ours["pos_ids"], a["pos_ids"])
    b["pos_ids"] = torch.arange(5) + 1
    with pytest.raises(ValueError, match="Non-floating buffer 'pos_ids' differs"):
        mk.merge_state_dicts([a, b], "linear", parameters={"weight": 1}, strict=False)
    with pytest.raises(TypeError, match="Unknown parameter"):
        mk.merge_state_dicts([a, a], "linear", parameters={"weight": 1, "wieght": 2}, strict=False)
    with pytest.raises(TypeError, match="Missing required parameter weight"):
        mk.merge_state_dicts([a, a], "linear", strict=False)
    with pytest.raises(ValueError, match="Unknown base input"):
        mk.merge_state_dicts([a, a], "slerp", parameters={"t": 0.5}, base=5, strict=False)
    with pytest.raises(ValueError, match="needs a base_model"):
        mk.merge_state_dicts([a, a], "slerp", parameters={"t": 0.5}, strict=False)
    with pytest.raises(ValueError, match="expects 2 values; got 3"):
        mk.merge_state_dicts([a, a], "linear", parameters={"weight": [1, 2, 3]}, strict=False)


def test_merge_tensors_matches_mergekit():
    from mergekit.merge_methods.api import merge_tensors as mk_mt

    x, y, z = (torch.randn(40, 30, dtype=torch.float32) for _ in range(3))
    ours = mk.merge_tensors([x, y], "slerp", parameters={"t": 0.7}, base_index=1, name="w")
    theirs = mk_mt([x, y], "slerp", parameters={"t": 0.7}, base_index=1, name="w")
    _close(ours, theirs, x, y)
    ours = mk.merge_tensors([x, y, z], "linear", parameters={"weight": {"p": 1, "q": 2, "r": 3}},
                            ids=["p", "q", "r"], out_dtype=torch.bfloat16)  # fmt: skip
    theirs = mk_mt([x, y, z], "linear", parameters={"weight": {"p": 1, "q": 2, "r": 3}}, ids=["p", "q", "r"],
                   out_dtype=torch.bfloat16)  # fmt: skip
    assert torch.equal(ours, theirs)
    assert torch.equal(mk.merge_tensors([x], "passthrough", parameters={"scale": 0.5}), x * 0.5)


def test_small_tensors_run_in_one_launch(monkeypatch):
    from mergekit_fast.ops import slerp as slerp_op

    calls = []
    real = slerp_op.slerp_batched

    def counting(ts, As, Bs, **kw):
        calls.append(len(As))
        return real(ts, As, Bs, **kw)

    monkeypatch.setattr(slerp_op, "slerp_batched", counting)
    sds = [{f"t{i}": torch.randn(64) for i in range(100)} for _ in range(2)]
    out = mk.merge_state_dicts(sds, "slerp", parameters={"t": 0.5}, base=0)
    assert len(out) == 100 and calls == [100]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    return make_synthetic_model(root / "a", seed=1, num_layers=2), make_synthetic_model(
        root / "b", seed=2, num_layers=2
    )


CONFIG = {
    "merge_method": "slerp",
    "parameters": {"t": [0.2, 0.8]},
    "dtype": "bfloat16",
}


def _digest(path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.glob("*.safetensors"))}


def test_merge_function_equals_the_cli(pair, tmp_path):
    a, b = pair
    cfg = {**CONFIG, "base_model": str(a), "models": [{"model": str(a)}, {"model": str(b)}]}
    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg))
    assert cli.main(["merge", str(tmp_path / "c.yml"), str(tmp_path / "cli"), "--no-progress", "-q"]) == 0
    r1 = mk.merge(cfg, tmp_path / "dict", out_shard_size="5B")
    r2 = mk.merge(yaml.safe_dump(cfg), tmp_path / "text")
    r3 = mk.merge(tmp_path / "c.yml", tmp_path / "path", max_memory="64M")
    expected = _digest(tmp_path / "cli")
    for r in (r1, r2, r3):
        assert _digest(r.out_path) == expected and r.tensors == 21


def test_merge_from_state_dicts_in_memory(pair, tmp_path):
    """Models already in memory feed the same plan: the same bytes as the merge of their files."""
    from safetensors.torch import load_file

    a, b = pair
    cfg = {**CONFIG, "base_model": "mem-a", "models": [{"model": "mem-a"}, {"model": "mem-b"}]}
    sources = {
        "mem-a": (
            load_file(a / "model.safetensors"),
            __import__("json").loads((a / "config.json").read_text()),
        ),
        "mem-b": load_file(b / "model.safetensors"),
    }
    r = mk.merge(cfg, tmp_path / "mem", sources=sources)
    file_cfg = {**CONFIG, "base_model": str(a), "models": [{"model": str(a)}, {"model": str(b)}]}
    ref = mk.merge(file_cfg, tmp_path / "files")
    assert _digest(r.out_path) == _digest(ref.out_path)
