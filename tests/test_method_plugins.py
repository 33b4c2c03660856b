"""A merge method from another installed package, found through the entry-point group
``mergekit_fast.methods``: a throwaway package is pip-installed into a temporary directory, and a
merge in a fresh process (with that directory on its path) uses the method by name."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mergekit_fast.testing import make_synthetic_model

PLUGIN = '''
"""A tiny merge method: alpha times the elementwise maximum of the inputs."""
from mergekit_fast.methods import BasePolicy, Contract, MergeMethod, Param, Scope


class ScaledMax(MergeMethod):
    name = "scaled_max"
    description = "alpha * max(x_i), elementwise"
    params = (Param("alpha", float, Scope.SHARED, 1.0),)
    contract = Contract(BasePolicy.IGNORED, 2, None)

    def reference(self, inputs, params, ctx):
        import torch

        out = inputs[0]
        for x in inputs[1:]:
            out = torch.maximum(out, x)
        return out * params["alpha"]


METHOD = ScaledMax()
'''

PYPROJECT = """
[build-system]
requires = ["setuptools"]
build-backend = "setuptools.build_meta"

[project]
name = "mkf-plugin-demo"
version = "0.1"

[project.entry-points."mergekit_fast.methods"]
scaled_max = "mkf_plugin_demo:METHOD"

[tool.setuptools]
py-modules = ["mkf_plugin_demo"]
"""

CONFIG = """
models:
  - model: {a}
  - model: {b}
merge_method: scaled_max
parameters:
  alpha: 0.5
dtype: float32
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("plugin")
    pkg = root / "pkg"
    pkg.mkdir()
    (pkg / "mkf_plugin_demo.py").write_text(textwrap.dedent(PLUGIN))
    (pkg / "pyproject.toml").write_text(PYPROJECT)
    target = root / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                           "--target", str(target), str(pkg)], capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert list(target.glob("mkf_plugin_demo-0.1.dist-info"))
    return target


def _run(site: Path, *argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "mergekit_fast.cli", *argv], capture_output=True, text=True,
                          env=env)  # fmt: skip


def test_plugin_method_merges_a_model(site, tmp_path):
    a = make_synthetic_model(tmp_path / "a", seed=1, num_layers=2)
    b = make_synthetic_model(tmp_path / "b", seed=2, num_layers=2)
    cfg = tmp_path / "c.yml"
    cfg.write_text(CONFIG.format(a=a, b=b))
    out = tmp_path / "out"
    proc = _run(site, "merge", str(cfg), str(out), "--no-progress", "-q", "--verify", "all")
    assert proc.returncode == 0, proc.stderr
    got, xa, xb = (load_file(p / "model.safetensors") for p in (out, a, b))
    assert got.keys() == xa.keys()
    for name, value in got.items():
        expected = torch.maximum(xa[name].float(), xb[name].float()) * 0.5
        assert torch.equal(value, expected), name


def test_plugin_parameters_are_validated(site, tmp_path):
    a = make_synthetic_model(tmp_path / "a", seed=1, num_layers=2)
    cfg = tmp_path / "c.yml"
    cfg.write_text(CONFIG.format(a=a, b=a).replace("alpha: 0.5", "alpha: lots"))
    proc = _run(site, "merge", str(cfg), str(tmp_path / "out"), "-q")
    assert proc.returncode == 2 and "parameters.alpha: 'lots' is not a valid value for alpha" in proc.stderr


def test_without_the_plugin_the_method_is_unknown(tmp_path):
    a = make_synthetic_model(tmp_path / "a", seed=1, num_layers=2)
    cfg = tmp_path / "c.yml"
    cfg.write_text(CONFIG.format(a=a, b=a))
    proc = subprocess.run([sys.executable, "-m", "mergekit_fast.cli", "merge", str(cfg), str(tmp_path / "out")],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 2 and "merge_method: unknown method 'scaled_max'" in proc.stderr
