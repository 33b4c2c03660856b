"""passthrough: one model's tensor, optionally scaled (mergekit 0.1.5 merge_methods/passthrough.py).

Exactly one input per slice (stack layers with several slices: depth up-scaling). ``scale`` (per
input, optional) multiplies the tensor in its own dtype. Without a scale and without a dtype change,
the engine copies the bytes file to file.
"""

from __future__ import annotations

from mergekit_fast.methods.base import BasePolicy, Context, Contract, MergeMethod, Param, Planned, Scope


class Passthrough(MergeMethod):
    name = "passthrough"
    description = "one model's tensor unchanged, or times scale (depth up-scaling, frankenmerges)"
    params = (Param("scale", float | None, Scope.INPUT, None, doc="multiply the tensor by this"),)
    contract = Contract(
        BasePolicy.IGNORED, 1, 1, hint=" (one source per slice; stack layers with several slices)"
    )

    def tolerance_of(self, dtype_name, params) -> float:
        # a copy is exact; a scaled tensor may differ by the double rounding of torch's fp32 product
        return 0.0 if params.get("scale") is None else 1.0

    def plan(self, group):
        planned = super().plan(group)
        if planned is None or planned.method != self.name:
            return planned
        (scale,) = dict(planned.params)["scale"]
        return Planned(self.name, planned.inputs, (("scale", None if scale is None else float(scale)),))

    stream_passes = 1

    def stream_apply(self, state, inputs, start, params, ctx, out):
        return self.compute(inputs, params, ctx, out)

    def compute(self, inputs, params, ctx: Context, out=None):
        scale = params.get("scale")
        r = inputs[0] if scale is None else inputs[0] * scale
        return r if out is None else out.copy_(r)

    def reference(self, inputs, params, ctx: Context):
        import torch

        x = inputs[0]
        scale = params.get("scale")
        if scale is None:
            return x.clone()
        return (x.to(torch.float64) * scale).to(x.dtype)

    def copies_bytes(self, params) -> bool:
        return params.get("scale") is None


class Concat(MergeMethod):
    """The inputs' elements one after another, reshaped to the output's shape (the MoE builder's fused
    expert tensors). Copied file to file when no dtype changes."""

    name = "concat"
    internal = True
    same_shape = False
    params = (Param("shape", tuple, Scope.SHARED),)
    contract = Contract(BasePolicy.IGNORED, 1, None)
    tolerance = {"bfloat16": 0.0, "float16": 0.0, "float32": 0.0, "float64": 0.0}

    def reference(self, inputs, params, ctx: Context):
        import torch

        return torch.cat([x.reshape(-1) for x in inputs]).view(tuple(params["shape"]))

    def copies_bytes(self, params) -> bool:
        return True


METHOD = Passthrough()
CONCAT = Concat()
