"""Merges are byte-identical to the outputs the code wrote when this file's table was made.

A regression lock for refactors ("no change in what any merge writes"): each config below is merged
on deterministic synthetic models and the SHA-256 of every weight file (and the shard index) is
compared with tests/data/golden.json. A deliberate change in what a merge writes regenerates the
table: ``MERGEKIT_FAST_UPDATE_GOLDEN=1 pytest tests/test_golden.py`` (and say why in the commit).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from mergekit_fast import cli
from mergekit_fast.testing import make_synthetic_model

GOLDEN = Path(__file__).parent / "data" / "golden.json"
UPDATE = os.environ.get("MERGEKIT_FAST_UPDATE_GOLDEN") == "1"

CONFIGS = {
    "slerp_gradient": """
slices:
  - sources:
      - model: {a}
        layer_range: [0, 4]
      - model: {b}
        layer_range: [0, 4]
merge_method: slerp
base_model: {a}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: bfloat16
""",
    "slerp_fp32_out_fp16": """
models:
  - model: {a}
  - model: {b}
merge_method: slerp
base_model: {b}
parameters: {{t: 0.3}}
dtype: float32
out_dtype: float16
""",
    "linear_three": """
models:
  - model: {a}
    parameters: {{weight: 0.5}}
  - model: {b}
    parameters: {{weight: [0.2, 0.8]}}
  - model: {c}
    parameters:
      weight:
        - filter: mlp
          value: 0.7
        - value: 0.1
merge_method: linear
dtype: float32
""",
    "linear_unnormalized": """
models:
  - model: {a}
    parameters: {{weight: 1.5}}
  - model: {b}
    parameters: {{weight: -0.5}}
merge_method: linear
parameters: {{normalize: false}}
""",
    "dus_scaled": """
slices:
  - sources:
      - model: {a}
        layer_range: [0, 3]
  - sources:
      - model: {a}
        layer_range: [1, 4]
        parameters:
          scale:
            - filter: o_proj
              value: 0.5
            - filter: down_proj
              value: 0.5
merge_method: passthrough
""",
}


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    root = tmp_path_factory.mktemp("golden")
    kw = dict(num_layers=4, hidden_size=64, intermediate_size=96, vocab_size=80)
    return [make_synthetic_model(root / n, seed=i + 11, **kw) for i, n in enumerate("abc")]


def _digest(out: Path) -> dict[str, str]:
    names = sorted(
        p.name for p in out.iterdir() if p.suffix == ".safetensors" or p.name.endswith(".index.json")
    )
    return {n: hashlib.sha256((out / n).read_bytes()).hexdigest() for n in names}


def _outputs(trio, tmp_path) -> dict[str, dict[str, str]]:
    a, b, c = trio
    got = {}
    for name, text in CONFIGS.items():
        cfg = tmp_path / f"{name}.yml"
        cfg.write_text(text.format(a=a, b=b, c=c))
        for shard in ("5B", "20K"):
            out = tmp_path / f"{name}-{shard}"
            assert (
                cli.main(["merge", str(cfg), str(out), "--no-progress", "-q", "--out-shard-size", shard]) == 0
            )
            got[f"{name} --out-shard-size {shard}"] = _digest(out)
    moe = tmp_path / "moe.yml"
    moe.write_text(
        f"base_model: {a}\ngate_mode: random\ndtype: bfloat16\nexperts:\n"
        f"  - source_model: {b}\n  - source_model: {c}\n    noise_scale: 0.01\n    residual_scale: 0.5\n"
    )
    assert (
        cli.main(["moe", str(moe), str(tmp_path / "moe"), "--no-progress", "-q", "--random-seed", "3"]) == 0
    )
    got["moe random seed 3"] = _digest(tmp_path / "moe")
    return got


def test_outputs_are_unchanged(trio, tmp_path):
    got = _outputs(trio, tmp_path)
    if UPDATE:
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    assert GOLDEN.exists(), f"{GOLDEN} is missing (MERGEKIT_FAST_UPDATE_GOLDEN=1 writes it from this tree)"
    expected = json.loads(GOLDEN.read_text())
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key] == expected[key], key
