"""ram: Reinforced Agent Merging (mergekit 0.1.5 merge_methods/ram.py; arXiv 2601.13572).

Per element, the task vectors d_i = x_i - base that change it (|d_i| > ``epsilon``) are combined: an
element only one model changes takes that model's delta in full, one several models change takes
their mean; the result is base + that. All in the input dtype, as in mergekit. Needs the base; a weight
only the base has is the base.
"""

from __future__ import annotations

from mergekit_fast.methods._ram import RamFamily, contributions
from mergekit_fast.methods.base import Context, Param, Scope


class Ram(RamFamily):
    name = "ram"
    description = "base + per element: the only changing model's delta, or the mean of the changing ones"
    params = (Param("epsilon", float, Scope.SHARED, 1e-5, doc="a delta counts where |delta| > epsilon"),)
    float_params = ("epsilon",)
    kernel = "ram_cpu"
    # CPU: compute gives the reference's bits (0 ulp). Elementwise apart from the sum over the models, which a
    # GPU may round differently in the input dtype.
    tolerance = {"bfloat16": 1.0, "float16": 1.0, "float32": 2.0, "float64": 2.0}

    def reference(self, inputs, params, ctx: Context):
        base, models = inputs[0], inputs[1:]
        if not models:
            return base.clone()
        c = contributions(base, models, params.get("epsilon", 1e-5))
        kept = c.kept
        merged = (kept * c.unique + c.overlap_share(kept)).sum(dim=0, keepdim=True)
        return base + merged.reshape_as(base)


METHOD = Ram()
