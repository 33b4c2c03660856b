"""breadcrumbs: Model Breadcrumbs (https://arxiv.org/abs/2312.06795), as mergekit 0.1.5 registers it.

mergekit 0.1.5's GeneralizedTaskArithmeticMerge with sparsification magnitude_outliers and consensus none;
defaults normalize=false, rescale=false. The math is in ``_task_arithmetic`` (the family's core).
Two cut points of the ascending order of |delta| (torch.sort on the CPU; ties break as libstdc++'s
introsort does). density >= 1 (the default) keeps everything, the outliers too.
"""

from __future__ import annotations

from mergekit_fast.methods._task_arithmetic import MAGNITUDE_OUTLIERS, TaskArithmeticFamily, family_params


class Breadcrumbs(TaskArithmeticFamily):
    name = "breadcrumbs"
    description = (
        "Breadcrumbs: drop the largest gamma and the smallest deltas, keep the fraction density, weighted sum"
    )
    sparsification = MAGNITUDE_OUTLIERS
    consensus = None
    random = False
    params = family_params(normalize=False, rescale=False, sparsification=MAGNITUDE_OUTLIERS)


METHOD = Breadcrumbs()
