"""dare_linear: Linear DARE (https://arxiv.org/abs/2311.03099), as mergekit 0.1.5 registers it.

mergekit 0.1.5's GeneralizedTaskArithmeticMerge with sparsification random and consensus none;
defaults normalize=false, rescale=true. The math is in ``_task_arithmetic`` (the family's core).
Draws are counter-based (methods/rng.py: stream i for the i-th non-base model); parity with mergekit's
torch.bernoulli is statistical.
"""

from __future__ import annotations

from mergekit_fast.methods._task_arithmetic import RANDOM, TaskArithmeticFamily, family_params


class DareLinear(TaskArithmeticFamily):
    name = "dare_linear"
    description = (
        "DARE: drop delta elements at random (keep probability density), rescale to the L1 norm, weighted sum"
    )
    sparsification = RANDOM
    consensus = None
    random = True
    params = family_params(normalize=False, rescale=True, sparsification=RANDOM)


METHOD = DareLinear()
