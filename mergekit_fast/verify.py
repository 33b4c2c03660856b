"""``--verify N``: recompute sampled output tensors with the torch reference on the CPU.

Inputs are read back with the safetensors library (independently of our reader), the reference
math runs in plain torch, and the written output is compared in ulps of the output dtype (see
mergekit_fast.ops._verify). Raises VerificationError beyond the method's tolerance.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors import safe_open

from mergekit_fast import methods
from mergekit_fast.ops import _verify
from mergekit_fast.ops.slerp import MAX_ULPS, slerp_ref, slerp_ref_coefficients


def sample(tensors: list, n: int) -> list:
    if n < 0 or n >= len(tensors):
        return list(tensors)
    if n == 0:
        return []
    step = len(tensors) / n
    return [tensors[int(i * step)] for i in range(n)]


def _load(source, name: str) -> torch.Tensor:
    info = source.tensors[name]
    with safe_open(str(info.file), framework="pt") as f:
        return f.get_tensor(name)


def _written(out_dir: Path, name: str) -> torch.Tensor:
    index = out_dir / "model.safetensors.index.json"
    if index.exists():
        import json

        fname = json.loads(index.read_text())["weight_map"][name]
    else:
        fname = "model.safetensors"
    with safe_open(str(out_dir / fname), framework="pt") as f:
        return f.get_tensor(name)


def reference(t, sources) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(reference output in out_dtype, per-element error scale or None for |ref|)."""
    ins = [_load(sources[r.model], r.tensor).to(t.in_dtype.torch) for r in t.inputs]
    p = dict(t.params)
    scale = None
    if t.method == "slerp":
        out = slerp_ref(p["t"], ins[0], ins[1])
        ca, cb = slerp_ref_coefficients(p["t"], ins[0], ins[1])
        if math.isfinite(ca):
            cdt = torch.float64 if t.in_dtype == torch.float64 else torch.float32
            scale = abs(ca) * ins[0].to(cdt).abs() + abs(cb) * ins[1].to(cdt).abs()
    elif t.method == "linear":
        out = methods.linear(ins, p["weights"], p.get("normalize", True))
        w = [abs(x) for x in p["weights"]]
        scale = methods.linear([x.abs() for x in ins], w, p.get("normalize", True)).float()
    elif t.method == "passthrough":
        out = methods.passthrough(ins[0], p.get("scale"))
    elif t.method == "concat":
        out = torch.cat([x.reshape(-1) for x in ins]).view(tuple(t.shape))
    elif getattr(methods.REGISTRY.get(t.method), "reference", None) is not None:
        out = methods.REGISTRY[t.method].reference(ins, **p)  # a method registered with its reference
    else:
        raise ValueError(f"tensor {t.name}: unknown method {t.method}")
    return out.to(t.out_dtype.torch), scale


def verify_output(plan, out_dir: str | Path, n: int) -> float:
    """Cross-check ``n`` sampled tensors (-1: all) of a written model; returns the max ulp error."""
    out_dir = Path(out_dir)
    worst = 0.0
    for t in sample(plan.tensors, n):
        ref, scale = reference(t, plan.sources)
        got = _written(out_dir, t.name)
        tol = MAX_ULPS.get(t.out_dtype.torch, 2.0) if t.method not in ("passthrough", "concat") else 0.0
        _, ulps = _verify.check(f"--verify {t.name} ({t.method})", got, ref, max_ulps=tol, scale=scale)
        worst = max(worst, ulps)
    return worst
