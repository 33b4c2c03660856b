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
