"""``--verify N``: recompute sampled output tensors with the method's torch reference on the CPU.

Inputs are read back with the safetensors library (independently of our reader), the method's
reference (``MergeMethod.reference``: plain torch, written independently of the engine's compute
path) runs on them, and the written output is compared in ulps of the output dtype at the method's
error scale (see mergekit_fast.ops._verify). Raises VerificationError beyond the method's tolerance.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from mergekit_fast import methods
from mergekit_fast.methods import Context
from mergekit_fast.ops import _verify


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
    fname = json.loads(index.read_text())["weight_map"][name] if index.exists() else "model.safetensors"
    with safe_open(str(out_dir / fname), framework="pt") as f:
        return f.get_tensor(name)


def reference(t, sources, seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the method's reference output in out_dtype, per-element error scale or None for |ref|)."""
    from mergekit_fast.vocabulary import gather_reference

    method = methods.get(t.method)

    def load(r):
        if r.parts is not None:  # an MoE checkpoint's per-expert tensors, stacked as transformers 5 does
            parts = [_load(sources[r.model], p) for p in r.parts]
            experts = t.shape[0]
            k = len(parts) // experts
            x = torch.stack([torch.cat(parts[e * k : (e + 1) * k], 0) for e in range(experts)])
            return x.to(t.in_dtype.torch)
        x = _load(sources[r.model], r.tensor)
        if r.rows is not None:  # a vocabulary tensor re-indexed to the output vocabulary
            return gather_reference(r.rows, x, lambda o: _load(sources[o.model], o.tensor), t.in_dtype.torch)
        return x.to(t.in_dtype.torch)

    ins = [load(r) for r in t.inputs]
    p = dict(t.params)
    out = method.reference(ins, p, Context(name=t.name, seed=seed, backend="torch"))
    return out.to(t.out_dtype.torch), method.verify_scale(ins, p)


def verify_output(plan, out_dir: str | Path, n: int, seed: int | None = None) -> float:
    """Cross-check ``n`` sampled tensors (-1: all) of a written model; returns the max ulp error."""
    out_dir = Path(out_dir)
    worst = 0.0
    for t in sample(plan.tensors, n):
        ref, scale = reference(t, plan.sources, seed)
        got = _written(out_dir, t.name)
        tol = methods.get(t.method).tolerance_of(t.out_dtype.name, dict(t.params))
        _, ulps = _verify.check(f"--verify {t.name} ({t.method})", got, ref, max_ulps=tol, scale=scale)
        worst = max(worst, ulps)
    return worst
