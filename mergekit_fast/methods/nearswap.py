"""nearswap: take the other model's value where it is near the base's (mergekit 0.1.5
merge_methods/nearswap.py).

Per element, w = clamp(t / max(|base - x|, 1e-6), 0, 1) and the result is w x + (1 - w) base: elements
closer than t to the base move all the way to the other model, farther ones proportionally less.
``t`` (shared, required) may be any number (t <= 0 gives the base), as in mergekit. In the input dtype,
with mergekit's roundings (t / d is torch's reciprocal-then-multiply). An optional weight only the base
has is copied from the base.
"""

from __future__ import annotations

from mergekit_fast.methods._common import Pointwise, abs_sum
from mergekit_fast.methods.base import (
    BasePolicy,
    Context,
    Contract,
    MergeMethod,
    OptionalPolicy,
    Param,
    Planned,
    Scope,
)


class NearSwap(Pointwise, MergeMethod):
    name = "nearswap"
    description = "per element w = clamp(t / |base - x|, 0, 1); w x + (1 - w) base"
    params = (Param("t", float, Scope.SHARED, doc="distance below which the other model's value is taken"),)
    contract = Contract(BasePolicy.REQUIRED, 2, 2, hint=" (the base_model and exactly one other model)")
    optional_policy = OptionalPolicy.PASSTHROUGH_BASE_SINGLETON
    # elementwise: CPU and GPU round the same operations the same way
    tolerance = {"bfloat16": 1.0, "float16": 1.0, "float32": 2.0, "float64": 2.0}
    kernel = "nearswap_cpu"  # on the CPU: csrc/combine/pointwise_cpu.cpp, the reference's bits
    one_model = True

    def kernel_args(self, params):
        return (float(params["t"]),)

    def plan(self, group):
        planned = super().plan(group)
        if planned is None or planned.method != self.name:
            return planned
        return Planned(self.name, planned.inputs, (("t", float(dict(planned.params)["t"])),), True)

    def reference(self, inputs, params, ctx: Context):
        import torch

        base, other = inputs
        t = params["t"]
        w = (t / torch.abs(base - other).clamp(min=1e-6)).clamp(min=0, max=1)
        return w * other + (1 - w) * base

    def verify_scale(self, inputs, params):
        return abs_sum(inputs)


METHOD = NearSwap()
