"""breadcrumbs_ties: Model Breadcrumbs with TIES (https://arxiv.org/abs/2312.06795), as mergekit 0.1.5 registers it.

mergekit 0.1.5's GeneralizedTaskArithmeticMerge with sparsification magnitude_outliers and consensus sum;
defaults normalize=false, rescale=false. The math is in ``_task_arithmetic`` (the family's core).
Two cut points of the ascending order of |delta| (torch.sort on the CPU; ties break as libstdc++'s
introsort does), then the TIES sign election of the weighted deltas.
"""

from __future__ import annotations

from mergekit_fast.methods._task_arithmetic import (
    MAGNITUDE_OUTLIERS,
    SUM,
    TaskArithmeticFamily,
    family_params,
)


class BreadcrumbsTies(TaskArithmeticFamily):
    name = "breadcrumbs_ties"
    description = "Breadcrumbs sparsification with TIES sign election"
    sparsification = MAGNITUDE_OUTLIERS
    consensus = SUM
    random = False
    params = family_params(normalize=False, rescale=False, sparsification=MAGNITUDE_OUTLIERS)


METHOD = BreadcrumbsTies()
