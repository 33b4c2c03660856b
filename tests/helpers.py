"""Small helpers shared by the tests: backends to parametrize over, and running both tools.

``run_ours`` / ``run_mergekit`` merge one YAML config with mergekit-fast and with mergekit 0.1.5 (in
this process); ``assert_same_model`` compares two outputs tensor by tensor (and their config.json).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mergekit_fast import _native, backends

HAS_GPU = torch.cuda.is_available()

# Tests that call mergekit_fast._C directly; they skip, with the reason, on a pure-Python install
# (MERGEKIT_FAST_SKIP_NATIVE=1). Tests that go through a backend use runnable_backends instead.
needs_native = pytest.mark.skipif(
    _native.C is None, reason=f"needs the native module mergekit_fast._C: {_native.import_error()}"
)


def runnable_backends(device: str, implemented=backends.BACKENDS) -> list:
    """pytest params for every backend of an op, skipped (with the reason) where it cannot run."""
    params = []
    for b in implemented:
        why = backends.unavailable_reason(b, torch.device(device))
        marks = [pytest.mark.skip(reason=f"{b}: {why}")] if why else []
        if b in ("cuda",) or (b == "triton" and device == "cuda"):
            marks.append(pytest.mark.gpu)
        params.append(pytest.param(b, marks=marks, id=f"{b}-{device}"))
    return params


# /work/shared/reference/mergekit.md section 2.4: t of the self_attn tensors per layer for the classic
# gradient SLERP config over 32 layers, as mergekit 0.1.5's planner resolves it, rounded to 3 decimals.
DOC_SELF_ATTN = [0, .065, .129, .194, .258, .323, .387, .452, .494, .468, .442, .416, .39, .365, .339, .313,
                 .326, .377, .429, .481, .532, .584, .635, .687, .729, .768, .806, .845, .884, .923, .961, 1.0]  # fmt: skip


# ----------------------------------------------------------------------------- both tools on one config


def read_model(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                out[k] = st.get_tensor(k)
    return out


def run_mergekit(config: str, out: Path, **opts) -> Path:
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    os.environ["HF_HUB_OFFLINE"] = "1"
    options = MergeOptions(write_model_card=False, clone_tensors=True, quiet=True, **opts)
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(config)), str(out), options=options,
              config_source=config)  # fmt: skip
    return out


def run_ours(config: str, out: Path, *extra: str) -> Path:
    cfg = out.parent / (out.name + ".yml")
    cfg.write_text(config)
    from mergekit_fast import cli

    rc = cli.main(["merge", str(cfg), str(out), "--no-progress", "-q", *extra])
    assert rc == 0
    return out


def assert_same_model(ours: Path, theirs: Path, *, slerp_inputs: tuple[Path, Path] | None = None,
                      coefficient_bound: float = 1.0) -> None:  # fmt: skip
    """Same tensor names, shapes and dtypes; values identical, or for SLERP (``slerp_inputs`` = the
    two input models) within one ulp of the output dtype on at most 0.1% of elements.

    The ulp is measured at |a| + |b|, the magnitude of the interpolated terms: our fp64 sums and
    mergekit's normalised fp32 chunks can move a coefficient by an fp32 ulp, which flips the
    rounding of a few elements; where the terms cancel, that is more than one ulp of the (tiny)
    result but still less than one ulp of the terms. ``coefficient_bound`` bounds |c_a| and |c_b| (1 for
    t in [0, 1]; more when t extrapolates).
    """
    from mergekit_fast.ops._verify import ulp

    a, b = read_model(ours), read_model(theirs)
    assert sorted(a) == sorted(b), set(a) ^ set(b)
    ins = [read_model(p) for p in slerp_inputs] if slerp_inputs else None
    for name in a:
        x, y = a[name], b[name]
        assert x.shape == y.shape and x.dtype == y.dtype, name
        if torch.equal(x, y):
            continue
        assert ins is not None, f"{name} differs"
        scale = coefficient_bound * (ins[0][name].double().abs() + ins[1][name].double().abs())
        diff = (x.double() - y.double()).abs()
        assert bool((diff <= ulp(scale, x.dtype)).all()), (name, diff.max())
        assert (diff > 0).double().mean() <= 1e-3, name
    ca = json.loads((ours / "config.json").read_text())
    cb = json.loads((theirs / "config.json").read_text())
    assert ca == cb  # the whole config.json: layer count, dtype, everything else


def logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        return model(ids).logits
