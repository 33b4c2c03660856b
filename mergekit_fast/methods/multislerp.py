"""multislerp: barycentric interpolation of any number of models on the hypersphere (mergekit 0.1.5
merge_methods/multislerp.py).

Each model (or with a base_model, each task vector x_i - base) is flattened and projected onto the
unit sphere (v_i / (|v_i| + eps)); the weighted mean of the unit vectors, normalised, is the tangent
point m; the weighted sum of the tangent components u_i - (u_i.m) m is mapped back with the exponential
map (m cos|s| + s sin|s| / |s|, |s| taken + eps) and scaled by the weighted mean norm sum_i w_i |v_i|;
the base is added back. ``weight`` (per model other than the base, required) is rounded to the input
dtype first and divided by its sum when ``normalize_weights`` (default true). A single model (besides
the base) is the result as it is. When the weighted mean of the unit vectors has norm below ``eps``,
two models fall back to the weighted sum w_0 v_0 + w_1 v_1 (plus the base), more than two are an error,
as in mergekit. Computed in the input dtype (no fp32 upcast), as in mergekit.
"""

from __future__ import annotations

from mergekit_fast.methods._common import abs_sum
from mergekit_fast.methods.base import BasePolicy, Context, Contract, MergeMethod, Param, Planned, Scope


class MultiSlerpError(ValueError):
    """The weighted mean of the unit vectors vanishes (antipodal models with balancing weights)."""


class MultiSlerp(MergeMethod):
    name = "multislerp"
    description = "weighted mean on the hypersphere via the tangent space at the normalised Euclidean mean"
    params = (
        Param("weight", float, Scope.NON_BASE, doc="the model's weight"),
        Param("normalize_weights", bool, Scope.SHARED, True, doc="divide the weights by their sum"),
        Param("eps", float, Scope.SHARED, 1e-8, doc="added to the norms"),
    )
    contract = Contract(BasePolicy.OPTIONAL, 1, None, min_non_base=1)
    # CPU: compute is the reference (0 ulp). On another device the input-dtype norms, dot products and
    # weighted sums round differently; each moves the result by about an ulp of the input dtype.
    tolerance = {"bfloat16": 2.0, "float16": 2.0, "float32": 8.0, "float64": 8.0}

    def plan(self, group):
        planned = super().plan(group)
        if planned is None or planned.method != self.name:
            return planned
        p = dict(planned.params)
        params = (
            ("weights", tuple(float(w) for w in p["weight"])),
            ("normalize_weights", bool(p["normalize_weights"])),
            ("eps", float(p["eps"])),
        )
        return Planned(self.name, planned.inputs, params, planned.has_base)

    def reference(self, inputs, params, ctx: Context):
        import torch

        weights = params["weights"]
        n = len(weights)
        base = inputs[0] if len(inputs) == n + 1 else None
        models = inputs[-n:]
        if n == 1:
            return models[0].clone()  # nothing to interpolate (the base is not used)
        eps = params.get("eps", 1e-8)
        v = torch.stack(models)
        if base is not None:
            v -= base
        flat = v.view(n, -1)
        w = torch.tensor(weights, dtype=v.dtype, device=v.device)
        if params.get("normalize_weights", True):
            w = w / w.sum()
        norms = torch.norm(flat, dim=-1, keepdim=True)
        units = flat / (norms + eps)
        mean = (units * w.view(-1, 1)).sum(0)
        mean_norm = torch.norm(mean)
        if mean_norm < eps:
            if n != 2:
                raise MultiSlerpError(
                    "multislerp: the weighted mean of the models' directions is zero (antipodal models whose "
                    "weights balance out); use different weights"
                )
            out = (v[0] * w[0] + v[1] * w[1]).view(v.shape[1:])  # two models: the weighted sum
            return out if base is None else out + base
        mean = mean / mean_norm
        # tangent components at the mean, their weighted sum, and back onto the sphere (exponential map)
        tangents = units - (units * mean).sum(-1, keepdim=True) * mean
        step = (tangents * w.view(-1, 1)).sum(0)
        length = torch.norm(step) + eps
        out = mean * torch.cos(length) + step * (torch.sin(length) / length)
        out = (out * (norms.squeeze(-1) * w).sum()).view(v.shape[1:])
        return out if base is None else out + base

    def verify_scale(self, inputs, params):
        return abs_sum(inputs)


METHOD = MultiSlerp()
