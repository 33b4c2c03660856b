"""della_linear: Linear DELLA (https://arxiv.org/abs/2406.11617), as mergekit 0.1.5 registers it.

mergekit 0.1.5's GeneralizedTaskArithmeticMerge with sparsification della and consensus none;
defaults normalize=false, rescale=true. The math is in ``_task_arithmetic`` (the family's core).
Ranks per row (dim 1; one row for 1-D tensors); an epsilon that takes the keep probabilities out of [0, 1]
is refused in the config.
"""

from __future__ import annotations

from mergekit_fast.methods._task_arithmetic import DELLA, TaskArithmeticFamily, family_params


class DellaLinear(TaskArithmeticFamily):
    name = "della_linear"
    description = "DELLA: keep each element with a probability from density - epsilon to density + epsilon by magnitude rank, rescale, weighted sum"
    sparsification = DELLA
    consensus = None
    random = True
    params = family_params(normalize=False, rescale=True, sparsification=DELLA)


METHOD = DellaLinear()
