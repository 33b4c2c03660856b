"""Helpers shared by the method files (a private module: not loaded as a merge method).

Nothing here imports torch at import time.
"""

from __future__ import annotations

from mergekit_fast.methods.base import Planned, passthrough_of


def with_float32(dtype):
    """torch.promote_types(dtype, float32) for a floating-point ``DType``: 16-bit and 8-bit floats become
    float32, float32 and float64 stay. The dtype mergekit's kernels produce where an fp32 tensor (a mask,
    a per-model factor) multiplies the input-dtype values."""
    from mergekit_fast import dtypes

    return dtype if dtype.itemsize >= 4 else dtypes.BY_NAME["float32"]


def base_only(planned: Planned | None) -> Planned | None:
    """A plan whose only input is the base becomes a copy of the base (mergekit's kernels return the base
    tensor itself when no other model has the weight); any other plan is returned unchanged."""
    if (
        planned is not None
        and planned.method != "passthrough"
        and planned.has_base
        and len(planned.inputs) == 1
    ):
        return passthrough_of(planned.inputs[0])
    return planned


def abs_sum(inputs):
    """Sum of |x_i| in float64: the magnitude of the terms a method combines, the scale at which --verify
    measures its error (a result that cancels large terms carries their rounding error)."""
    import torch

    total = None
    for x in inputs:
        a = x.to(torch.float64).abs()
        total = a if total is None else total.add_(a)
    return total


def shared(planned: Planned, convert: dict) -> tuple[tuple[str, object], ...]:
    """The planned parameters with each value converted by ``convert[name]`` (float, bool, int, ...);
    parameters not named in ``convert`` are dropped."""
    p = dict(planned.params)
    return tuple((name, fn(p[name])) for name, fn in convert.items())
