"""ramplus_tl: RAM+ with tensor-local rescaling (mergekit 0.1.5 merge_methods/ram.py; arXiv 2601.13572).

As ``ram``, but each model's uniquely changed elements are scaled by lambda_i = 1 + r * clamp(rho_i,
0, alpha), where rho_i = (elements model i changes that others change too) / max(elements only model i
changes, epsilon), counted over the whole tensor. ``r`` (0.1), ``alpha`` (0.2), ``epsilon`` (1e-5) are
shared. Needs the base; a weight only the base has is the base.

Output dtype: lambda is an fp32 tensor in mergekit, so for bf16 / fp16 inputs its result, and what it
writes when the config sets no out_dtype, is fp32. That is matched here; set ``out_dtype`` (e.g.
bfloat16) to write the input dtype instead.
"""

from __future__ import annotations

from mergekit_fast.methods._common import with_float32
from mergekit_fast.methods._ram import RamFamily, contributions
from mergekit_fast.methods.base import Context, Param, Scope


class RamPlusTL(RamFamily):
    name = "ramplus_tl"
    description = "ram with each model's unique changes scaled by 1 + r * clamp(shared / unique, 0, alpha)"
    params = (
        Param("r", float, Scope.SHARED, 0.1, doc="strength of the rescaling"),
        Param("alpha", float, Scope.SHARED, 0.2, doc="upper bound of the overlap ratio rho"),
        Param("epsilon", float, Scope.SHARED, 1e-5, doc="a delta counts where |delta| > epsilon"),
    )
    float_params = ("r", "alpha", "epsilon")
    kernel = "ramplus_tl_cpu"
    fp32_sum = True
    promotes = True  # the kernel writes the fp32 result, or rounds it to the input dtype (out_dtype)
    # CPU: compute gives the reference's bits (0 ulp). The fp32 rescaled sum over the models may round
    # differently on a GPU.
    tolerance = {"bfloat16": 1.0, "float16": 1.0, "float32": 2.0, "float64": 2.0}

    def result_dtype(self, in_dtype, params):
        return with_float32(in_dtype)

    def reference(self, inputs, params, ctx: Context):
        base, models = inputs[0], inputs[1:]
        if not models:
            return base.clone()
        r, alpha, epsilon = params.get("r", 0.1), params.get("alpha", 0.2), params.get("epsilon", 1e-5)
        c = contributions(base, models, epsilon)
        shared = (c.changed & c.overlap).sum(dim=1)
        unique = (c.changed & c.unique).sum(dim=1)
        rho = shared / unique.clamp(min=epsilon)  # an fp32 tensor: the result is fp32 (see above)
        lam = 1 + r * rho.clamp(min=0, max=alpha)
        kept = c.kept
        merged = (kept * c.unique * lam.unsqueeze(-1) + c.overlap_share(kept)).sum(dim=0, keepdim=True)
        return base + merged.reshape_as(base)


METHOD = RamPlusTL()
