"""model_stock: interpolate between the base and the models' average by their agreement (mergekit 0.1.5
merge_methods/model_stock.py; arXiv 2403.19522).

With N >= 2 models besides the base and their task vectors d_i = x_i - base, cos is the mean over the
pairs i < j of the cosine d_i.d_j / max(|d_i||d_j|, 1e-6) clamped to [-1, 1] -- of the whole flattened
tensor, or with ``filter_wise`` of each row (the last dimension; a 1-D tensor is one row). Then
t = N cos / (1 + (N - 1) cos), or 0 where that denominator is below 1e-6 in magnitude (the base is kept),
and the result is t * mean(x_i) + (1 - t) * base. All in the input dtype, as in mergekit.

Needs the base and at least two other models (3 inputs). An optional weight present in fewer than 3
inputs is the base's copy when only the base has it and is not written otherwise (mergekit's
base_or_skip).
"""

from __future__ import annotations

from mergekit_fast.methods._common import abs_sum, shared
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


class ModelStock(MergeMethod):
    name = "model_stock"
    description = "t * mean(models) + (1 - t) * base, t from the mean pairwise cosine of the task vectors"
    params = (Param("filter_wise", bool, Scope.SHARED, False, doc="one t per row instead of per tensor"),)
    contract = Contract(BasePolicy.REQUIRED, 3, None, hint=" (the base_model and at least two other models)")
    optional_policy = OptionalPolicy.BASE_OR_SKIP
    # CPU: compute is the reference (0 ulp). On another device the input-dtype norms and dot products
    # round differently, which moves t by an ulp of the input dtype.
    tolerance = {"bfloat16": 2.0, "float16": 2.0, "float32": 4.0, "float64": 4.0}

    def plan(self, group):
        planned = super().plan(group)
        if planned is None or planned.method != self.name:
            return planned
        return Planned(self.name, planned.inputs, shared(planned, {"filter_wise": bool}), True)

    def reference(self, inputs, params, ctx: Context):
        import torch

        base, models = inputs[0], list(inputs[1:])
        shape = base.shape
        if params.get("filter_wise", False):
            if base.dim() == 1:  # a vector is a single row
                base, models = base.unsqueeze(0), [x.unsqueeze(0) for x in models]
        else:
            base, models = base.reshape(-1), [x.reshape(-1) for x in models]
        deltas = [x - base for x in models]
        norms = [torch.norm(d, dim=-1) for d in deltas]
        cosines = []
        for i in range(len(deltas)):
            for j in range(i + 1, len(deltas)):
                dot = (deltas[i] * deltas[j]).sum(dim=-1)
                cosines.append((dot / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1))
        cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
        n = len(models)
        denominator = 1 + (n - 1) * cos
        # at the singularity (the models cancel out) keep the base: t = 0
        singular = denominator.abs() < 1e-6
        t = torch.where(singular, torch.zeros_like(cos),
                        (n * cos) / torch.where(singular, torch.ones_like(denominator), denominator))  # fmt: skip
        average = sum(models) / n
        return (t * average + (1 - t) * base).reshape(shape)

    def verify_scale(self, inputs, params):
        return abs_sum(inputs)


METHOD = ModelStock()
