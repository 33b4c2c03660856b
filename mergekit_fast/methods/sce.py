"""sce: select, calculate, erase (mergekit 0.1.5 merge_methods/sce.py; arXiv 2408.07990).

The task vectors d_i = x_i - base are

1. *selected*: with ``select_topk`` < 1, only the positions where the variance of the d_i across the
   models is among the top ``int(nonzero * select_topk)`` (nonzero: positions of non-zero variance,
   the product rounded as an fp32 tensor op, as in mergekit) are kept, in every d_i;
2. *erased*: TIES' sum sign consensus (keep d_i where its sign equals the sign of sum_i d_i, zero
   counting as positive);
3. weighted by *calculated* per-model weights w_i = mean(d_i^2), normalised by their sum (uniform when
   that sum is below 1e-6);

and the result is base + sum_i(w_i m_i d_i) / max(sum_i(w_i m_i), 1e-6), with m_i the consensus mask.
No per-model weight. Everything runs in the input dtype (bf16 stays bf16), as in mergekit; ``int8_mask``
only changes the dtype the masks are held in (less memory), never a value. Ties of the variance at the
top-k threshold go where torch.topk puts them (mergekit uses it too). A weight only the base has is the
base.

On the CPU three native passes replace the reference's dozen torch ops, with the reference's bits: by
address in the engine (``native_cpu``: bf16 and fp16, up to 8 models besides the base; no torch unless a
weight's mean is left to it), and on torch tensors in ``compute`` (fp32 too, up to 4 models):

* ``sce_select_cpu`` (csrc/select): the variance of each position as torch.var computes it (Welford in
  fp64, rounded to the dtype), the threshold from a radix histogram of |var|, and, only where equal
  variances straddle the k-th, libstdc++'s nth_element (or partial_sort: what torch.topk calls on the
  CPU), block-partitioned, over one 32-bit word per position;
* ``sce_squares_cpu`` (csrc/combine/pointwise_cpu.cpp): the selected deltas squared and their exact
  per-model sums. torch's ``.mean(dim=1)`` of the squares adds them in fp32 in an order of its own, split
  by its threads, that no other sum reproduces; but its error is bounded, so the exact sum gives the mean
  in a 16-bit dtype wherever every fp32 sum within the bound rounds to the same value (nearly always for
  bf16; the bound follows the cascade's structure, ``ops.sce._sum_depth``). Elsewhere, and for fp32,
  torch takes the mean of the squares: the one reduction left to it;
* ``sce_apply_cpu``: the sign consensus and the weighted mean, op by op in the dtype. The weights'
  normalisation between them (a sum of up to 7 values, two divisions) is replayed in Python with torch's
  order and roundings (``ops.sce.weights``).

fp64 (torch.topk compares fp64 values, the keys are fp32) and more models take the reference.
"""

from __future__ import annotations

from mergekit_fast.methods._common import abs_sum, base_only, shared
from mergekit_fast.methods.base import BasePolicy, Context, Contract, MergeMethod, Param, Planned, Scope


def _variance_mask(deltas, density: float, mask_dtype):
    """1 where the across-model variance of the deltas is in the top fraction ``density``, else 0."""
    import torch

    shape = deltas.shape[1:]
    if density <= 0:
        return torch.zeros(shape, dtype=mask_dtype, device=deltas.device)
    if density >= 1:
        return torch.ones(shape, dtype=mask_dtype, device=deltas.device)
    var = torch.var(deltas, dim=0, unbiased=False)
    # the count times the fraction is an fp32 tensor product in mergekit; keep that rounding
    k = int(torch.count_nonzero(var) * density)
    mask = torch.zeros(shape, dtype=mask_dtype, device=deltas.device)
    if k > 0:
        top = torch.topk(var.abs().reshape(-1), k=k, largest=True).indices
        mask.view(-1)[top] = 1
    return mask


class Sce(MergeMethod):
    name = "sce"
    description = "task vectors: variance top-k selection, sum sign consensus, mean-square weights"
    params = (
        Param("select_topk", float, Scope.SHARED, 1.0, doc="fraction of positions kept by variance"),
        Param("int8_mask", bool, Scope.SHARED, False, doc="hold the masks in int8 (memory only)"),
    )
    contract = Contract(BasePolicy.REQUIRED, 1, None)
    # CPU: compute is the reference (0 ulp). On another device torch's reductions (the variance, the
    # sums over models and the mean squares, all in the input dtype) round differently: the weights
    # and the final division move by an ulp of the input dtype.
    tolerance = {"bfloat16": 2.0, "float16": 2.0, "float32": 4.0, "float64": 4.0}

    def plan(self, group):
        planned = base_only(super().plan(group))
        if planned is None or planned.method != self.name:
            return planned
        params = shared(planned, {"select_topk": float, "int8_mask": bool})
        return Planned(self.name, planned.inputs, params, True)

    def reference(self, inputs, params, ctx: Context):
        import torch

        base, others = inputs[0], inputs[1:]
        if not others:
            return base.clone()
        mask_dtype = torch.int8 if params.get("int8_mask", False) else base.dtype
        deltas = torch.stack([x - base for x in others])
        topk = params.get("select_topk", 1.0)
        if topk < 1:
            deltas = deltas * _variance_mask(deltas, topk, mask_dtype)
        # erase: keep the deltas whose sign agrees with the sign of their sum (>= 0 counts as +)
        majority = (deltas.sum(dim=0) >= 0).to(mask_dtype) * 2 - 1
        agree = deltas.sign().to(mask_dtype) == majority
        # calculate: per-model mean square, normalised by the (host) sum, uniform when that is ~0
        n = deltas.shape[0]
        w = deltas.square().reshape(n, -1).mean(dim=1)
        total = torch.sum(w).item()
        w = torch.ones_like(w) / n if abs(total) < 1e-6 else w / total
        w = w.view(n, *([1] * (deltas.dim() - 1))) * agree
        merged = (deltas * w).sum(dim=0) / torch.sum(w, dim=0).clamp(min=1e-6)
        return base + merged

    def compute(self, inputs, params, ctx: Context, out=None):
        """The reference's values from the native passes (see the module's docstring) where they serve."""
        from mergekit_fast.ops import sce as ops_sce

        if not ops_sce.native_ready(inputs, ctx.backend):
            return super().compute(inputs, params, ctx, out)
        return ops_sce.sce_merge(inputs[0], list(inputs[1:]), float(params.get("select_topk", 1.0)),
                                 out=out, threads=ctx.threads)  # fmt: skip

    def native_ok(self, tensor) -> bool:
        """The by-address path serves 16-bit tensors with up to 8 models besides the base (fp32 weights
        need torch's mean: compute serves them)."""
        import math

        from mergekit_fast.ops import sce as ops_sce

        name = tensor.in_dtype.name
        return (
            ops_sce.kernels_built()
            and name in ("bfloat16", "float16")
            and 2 <= len(tensor.inputs) <= 1 + ops_sce.max_models(name)
            and 0 < math.prod(tensor.shape) <= ops_sce.MAX_NUMEL
        )

    @staticmethod
    def native_cpu(tensors, inputs, outs, threads, seed=None):
        """The whole method by address (ops/sce.py ``run``), without torch unless a weight's mean is left to
        it; per tensor whether every output element is finite."""
        import math

        from mergekit_fast.ops import sce as ops_sce

        flags = []
        for t, ins, out in zip(tensors, inputs, outs):
            topk = float(dict(t.params).get("select_topk", 1.0))
            flags.append(
                ops_sce.run(t.in_dtype.name, math.prod(t.shape), ins[0], list(ins[1:]), out, topk, threads)
            )
        return flags

    def verify_scale(self, inputs, params):
        # the base plus a weighted mean of the deltas: bounded by the sum of the inputs' magnitudes
        return abs_sum(inputs)


METHOD = Sce()
