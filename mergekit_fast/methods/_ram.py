"""What ram and ramplus_tl share (mergekit 0.1.5 merge_methods/ram.py): the task vectors, which models
change each element, and the plan (a private module: not loaded as a merge method)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mergekit_fast.methods._common import Pointwise, abs_sum, base_only
from mergekit_fast.methods.base import BasePolicy, Contract, MergeMethod, Planned


@dataclass
class Contributions:
    deltas: object  # [N, numel] task vectors x_i - base, in the input dtype
    changed: object  # [N, numel] bool: |delta| > epsilon
    count: object  # [1, numel] int64: how many models change the element
    overlap: object  # [1, numel] bool: more than one model changes it
    unique: object  # [1, numel] bool: exactly one model changes it

    @property
    def kept(self):
        """The deltas with the unchanged elements (|delta| <= epsilon) zeroed."""
        return self.deltas * self.changed

    def overlap_share(self, kept):
        """Per model: its delta divided by the number of models that change the element, where several
        do (0 elsewhere); summed over the models this is their mean."""
        return kept * self.overlap / self.count.clamp(min=1)


def contributions(base, models, epsilon: float) -> Contributions:
    import torch

    deltas = torch.stack([x - base for x in models], dim=0).view(len(models), -1)
    changed = deltas.abs() > epsilon
    count = changed.sum(dim=0, keepdim=True)
    return Contributions(deltas, changed, count, count > 1, count == 1)


class RamFamily(Pointwise, MergeMethod):
    """The base required, any number of other models; shared float parameters only. On the CPU, with up
    to 8 models besides the base, a native kernel (csrc/combine/pointwise_cpu.cpp) gives the reference's
    bits in one pass over the inputs (ramplus_tl: two, the first for its per-model counts). The sum over
    the models adds them one by one from +0 in fp32, as torch's sum over dim 0 of a 16-bit tensor does
    (for up to 16 rows). For an fp32 or fp64 tensor whose row length is not a multiple of the vector
    loop's, torch adds the last columns' rows in interleaved accumulators instead, which agrees with
    the sequential sum only up to 4 rows. So ram's 16-bit inputs take the kernel up to 8 models, fp32
    and fp64 sums (ram's fp32 and fp64 inputs, and every ramplus_tl sum, its lambda being an fp32
    tensor) up to 4; more go through the reference."""

    fp32_sum: ClassVar[bool] = False  # the sum over the models is an fp32 one for 16-bit inputs too

    def model_limit(self, dtype_name: str) -> int:
        if self.fp32_sum or dtype_name in ("float32", "float64"):
            return 4
        return 8

    def kernel_args(self, params):
        defaults = {p.name: p.default for p in self.params}
        return tuple(float(params.get(n, defaults[n])) for n in self.float_params)

    contract = Contract(BasePolicy.REQUIRED, 1, None)
    float_params: ClassVar[tuple[str, ...]] = ()

    def plan(self, group):
        planned = base_only(super().plan(group))
        if planned is None or planned.method != self.name:
            return planned
        p = dict(planned.params)
        return Planned(self.name, planned.inputs, tuple((n, float(p[n])) for n in self.float_params), True)

    def verify_scale(self, inputs, params):
        return abs_sum(inputs)
