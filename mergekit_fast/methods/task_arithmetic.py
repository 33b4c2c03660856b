"""task_arithmetic: Task Arithmetic (https://arxiv.org/abs/2212.04089), as mergekit 0.1.5 registers it.

mergekit 0.1.5's GeneralizedTaskArithmeticMerge with sparsification none and consensus none;
defaults normalize=false, rescale=false. The math is in ``_task_arithmetic`` (the family's core).
No sparsification: ``density``, ``rescale`` and ``int8_mask`` are accepted (mergekit declares them for the
whole family) and change nothing.
"""

from __future__ import annotations

from mergekit_fast.methods._task_arithmetic import TaskArithmeticFamily, family_params


class TaskArithmetic(TaskArithmeticFamily):
    name = "task_arithmetic"
    description = "base + lambda * sum_i w_i (x_i - base), divided by sum_i w_i with normalize"
    sparsification = None
    consensus = None
    random = False
    params = family_params(normalize=False, rescale=False, sparsification=None)


METHOD = TaskArithmetic()
