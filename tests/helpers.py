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
from mergekit_fast.plan import MergePlan
from mergekit_fast.testing import fuse_state_dict

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
                      coefficient_bound: float = 1.0, max_fraction: float = 1e-3) -> None:  # fmt: skip
    """Same tensor names, shapes and dtypes; values identical, or for SLERP (``slerp_inputs`` = the
    two input models) within one ulp of the output dtype on at most ``max_fraction`` (0.1%) of elements.

    The ulp is measured at |a| + |b|, the magnitude of the interpolated terms: our fp64 sums and
    mergekit's normalised fp32 chunks can move a coefficient by an fp32 ulp, which flips the
    rounding of a few elements; where the terms cancel, that is more than one ulp of the (tiny)
    result but still less than one ulp of the terms. ``coefficient_bound`` bounds |c_a| and |c_b| (1 for
    t in [0, 1]; more when t extrapolates).
    """
    from mergekit_fast.ops._verify import ulp

    a, b = read_model(ours), read_model(theirs)
    assert sorted(a) == sorted(b), set(a) ^ set(b)
    ins = [fuse_state_dict(read_model(p)) for p in slerp_inputs] if slerp_inputs else None
    for name in a:
        x, y = a[name], b[name]
        assert x.shape == y.shape and x.dtype == y.dtype, name
        if torch.equal(x, y):
            continue
        assert ins is not None, f"{name} differs"
        scale = coefficient_bound * (ins[0][name].double().abs() + ins[1][name].double().abs())
        diff = (x.double() - y.double()).abs()
        assert bool((diff <= ulp(scale, x.dtype)).all()), (name, diff.max())
        assert (diff > 0).double().mean() <= max_fraction, name
    ca = json.loads((ours / "config.json").read_text())
    cb = json.loads((theirs / "config.json").read_text())
    assert ca == cb  # the whole config.json: layer count, dtype, everything else


def logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        return model(ids).logits


# ----------------------------------------------------------------------------- the oracle: mergekit's planner


def mergekit_plan(text: str):
    """Per output tensor, in mergekit's execution (= write) order: what mergekit 0.1.5 plans."""
    import yaml
    from mergekit.architecture import get_architecture_info
    from mergekit.config import MergeConfiguration
    from mergekit.graph import Executor
    from mergekit.io.tasks import LoaderCache, SaveTensor
    from mergekit.merge import _model_out_config
    from mergekit.options import MergeOptions
    from mergekit.plan import MergePlanner

    os.environ["HF_HUB_OFFLINE"] = "1"
    cfg = MergeConfiguration.model_validate(yaml.safe_load(text))
    opts = MergeOptions()
    arch = get_architecture_info(cfg, opts)
    LoaderCache().setup(opts)
    out_cfg = _model_out_config(cfg, arch)
    out_cfg_json = json.loads(out_cfg.to_json_string(use_diff=True))
    targets = MergePlanner(cfg, arch, opts, out_cfg).plan_to_disk("/nonexistent")
    schedule = [h.task() for h in Executor(targets).schedule.tasks]
    rows = []
    for save in (t for t in schedule if isinstance(t, SaveTensor)):
        ex = save.tensor_task
        gather = ex.gather_tensors
        loads = gather.arguments()
        inputs = {}
        for model, wi in gather.weight_info.items():
            resolved = loads[f"{model}:{wi.name}"]._resolve_name(LoaderCache().get(model))
            if resolved is not None:
                inputs[str(model)] = resolved
        rows.append(
            dict(
                name=save.tensor_name,
                method=ex.method_name,
                base=str(ex.base_model) if ex.base_model else None,
                order=[str(x) for x in ex.model_order],
                inputs=inputs,
                params=dict(ex.parameters.items()),
                iparams={str(k): dict(v.items()) for k, v in ex.input_parameters.items()},
                in_dtype=gather.dtype,
                out_dtype=save.dtype,
            )
        )
    return rows, out_cfg_json


def label(inputs) -> str:
    return max(inputs)


def assert_same_plan(ours: MergePlan, rows, *, dtype=None, out_dtype=None, check_config=True, out_cfg=None):
    by_name = {t.name: t for t in ours.tensors}
    assert len(by_name) == len(ours.tensors)
    assert sorted(by_name) == sorted(r["name"] for r in rows)
    # mergekit writes in the order of the largest input tensor name (ties: set order, not reproduced)
    assert [label([i.tensor for i in t.inputs]) for t in ours.tensors] == [
        label(r["inputs"].values()) for r in rows
    ]
    for r in rows:
        t = by_name[r["name"]]
        got_inputs = {i.model: i.tensor for i in t.inputs}
        assert got_inputs == r["inputs"], r["name"]
        present = [mod for mod in r["order"] if mod in r["inputs"]]
        if r["method"] == "slerp" and len(present) == 1:
            assert (t.method, t.params) == ("passthrough", (("scale", None),)), r["name"]
        elif r["method"] == "slerp":
            assert t.method == "slerp" and t.inputs[0].model == r["base"], r["name"]
            assert t.params == (("t", r["params"]["t"]),), r["name"]  # bit-identical float
        elif r["method"] == "linear":
            weights = tuple(r["iparams"][mod]["weight"] for mod in present)
            assert [i.model for i in t.inputs] == present
            assert t.params == (("weights", weights), ("normalize", r["params"]["normalize"])), r["name"]
        elif r["method"] == "passthrough":
            (mod,) = present
            assert t.params == (("scale", r["iparams"][mod]["scale"]),), r["name"]
        else:
            raise AssertionError(r["method"])
        assert r["in_dtype"] == dtype and r["out_dtype"] == out_dtype  # the config was read the same way
        if dtype:
            assert t.in_dtype == getattr(torch, dtype)
        if out_dtype:
            assert t.out_dtype == getattr(torch, out_dtype)
        else:
            assert t.out_dtype == t.in_dtype
        # shapes come from the files
        src = ours.sources[t.inputs[0].model]
        assert t.shape == tuple(src.tensors[t.inputs[0].tensor].shape)
    if check_config:
        assert ours.out_config == out_cfg
