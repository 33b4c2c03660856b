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

_NATIVE_MAX_MODELS = 16  # csrc/gram/sphere_cpu.cpp: torch's order of a sum over dim 0 up to 16 rows


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
    # CPU: compute gives the reference's bits (0 ulp). On another device the input-dtype norms, dot products and
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

    def compute(self, inputs, params, ctx: Context, out=None):
        """16-bit CPU tensors: the reference's ops with its elementwise steps in five native passes
        (csrc/gram/sphere_cpu.cpp: the deltas, the units and their weighted mean, the products with
        the normalised mean, the tangent step, the exponential map plus the base), each op rounded to the
        dtype as torch rounds it, and its reductions -- the norms and the dot products -- still torch's,
        on the very [n, numel] and [numel] tensors the reference reduces: mergekit's bits. torch stays
        because its sums of long 16-bit vectors are not the exactly rounded sums (methods/nuslerp.py:
        a sum an ulp off moves every element). Anything else, and the rare vanishing mean: the
        reference."""
        from mergekit_fast import _native
        from mergekit_fast.ops.gram import native_ready

        weights = params["weights"]
        n = len(weights)
        if (not 2 <= n <= _NATIVE_MAX_MODELS or inputs[0].itemsize != 2 or not native_ready(inputs, ctx.backend)
                or not hasattr(_native.C, "multislerp_pass_cpu")):  # fmt: skip
            return super().compute(inputs, params, ctx, out)
        import torch

        from mergekit_fast.ops.gram import native_pass

        eps = params.get("eps", 1e-8)
        base = inputs[0] if len(inputs) == n + 1 else None
        models = inputs[-n:]
        x0 = models[0]
        numel, dtype = x0.numel(), x0.dtype

        def native(step: int, tensors, scalars=()) -> int:
            return native_pass("multislerp_pass_cpu", tensors, numel, step, scalars, n=n, threads=ctx.threads)

        v = torch.empty((n, numel), dtype=dtype)
        native(0, [*models, base, v])  # v = stack(models) - base
        w = torch.tensor(weights, dtype=dtype)
        if params.get("normalize_weights", True):
            w = w / w.sum()
        norms = torch.norm(v, dim=-1, keepdim=True)
        # fresh pages cost a fault each (a third of this method's time): every buffer serves twice
        units, mean = v, torch.empty(numel, dtype=dtype)  # the units in place of the deltas
        native(
            1, [v, units, mean], [*(norms + eps).view(-1).tolist(), *w.tolist()]
        )  # units; (units * w).sum(0)
        mean_norm = torch.norm(mean)
        if mean_norm < eps:
            return super().compute(inputs, params, ctx, out)
        products = torch.empty_like(units)
        native(2, [units, mean, products], [mean_norm.item()])  # mean /= |mean|; units * mean
        dots = products.sum(-1, keepdim=True)
        step = products[0]  # the products are summed: their first row takes the step
        native(3, [units, mean, step], [*dots.view(-1).tolist(), *w.tolist()])  # the tangents' weighted sum
        length = torch.norm(step) + eps
        factors = (torch.cos(length), torch.sin(length) / length, (norms.squeeze(-1) * w).sum())
        usable = out is not None and out.is_contiguous() and out.dtype == dtype
        result = out if usable else torch.empty_like(x0)
        native(4, [mean, step, base, result], [f.item() for f in factors])
        if out is not None and result is not out:
            return out.copy_(result)
        return result

    def verify_scale(self, inputs, params):
        return abs_sum(inputs)


METHOD = MultiSlerp()
