"""peft's merge utilities on mergekit_fast's selection and random-draw ops, and ``install()`` for LoRA.

The functions have the signatures and the semantics of ``peft.utils.merge_utils`` (peft >= 0.13), which
differ from mergekit's methods of the same names:

* ``task_tensors`` is a list of tensors (stacked here on a new first axis, the task axis) and ``weights``
  a tensor broadcast over it (``weights.view(n, 1, ...)``); there is no base model: the tensors are deltas;
* magnitude pruning keeps the ``k = int(density * numel)`` entries of largest ``|t|`` (``torch.topk``; no
  ``max(1, ...)``, so a tiny density keeps nothing) and never rescales;
* random pruning (DARE) keeps each entry with probability ``density`` (rounded to the tensor's dtype,
  as ``torch.full_like`` rounds it) and, with ``rescale``, divides the kept entries by ``density``
  (mergekit matches L1 norms instead);
* the majority sign is elected on the *unweighted* pruned tensors (``"total"``: the sign of their sum,
  ``"frequency"``: of the sum of their signs; 0 counts as +), and ``disjoint_merge`` divides by the
  number of entries that agree with it (mergekit divides by the sum of their weights);
* ``prune`` warns and returns the tensor unchanged for ``density >= 1`` and raises ``ValueError`` for a
  negative one, as peft does.

What runs on this package's ops: the magnitude selection is an O(n) ``kthvalue`` cut
(``methods._task_arithmetic._unambiguous_top``) wherever no tie straddles the cut (fp32 / fp64 tensors,
almost always), ``torch.topk`` itself otherwise (the entries it keeps among ties are its own choice, so
that is the only way to keep the same ones); the arithmetic that follows is peft's, op for op, so the
deterministic functions return peft's values bit for bit. The random draws are, by default, peft's own
(``torch.bernoulli`` on the same probabilities: the same masks under the same ``torch.manual_seed``,
and on the CPU faster than the alternative); ``install(draws="philox")`` (or ``set_draws("philox")``)
switches them to mergekit_fast's counter-based Philox generator (``methods.rng``: the same draws on
every device and thread count), seeded per call by one ``torch.randint`` from torch's default generator,
so ``torch.manual_seed`` still makes a run reproducible; those masks agree with peft's statistically.

``install()`` points ``peft.tuners.lora.model``'s imported names (``task_arithmetic``, ``ties``,
``dare_linear``, ``dare_ties``, ``magnitude_prune``; peft imports them into that module's namespace, so
that is where they must be replaced) and ``peft.utils.merge_utils``'s own attributes at these functions,
so ``LoraModel.add_weighted_adapter(..., combination_type="ties" | "dare_ties" | "dare_linear" |
"magnitude_prune" | "linear" | their "_svd" variants)`` computes through them. ``uninstall()`` restores
peft's functions.
"""

from __future__ import annotations

import threading
import warnings
from typing import Literal

__all__ = [
    "task_arithmetic",
    "magnitude_prune",
    "ties",
    "dare_linear",
    "dare_ties",
    "prune",
    "calculate_majority_sign_mask",
    "disjoint_merge",
    "magnitude_based_pruning",
    "random_pruning",
    "reshape_weight_task_tensors",
    "install",
    "uninstall",
    "is_installed",
    "set_draws",
]

DRAWS = ("torch", "philox")
_draws = "torch"
_lock = threading.Lock()
_originals: dict[tuple[str, str], object] = {}  # (module, name) -> peft's function, while installed
# the names peft's LoRA model imports from merge_utils, and the helpers merge_utils' own functions use
_LORA_NAMES = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune")
_UTIL_NAMES = _LORA_NAMES + (
    "prune",
    "calculate_majority_sign_mask",
    "disjoint_merge",
    "magnitude_based_pruning",
    "random_pruning",
    "reshape_weight_task_tensors",
)


def set_draws(draws: str) -> None:
    """Where random pruning draws from: ``"torch"`` (peft's torch.bernoulli) or ``"philox"``."""
    global _draws
    if draws not in DRAWS:
        raise ValueError(f"draws must be one of {DRAWS}, got {draws!r}")
    _draws = draws


# ----------------------------------------------------------------------------- peft's functions


def reshape_weight_task_tensors(task_tensors, weights):
    """``weights`` viewed as ``weights.shape + (1,) * (task_tensors.dim() - weights.dim())``."""
    return weights.view(weights.shape + (1,) * (task_tensors.dim() - weights.dim()))


def _top_k_mask(tensor, k: int):
    """Bool mask (flat) of the k entries of largest |tensor| that ``torch.topk`` keeps."""
    import torch

    from mergekit_fast.methods._task_arithmetic import _ties_rare, _unambiguous_top

    w = tensor.abs().reshape(-1)
    n = w.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=w.device)
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=w.device)
    if _ties_rare(tensor):
        mask = _unambiguous_top(w, k)
        if mask is not None:
            return mask
    keep = torch.zeros(n, dtype=torch.bool, device=w.device)
    keep[torch.topk(w, k=k, largest=True).indices] = True
    return keep


def magnitude_based_pruning(tensor, density: float):
    """``tensor`` times the mask of its ``int(density * numel)`` entries of largest magnitude."""
    k = int(density * tensor.numel())
    return tensor * _top_k_mask(tensor, k).reshape(tensor.shape).to(tensor.dtype)


def _random_mask(tensor, density: float):
    """peft's keep mask (``tensor``'s dtype, 1 = kept): each entry with probability ``density`` rounded to
    that dtype."""
    import torch

    p = torch.full_like(tensor, fill_value=density)
    if _draws == "torch":
        return torch.bernoulli(p)
    from mergekit_fast.methods._task_arithmetic import _draw

    seed = int(torch.randint(0, 2**63 - 1, ()))  # torch's default generator: manual_seed reproduces it
    keep = _draw(float(p.reshape(-1)[0]) if p.numel() else density, seed, "peft", 0, tuple(tensor.shape),
                 tensor.device, fast=True, threads=torch.get_num_threads())  # fmt: skip
    return keep.to(tensor.dtype)


def random_pruning(tensor, density: float, rescale: bool):
    """``tensor`` times a random keep mask of probability ``density``; divided by ``density`` with ``rescale``."""
    pruned = tensor * _random_mask(tensor, density)
    if rescale:
        pruned = pruned / density
    return pruned


def prune(tensor, density: float, method: Literal["magnitude", "random"], rescale: bool = False):
    """peft's ``prune``: ``density >= 1`` warns and returns ``tensor``; a negative density raises."""
    if density >= 1:
        warnings.warn(
            f"The density {density} is greater than or equal to 1, no pruning will be performed.",
            stacklevel=2,
        )
        return tensor
    elif density < 0:
        raise ValueError(f"Density should be >= 0, got {density}")
    if method == "magnitude":
        return magnitude_based_pruning(tensor, density)
    elif method == "random":
        return random_pruning(tensor, density, rescale=rescale)
    raise ValueError(f"Unknown method {method}")


def calculate_majority_sign_mask(tensor, method: Literal["total", "frequency"] = "total"):
    """Bool mask of the entries (task axis first) whose sign is the majority's (0 votes +)."""
    import torch

    sign = tensor.sign()
    if method == "total":
        vote = tensor.sum(dim=0)
    elif method == "frequency":
        vote = sign.sum(dim=0)
    else:
        raise RuntimeError(f'Unimplemented mask method "{method}"')
    return sign == torch.where(vote >= 0, 1, -1)


def disjoint_merge(task_tensors, majority_sign_mask):
    """Sum of the agreeing entries over the task axis, divided by how many agree (at least 1)."""
    import torch

    mixed = (task_tensors * majority_sign_mask).sum(dim=0)
    return mixed / torch.clamp(majority_sign_mask.sum(dim=0), min=1.0)


def _weighted(task_tensors, weights):
    import torch

    stacked = torch.stack(task_tensors, dim=0)
    return stacked, stacked * reshape_weight_task_tensors(stacked, weights)


def task_arithmetic(task_tensors, weights):
    """``sum_i weights[i] * task_tensors[i]``."""
    return _weighted(task_tensors, weights)[1].sum(dim=0)


def magnitude_prune(task_tensors, weights, density: float):
    """Task arithmetic of the magnitude-pruned tensors."""
    return task_arithmetic([prune(t, density, method="magnitude") for t in task_tensors], weights)


def ties(
    task_tensors, weights, density: float, majority_sign_method: Literal["total", "frequency"] = "total"
):
    """Magnitude pruning, sign election on the pruned tensors, disjoint merge of the weighted ones."""
    stacked, weighted = _weighted([prune(t, density, method="magnitude") for t in task_tensors], weights)
    mask = calculate_majority_sign_mask(stacked, method=majority_sign_method)
    return disjoint_merge(weighted, mask)


def dare_linear(task_tensors, weights, density: float):
    """Task arithmetic of the randomly pruned tensors, each rescaled by 1 / density."""
    return task_arithmetic([prune(t, density, method="random", rescale=True) for t in task_tensors], weights)


def dare_ties(
    task_tensors, weights, density: float, majority_sign_method: Literal["total", "frequency"] = "total"
):
    """Random pruning rescaled by 1 / density, sign election, disjoint merge of the weighted tensors."""
    pruned = [prune(t, density, method="random", rescale=True) for t in task_tensors]
    stacked, weighted = _weighted(pruned, weights)
    mask = calculate_majority_sign_mask(stacked, method=majority_sign_method)
    return disjoint_merge(weighted, mask)


# ----------------------------------------------------------------------------- install / uninstall


def _targets():
    try:
        from peft.tuners.lora import model as lora_model
        from peft.utils import merge_utils
    except ImportError as exc:  # pragma: no cover - peft is a test dependency
        raise ImportError("mergekit_fast.integrations.peft.install() needs peft (pip install peft)") from exc
    return [(merge_utils, _UTIL_NAMES), (lora_model, _LORA_NAMES)]


def install(*, draws: str | None = None) -> list[str]:
    """Point peft's merge utilities (and the names ``peft.tuners.lora.model`` imported from them) at these
    functions; returns the names replaced. ``draws``: see ``set_draws``. Calling it again is harmless."""
    if draws is not None:
        set_draws(draws)
    ours = globals()
    done = []
    with _lock:
        for module, names in _targets():
            for name in names:
                if not hasattr(module, name):
                    continue  # another peft version: that name stays peft's
                key = (module.__name__, name)
                if key not in _originals:
                    _originals[key] = getattr(module, name)
                    setattr(module, name, ours[name])
                done.append(f"{module.__name__}.{name}")
    return done


def uninstall() -> None:
    """Restore peft's functions (a name someone else replaced since is left alone)."""
    import sys

    ours = globals()
    with _lock:
        for (module_name, name), original in list(_originals.items()):
            module = sys.modules.get(module_name)
            if module is not None and getattr(module, name, None) is ours[name]:
                setattr(module, name, original)
            del _originals[(module_name, name)]


def is_installed() -> bool:
    """Whether peft's LoRA merges currently compute through these functions."""
    return bool(_originals)
