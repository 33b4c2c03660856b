"""ties: TIES (https://arxiv.org/abs/2306.01708), as mergekit 0.1.5 registers it.

mergekit 0.1.5's GeneralizedTaskArithmeticMerge with sparsification magnitude and consensus sum;
defaults normalize=true, rescale=false. The math is in ``_task_arithmetic`` (the family's core).
Magnitude pruning over the whole tensor (k = max(1, int(density * n)) elements); ties at the threshold
break as mergekit's CPU argsort breaks them (libstdc++ introsort; see ``introsort_select``).
"""

from __future__ import annotations

from mergekit_fast.methods._task_arithmetic import MAGNITUDE, SUM, TaskArithmeticFamily, family_params


class Ties(TaskArithmeticFamily):
    name = "ties"
    description = "TIES: keep each delta's largest-magnitude fraction density, elect signs by the weighted sum, average the agreeing deltas"
    sparsification = MAGNITUDE
    consensus = SUM
    random = False
    params = family_params(normalize=True, rescale=False, sparsification=MAGNITUDE)


METHOD = Ties()
