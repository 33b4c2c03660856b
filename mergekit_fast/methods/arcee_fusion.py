"""arcee_fusion: keep the other model's changes where they matter most (mergekit 0.1.5
merge_methods/arcee_fusion.py).

With base b and the other model x: importance = |x - b| * KL(p || q) per element, where p = softmax(x) +
1e-8 and q = softmax(b) + 1e-8 along the last dimension and the KL divergence sum p log(p / q) is one
number per row (the whole tensor for a vector). The threshold is median + 1.5 IQR of the importances,
read from the sorted values at the fp32 positions trunc(q (n - 1)), q = 0.25, 0.5, 0.75; the result is
b + (x - b) * mask, mask = (importance >= threshold) as an fp32 tensor. All but the mask in the input
dtype, as in mergekit.

Randomness: a tensor of more than 1M elements takes its quantiles from a sample of 1M elements drawn
with replacement. mergekit draws them with torch.randint from the global generator; here element j of
the sample is ``rng.randint(numel, seed, tensor name, stream 0)``, so a seed gives the same model on
every device, thread count and order. The sample differs from mergekit's, so for those tensors the
threshold, hence the kept fraction, agrees with mergekit's within sampling error; tensors of at most
1M elements draw nothing and are exact.

Output dtype: mergekit multiplies by the fp32 mask, so for bf16 / fp16 inputs its result, and what it
writes when the config sets no out_dtype, is fp32 (twice the input's size). That is matched here; set
``out_dtype`` (e.g. bfloat16) to write the input dtype instead. An optional weight only one model has is
copied from it.
"""

from __future__ import annotations

from mergekit_fast.methods._common import abs_sum, with_float32
from mergekit_fast.methods.base import BasePolicy, Context, Contract, MergeMethod, OptionalPolicy, Planned

SAMPLE_SIZE = 1_000_000  # quantiles of larger tensors come from this many draws (with replacement)
_QUANTILES = (0.25, 0.5, 0.75)
_SOFTMAX_EPS = 1e-8


def importance(base, other):
    """|other - base| times the per-row KL divergence of softmax(other) from softmax(base)."""
    import torch
    import torch.nn.functional as F

    p = F.softmax(other, dim=-1) + _SOFTMAX_EPS
    q = F.softmax(base, dim=-1) + _SOFTMAX_EPS
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    return (other - base).abs() * kl


def threshold(scores, seed: int | None, name: str):
    """median + 1.5 IQR of ``scores`` (0-d tensor in their dtype), sampled above SAMPLE_SIZE elements."""
    import torch

    from mergekit_fast.methods import _philox_numpy, rng

    flat = scores.reshape(-1)
    if flat.numel() > SAMPLE_SIZE:
        if seed is None:
            raise ValueError(
                f"arcee_fusion: tensor {name} has more than {SAMPLE_SIZE} elements and needs a seed"
            )
        if flat.device.type == "cpu":  # the same draws, computed without torch's per-op thread pool
            idx = _philox_numpy.randint(flat.numel(), seed, name, 0, SAMPLE_SIZE)
        else:
            idx = rng.randint(flat.numel(), seed, name, 0, SAMPLE_SIZE, device=flat.device)
        flat = flat[idx]
    ordered = torch.sort(flat).values
    at = (torch.tensor(_QUANTILES) * (ordered.numel() - 1)).long().to(ordered.device)
    q1, median, q3 = ordered[at]
    return median + 1.5 * (q3 - q1)


class ArceeFusion(MergeMethod):
    name = "arcee_fusion"
    description = "base + delta where |delta| * KL(softmax rows) >= median + 1.5 IQR of those scores"
    contract = Contract(BasePolicy.REQUIRED, 2, 2, hint=" (the base_model and exactly one other model)")
    optional_policy = OptionalPolicy.PASSTHROUGH_SINGLETON
    random = True  # the quantile sample of tensors above 1M elements
    # The mask is a threshold decision: the CPU compute is the reference (0 ulp); elsewhere an importance
    # that rounds across the threshold flips an element, which no ulp tolerance covers. Kept elements
    # are base + delta in fp32 (exact to the ulp of the written dtype).
    tolerance = {"bfloat16": 1.0, "float16": 1.0, "float32": 2.0, "float64": 2.0}

    def plan(self, group):
        planned = super().plan(group)
        if planned is None or planned.method != self.name:
            return planned
        return Planned(self.name, planned.inputs, (), True)

    def result_dtype(self, in_dtype, params):
        return with_float32(in_dtype)

    def reference(self, inputs, params, ctx: Context):
        base, other = inputs
        scores = importance(base, other)
        mask = (scores >= threshold(scores, ctx.seed, ctx.name)).float()
        return base + (other - base) * mask

    def verify_scale(self, inputs, params):
        return abs_sum(inputs)


METHOD = ArceeFusion()
