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

# torch's sum of a bf16 tensor (the dot products' `(d_i * d_j).sum()`) is not the fp32 sum of its terms
# rounded once beyond 2^15 elements: measured, a quarter of the sums of 2^16 to 2^19 products round to the
# neighbouring bf16 value (torch.norm and torch.dot stay exact-then-rounded up to 2^24), and a dot an ulp
# off moves t, so most elements, by an ulp. Longer rows take their sums from torch.
GRAM_MAX_SUM = 1 << 15


def _torch_stats(base, models):
    """The norms of the task vectors and their pairwise dot products, along the last dimension, as
    mergekit computes them (in the input dtype)."""
    import torch

    deltas = [x - base for x in models]
    norms = [torch.norm(d, dim=-1) for d in deltas]
    dots = {}
    for i in range(len(deltas)):
        for j in range(i + 1, len(deltas)):
            dots[i, j] = (deltas[i] * deltas[j]).sum(dim=-1)
    return norms, dots


_TERMS_MAX_MODELS = 4  # _native_terms holds every delta and pairwise product at once: n + n(n-1)/2 tensors


def _native_terms(base, models, threads: int):
    """_torch_stats with its elementwise ops native: the task vectors and their pairwise products in one
    pass over the inputs (csrc/gram/apply_cpu.cpp, model_stock_terms_cpu: the same values torch's ops
    give), then torch's norms and sums over them (the same tensors the reference reduces)."""
    from array import array

    import torch

    from mergekit_fast import _native

    n = len(models)
    deltas = [torch.empty(base.shape, dtype=base.dtype) for _ in range(n)]
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    products = [torch.empty(base.shape, dtype=base.dtype) for _ in pairs]
    ptrs = array("Q", [x.data_ptr() for x in (*models, base, *deltas, *products)])
    _native.C.model_stock_terms_cpu(
        _native.dtype_tag(base.dtype), n, base.numel(), ptrs.buffer_info()[0], threads
    )
    norms = [torch.norm(d, dim=-1) for d in deltas]
    return norms, {pair: p.sum(dim=-1) for pair, p in zip(pairs, products)}


def _t_of(norms, dots, n):
    """mergekit's t from the norms and dot products (tensors of the input dtype), with a trailing
    dimension of 1 to broadcast over the elements."""
    import torch

    cosines = []
    for i in range(n):
        for j in range(i + 1, n):
            cosines.append((dots[i, j] / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    denominator = 1 + (n - 1) * cos
    # at the singularity (the models cancel out) keep the base: t = 0
    singular = denominator.abs() < 1e-6
    return torch.where(singular, torch.zeros_like(cos),
                       (n * cos) / torch.where(singular, torch.ones_like(denominator), denominator))  # fmt: skip


class ModelStock(MergeMethod):
    name = "model_stock"
    description = "t * mean(models) + (1 - t) * base, t from the mean pairwise cosine of the task vectors"
    params = (Param("filter_wise", bool, Scope.SHARED, False, doc="one t per row instead of per tensor"),)
    contract = Contract(BasePolicy.REQUIRED, 3, None, hint=" (the base_model and at least two other models)")
    optional_policy = OptionalPolicy.BASE_OR_SKIP
    # CPU: compute (the gram op and the native apply, see compute) gives the reference's bits, except
    # that a 16-bit input's norm or dot product can differ by an ulp of the dtype where torch's fp32
    # sum sits at a rounding boundary, moving t by an ulp; on another device the input-dtype sums round
    # differently too. Either moves the result by an ulp of the input dtype.
    tolerance = {"bfloat16": 2.0, "float16": 2.0, "float32": 4.0, "float64": 4.0}

    def plan(self, group):
        planned = super().plan(group)
        if planned is None or planned.method != self.name:
            return planned
        return Planned(self.name, planned.inputs, shared(planned, {"filter_wise": bool}), True)

    def reference(self, inputs, params, ctx: Context):

        base, models = inputs[0], list(inputs[1:])
        shape = base.shape
        if params.get("filter_wise", False):
            if base.dim() == 1:  # a vector is a single row
                base, models = base.unsqueeze(0), [x.unsqueeze(0) for x in models]
        else:
            base, models = base.reshape(-1), [x.reshape(-1) for x in models]
        norms, dots = _torch_stats(base, models)
        t = _t_of(norms, dots, len(models))
        average = sum(models) / len(models)
        return (t * average + (1 - t) * base).reshape(shape)

    def compute(self, inputs, params, ctx: Context, out=None):
        """The reference's math with one pass for the statistics and one for the result: 16-bit rows of
        at most GRAM_MAX_SUM elements take their norms and dot products from the gram op (fp64 sums of
        exactly the terms torch adds, rounded as torch rounds its fp32 sums: the same values but where
        torch's own fp32 rounding error crosses a rounding boundary of the dtype); longer rows, fp32 and
        fp64 from torch, whose order of additions no other sum reproduces (over the task vectors and
        products one native pass writes, _native_terms). t * mean + (1 - t) * base then runs natively,
        op by op in the dtype as torch does: the same bits."""
        from mergekit_fast import _native
        from mergekit_fast.ops import gram as g

        base, models = inputs[0], list(inputs[1:])
        if base.dim() == 0 or len(models) > 64 or not g.native_ready(inputs, ctx.backend):
            return super().compute(inputs, params, ctx, out)
        import torch

        rows = bool(params.get("filter_wise", False)) and base.dim() >= 2
        row_len = base.shape[-1] if rows else 0
        if base.dtype in (torch.bfloat16, torch.float16) and (row_len or base.numel()) <= GRAM_MAX_SUM:
            G = g.gram(models, base, row_len=row_len, rounding="input", threads=ctx.threads).to(torch.float32)
            k = len(models)
            norms = [G[..., i, i].sqrt().to(base.dtype) for i in range(k)]
            dots = {(i, j): G[..., i, j].to(base.dtype) for i in range(k) for j in range(i + 1, k)}
        else:
            b = base.reshape(-1, row_len) if rows else base.reshape(-1)
            ms = [x.reshape(b.shape) for x in models]
            if len(models) <= _TERMS_MAX_MODELS and hasattr(_native.C, "model_stock_terms_cpu"):
                norms, dots = _native_terms(b, ms, ctx.threads)
            else:
                norms, dots = _torch_stats(b, ms)
        t = _t_of(norms, dots, len(models))
        if out is not None and not (
            out.is_contiguous() and out.dtype == base.dtype and out.shape == base.shape
        ):
            result = g.model_stock_apply(models, base, t, row_len=row_len, threads=ctx.threads)
            return out.copy_(result)
        return g.model_stock_apply(models, base, t, row_len=row_len, out=out, threads=ctx.threads)

    def native_ok(self, tensor) -> bool:
        """The torch-free path (native_cpu) serves 16-bit tensors of at least one dimension whose rows
        have at most GRAM_MAX_SUM elements: their sums rounded to the dtype are torch's (see compute);
        the others go through compute."""
        from mergekit_fast import _native

        return (
            _native.C is not None
            and hasattr(_native.C, "model_stock_cpu")
            and tensor.in_dtype.itemsize == 2
            and len(tensor.shape) >= 1
            and 3 <= len(tensor.inputs) <= 17  # the base and 2 to 16 models (the gram kernel's k)
            and self._row_len(tensor) <= GRAM_MAX_SUM
        )

    @staticmethod
    def _row_len(tensor) -> int:
        import math

        if bool(dict(tensor.params).get("filter_wise", False)) and len(tensor.shape) >= 2:
            return tensor.shape[-1]
        return math.prod(tensor.shape)

    @staticmethod
    def native_cpu(tensors, inputs, outs, threads, seed=None):
        """The whole method by address, without torch (csrc/gram/apply_cpu.cpp, model_stock_cpu: the
        gram, t per row in the dtype's arithmetic as torch computes it, the apply); per tensor
        whether every output element is finite."""
        import math
        from array import array

        from mergekit_fast import _native

        flags = []
        for t, ins, out in zip(tensors, inputs, outs):
            filter_wise = bool(dict(t.params).get("filter_wise", False))
            numel = math.prod(t.shape)
            row_len = t.shape[-1] if filter_wise and len(t.shape) >= 2 else 0
            ptrs = array("Q", [*ins[1:], ins[0], out])  # the models, the base, the output
            bad = _native.C.model_stock_cpu(t.in_dtype.native, len(ins) - 1, ptrs.buffer_info()[0], numel, row_len,
                                            threads)  # fmt: skip
            flags.append(bad == 0)
        return flags

    def verify_scale(self, inputs, params):
        return abs_sum(inputs)


METHOD = ModelStock()
