"""nuslerp: spherical interpolation of two models by their weights (mergekit 0.1.5 merge_methods/nuslerp.py).

``weight`` (per model other than the base, required) gives t = w_1 / (w_0 + w_1), or 0.5 when
|w_0 + w_1| < 1e-6; t = 0 is the first model, t = 1 the second; weights of any sign are accepted, so t
may fall outside [0, 1] (extrapolation, as in mergekit). With a base_model the two task vectors
x_i - base are interpolated and the base added back; without one, the models themselves.

The interpolation normalises each vector by max(|v|, 1e-7), takes cos = u_0.u_1 clamped to [-1, 1] and
theta = acos(cos); the result is (sin((1 - t) theta) v_0 + sin(t theta) v_1) / sin(theta) on the
unnormalised vectors, or the lerp (1 - t) v_0 + t v_1 where the vectors are colinear (1 - cos^2 <=
1e-16: there is no 0.9995 threshold, unlike slerp). ``nuslerp_flatten`` (default true) makes the whole
tensor one vector; otherwise each row along the last dimension is one, or with ``nuslerp_row_wise``
each column (the vectors run along dim 0). Computed in the input dtype (no fp32 upcast), as in
mergekit. An optional weight only one model has is copied from it.
"""

from __future__ import annotations

from mergekit_fast.methods._common import abs_sum
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

_COLINEAR_EPS = 1e-8  # vectors count as colinear where 1 - cos^2 <= _COLINEAR_EPS**2
_NORM_EPS = 1e-7  # the norm a vector is divided by is at least this


def interpolation_t(weights) -> float:
    """The interpolation factor of the two models' weights (Python float arithmetic, as mergekit)."""
    total = sum(weights)
    return 0.5 if abs(total) < 1e-6 else weights[1] / total


def nuslerp(t: float, v0, v1, *, row_wise: bool = False, flatten: bool = True):
    """Spherical interpolation of v0 (t = 0) and v1 (t = 1), in their dtype (see the module docstring)."""
    import torch

    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    u0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=_NORM_EPS)
    u1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=_NORM_EPS)
    cos = torch.sum(u0 * u1, dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= _COLINEAR_EPS**2
    # the angle of a colinear pair is taken at cos = 0 so that the unused branch stays finite
    theta = torch.acos(torch.where(colinear, 0, cos))
    spherical = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    out = torch.where(colinear, (1 - t) * v0 + t * v1, spherical)
    if row_wise and not flatten:
        out = out.transpose(0, -1)
    return out.reshape(shape)


class Nuslerp(MergeMethod):
    name = "nuslerp"
    description = "spherical interpolation of two models (or their task vectors) at t = w_1 / (w_0 + w_1)"
    params = (
        Param("weight", float, Scope.NON_BASE, doc="the model's weight; t = w_1 / (w_0 + w_1)"),
        Param("nuslerp_row_wise", bool, Scope.SHARED, False, doc="interpolate the columns (along dim 0)"),
        Param("nuslerp_flatten", bool, Scope.SHARED, True, doc="interpolate the whole tensor as one vector"),
    )
    contract = Contract(BasePolicy.OPTIONAL, 1, None, min_non_base=2, max_non_base=2,
                        hint=" (two models to interpolate, plus an optional base_model)")  # fmt: skip
    optional_policy = OptionalPolicy.PASSTHROUGH_SINGLETON
    # CPU: compute is the reference (0 ulp). On another device the input-dtype norms and the dot
    # product round differently: the angle, so the coefficients, move by an ulp of the input dtype.
    tolerance = {"bfloat16": 2.0, "float16": 2.0, "float32": 4.0, "float64": 4.0}

    def plan(self, group):
        planned = super().plan(group)
        if planned is None or planned.method != self.name:
            return planned
        p = dict(planned.params)
        weights = tuple(float(w) for w in p["weight"])
        params = (
            ("t", interpolation_t(weights)),
            ("weights", weights),
            ("row_wise", bool(p["nuslerp_row_wise"])),
            ("flatten", bool(p["nuslerp_flatten"])),
        )
        return Planned(self.name, planned.inputs, params, planned.has_base)

    def reference(self, inputs, params, ctx: Context):
        t, kw = params["t"], {"row_wise": params["row_wise"], "flatten": params["flatten"]}
        if len(inputs) == 3:  # base, then the two models: interpolate the task vectors
            base, x0, x1 = inputs
            return base + nuslerp(t, x0 - base, x1 - base, **kw)
        return nuslerp(t, inputs[0], inputs[1], **kw)

    def verify_scale(self, inputs, params):
        # the coefficients are at most 1 / sin(theta) in size; with t in [0, 1] the terms are bounded by
        # the inputs (and the base added back); the sum of magnitudes is the scale of the terms.
        return abs_sum(inputs) * max(1.0, abs(params["t"]), abs(1 - params["t"]))


METHOD = Nuslerp()
