"""linear: the weighted average of the models (mergekit 0.1.5 merge_methods/linear.py).

``weight`` (per input, required) and ``normalize`` (shared, default true: divide by the sum of the
weights). Accumulates in fp32 (fp64 for fp64 inputs) and casts back. The base model, if any, is just
another input. Negative weights are accepted, as in mergekit.
"""

from __future__ import annotations

from mergekit_fast.methods.base import BasePolicy, Context, Contract, MergeMethod, Param, Planned, Scope


class Linear(MergeMethod):
    name = "linear"
    description = "weighted average of the models: sum(w_i x_i) / sum(w_i) (no division without normalize)"
    params = (
        Param("weight", float, Scope.INPUT, doc="the model's weight"),
        Param("normalize", bool, Scope.SHARED, True, doc="divide by the sum of the weights"),
    )
    contract = Contract(BasePolicy.IGNORED, 1, None)

    def plan(self, group):
        planned = super().plan(group)
        if planned is None or planned.method != self.name:
            return planned
        p = dict(planned.params)
        weights = tuple(float(w) for w in p["weight"])
        return Planned(self.name, planned.inputs, (("weights", weights), ("normalize", bool(p["normalize"]))))

    stream_passes = 1  # elementwise: chunk by chunk, the same bits as the whole tensor

    def stream_apply(self, state, inputs, start, params, ctx, out):
        return self.compute(inputs, params, ctx, out)

    def compute(self, inputs, params, ctx: Context, out=None):
        """mergekit's arithmetic, bit for bit: fp32 weights, addcmul_ accumulation, one division."""
        import torch

        first = inputs[0]
        dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
        w = torch.tensor(list(params["weights"]), dtype=torch.float32, device=first.device).to(dtype)
        result = torch.zeros_like(first, dtype=dtype)
        for tensor, coefficient in zip(inputs, w.unbind(0)):
            result.addcmul_(tensor, coefficient)
        if params.get("normalize", True):
            result.div_(w.sum())
        if out is not None:
            return out.copy_(result)
        return result.to(first.dtype)

    def native_ok(self, tensor) -> bool:
        from mergekit_fast.ops.combine import LINEAR_MAX_INPUTS

        return tensor.in_dtype.native is not None and 1 <= len(tensor.inputs) <= LINEAR_MAX_INPUTS

    @staticmethod
    def native_cpu(tensors, inputs, outs, threads, seed=None):
        """The combine op's linear kernel (csrc/combine) on the mapped inputs, one tensor at a time."""
        import math

        from mergekit_fast.ops.combine import linear_cpu

        flags = []
        for t, ins, out in zip(tensors, inputs, outs):
            p = dict(t.params)
            flags.append(linear_cpu(t.in_dtype.native, math.prod(t.shape), list(ins), out, p["weights"],
                                    bool(p.get("normalize", True)), threads))  # fmt: skip
        return flags

    def reference(self, inputs, params, ctx: Context):
        """Independent of ``compute``: the weighted sum as one stacked reduction in fp64."""
        import torch

        x = torch.stack([t.to(torch.float64) for t in inputs])
        w = torch.tensor(params["weights"], dtype=torch.float32).to(torch.float64)
        w = w.view(-1, *([1] * (x.dim() - 1)))
        r = (x * w).sum(0)
        if params.get("normalize", True):
            r = r / w.sum()
        return r.to(inputs[0].dtype)

    def tolerance_of(self, dtype_name, params) -> float:
        # compute accumulates in fp32 (two roundings per input), the reference in fp64
        return 1.0 if dtype_name in ("bfloat16", "float16") else 2.0 + len(params["weights"])

    def verify_scale(self, inputs, params):
        import torch

        w = [abs(x) for x in params["weights"]]
        s = sum(wi * t.to(torch.float64).abs() for wi, t in zip(w, inputs))
        if params.get("normalize", True):
            total = abs(sum(params["weights"]))
            s = s / (total if total else 1.0)
        return s


METHOD = Linear()
