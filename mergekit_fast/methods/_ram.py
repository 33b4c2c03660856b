"""What ram and ramplus_tl share (mergekit 0.1.5 merge_methods/ram.py): the task vectors, which models
change each element, and the plan (a private module: not loaded as a merge method)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mergekit_fast.methods._common import abs_sum, base_only
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


class RamFamily(MergeMethod):
    """The base required, any number of other models; shared float parameters only."""

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
