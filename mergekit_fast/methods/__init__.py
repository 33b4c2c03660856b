"""Merge methods as small functions over the ops.

Each method takes the input tensors of one output tensor (already cast to the plan's in_dtype, on
the compute device) and its resolved parameters, and returns the merged tensor in in_dtype.
Semantics are mergekit 0.1.5's (merge_methods/{linear,passthrough,slerp}.py). SLERP is batched
across tensors (``slerp_many``); linear and passthrough are single torch expressions that are
already memory-bound and equal mergekit's bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from mergekit_fast.ops.slerp import slerp_batched

# name -> fn(inputs, **params) for the methods the engine runs one tensor at a time. SLERP runs
# through ``slerp_many`` (batched) instead. Other modules (the MoE builder) register their own.
REGISTRY: dict[str, Callable[..., torch.Tensor]] = {}


def register(name: str):
    def deco(fn):
        if name in REGISTRY:
            raise ValueError(f"merge method {name!r} is already registered")
        REGISTRY[name] = fn
        return fn

    return deco


def apply(method: str, inputs: Sequence[torch.Tensor], params: dict) -> torch.Tensor:
    """Run a registered method on one output tensor's inputs."""
    if method == "slerp":
        return slerp_many([params["t"]], [inputs[0]], [inputs[1]])[0]
    fn = REGISTRY.get(method)
    if fn is None:
        raise ValueError(f"unknown merge method {method!r}")
    return fn(inputs, **params)


@register("linear")
def _linear_method(inputs, weights, normalize=True):
    return linear(inputs, weights, normalize)


@register("passthrough")
def _passthrough_method(inputs, scale=None):
    return passthrough(inputs[0], scale)


@register("concat")
def _concat_method(inputs, shape):
    """The inputs' elements one after another, reshaped to ``shape`` (the engine copies it file to file
    when no dtype changes)."""
    return torch.cat([x.reshape(-1) for x in inputs]).view(tuple(shape))


def linear(tensors: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool = True) -> torch.Tensor:
    """Weighted sum with fp32 accumulation (fp64 for fp64 inputs), divided by sum(weights) if normalize."""
    first = tensors[0]
    if not first.is_floating_point():
        raise TypeError("linear merging requires floating-point tensors")
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    # mergekit holds the weights as a float32 tensor and accumulates with addcmul_: do the same,
    # so the result is bit-identical.
    w = torch.tensor(list(weights), dtype=torch.float32, device=first.device).to(dtype)
    result = torch.zeros_like(first, dtype=dtype)
    for tensor, coefficient in zip(tensors, w.unbind(0)):
        result.addcmul_(tensor, coefficient)
    if normalize:
        result.div_(w.sum())
    return result.to(first.dtype)


def passthrough(tensor: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """The input unchanged, or multiplied by ``scale`` in its own dtype."""
    return tensor if scale is None else tensor * scale


def slerp_many(ts: Sequence[float], bases: Sequence[torch.Tensor], others: Sequence[torch.Tensor], *,
               backend: str = "auto", outs: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:  # fmt: skip
    """SLERP of many (base, other) pairs in as few kernel launches as possible."""
    return slerp_batched(list(ts), list(bases), list(others), backend=backend, outs=outs)
