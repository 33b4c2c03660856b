"""della: DELLA (https://arxiv.org/abs/2406.11617), as mergekit 0.1.5 registers it.

mergekit 0.1.5's GeneralizedTaskArithmeticMerge with sparsification della and consensus sum;
defaults normalize=true, rescale=true. The math is in ``_task_arithmetic`` (the family's core).
Ranks per row (dim 1; one row for 1-D tensors), in the work dtype as mergekit computes them; an epsilon
that takes the keep probabilities out of [0, 1] is refused in the config.
"""

from __future__ import annotations

from mergekit_fast.methods._task_arithmetic import DELLA, SUM, TaskArithmeticFamily, family_params


class Della(TaskArithmeticFamily):
    name = "della"
    description = "DELLA: keep each element with a probability from density - epsilon to density + epsilon by magnitude rank, rescale, TIES sign election"
    sparsification = DELLA
    consensus = SUM
    random = True
    params = family_params(normalize=True, rescale=True, sparsification=DELLA)


METHOD = Della()
