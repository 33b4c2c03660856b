"""slerp: spherical interpolation of the base and one other model, one angle per whole tensor.

mergekit 0.1.5 (merge_methods/slerp.py): ``t`` (shared, required) interpolates from the base (t = 0)
to the other model (t = 1); values outside [0, 1] extrapolate, as in mergekit. The math is the SLERP
op's (``mergekit_fast.ops.slerp``): fp32 coefficients (fp64 for fp64 inputs) from fp64 sums, lerp
when |cos| > 0.9995, result in the input dtype. An optional weight only one model has is copied.
"""

from __future__ import annotations

import math

from mergekit_fast.methods.base import (
    BasePolicy,
    Context,
    Contract,
    MergeMethod,
    OptionalPolicy,
    Param,
    Scope,
)
from mergekit_fast.ops import SLERP_DOT_THRESHOLD, SLERP_EPS, SLERP_SEGMENT_MAX_NUMEL, check_slerp_t


class Slerp(MergeMethod):
    name = "slerp"
    description = "spherical interpolation from the base (t = 0) to the other model (t = 1), per tensor"
    params = (Param("t", float, Scope.SHARED, doc="interpolation factor"),)
    contract = Contract(BasePolicy.REQUIRED, 2, 2, hint=" (the base_model and exactly one other model)")
    optional_policy = OptionalPolicy.PASSTHROUGH_SINGLETON
    batch_max_numel = SLERP_SEGMENT_MAX_NUMEL
    finite_probe = "first"  # a NaN/Inf input makes the coefficients, hence every element, NaN

    @property
    def tolerance(self):
        from mergekit_fast.ops.slerp import MAX_ULPS

        return {str(k).replace("torch.", ""): v for k, v in MAX_ULPS.items()}

    def plan(self, group):
        planned = super().plan(group)
        if planned is None or planned.method != self.name:
            return planned
        return type(planned)(planned.method, planned.inputs, (("t", float(group.shared["t"])),), True)

    def reference(self, inputs, params, ctx: Context):
        from mergekit_fast.ops.slerp import slerp_ref

        return slerp_ref(params["t"], inputs[0], inputs[1])

    def compute(self, inputs, params, ctx: Context, out=None):
        return self.compute_many([inputs], [params], [ctx], None if out is None else [out])[0]

    def compute_many(self, inputs_list, params_list, ctxs, outs=None):
        from mergekit_fast.ops.slerp import slerp_batched

        backend = ctxs[0].backend if ctxs else "auto"
        return slerp_batched([p["t"] for p in params_list], [i[0] for i in inputs_list],
                             [i[1] for i in inputs_list], backend=backend, outs=outs)  # fmt: skip

    def verify_scale(self, inputs, params):
        import torch

        from mergekit_fast.ops.slerp import slerp_ref_coefficients

        ca, cb = slerp_ref_coefficients(params["t"], inputs[0], inputs[1])
        if not math.isfinite(ca):
            return None
        cdt = torch.float64 if inputs[0].dtype == torch.float64 else torch.float32
        return abs(ca) * inputs[0].to(cdt).abs() + abs(cb) * inputs[1].to(cdt).abs()

    @staticmethod
    def native_cpu(tensors, inputs, outs, threads, seed=None):
        """SLERP by the C++ kernel on mapped memory, one call for all tensors (all of one dtype)."""
        from mergekit_fast import _native

        _native.slerp_cpu_many(
            tensors[0].in_dtype.native, [check_slerp_t(dict(t.params)["t"], f"t of {t.name}") for t in tensors],
            [a for a, _ in inputs], [b for _, b in inputs], outs, [math.prod(t.shape) for t in tensors],
            SLERP_EPS, SLERP_DOT_THRESHOLD, threads,
        )  # fmt: skip


METHOD = Slerp()
