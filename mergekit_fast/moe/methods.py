"""Merge methods of the MoE builder, run by the engine like any other method (registered in
mergekit_fast.methods when this module is imported).

- ``moe_concat(inputs, shape, transforms, math_dtypes)``: the output holds the inputs' elements one after
  another, reshaped to ``shape`` -- the transformers-v5 fused expert layout (gate_up_proj: gate_0, up_0,
  gate_1, up_1, ...; down_proj: down_0, down_1, ...) -- with each input's expert transform applied first,
  in that input's own dtype (``math_dtypes`` when the inputs' dtypes differ), as mergekit's
  ``noise_and_scale``: ``x + randn(x) * noise_scale`` (noise drawn in fp32 from a CPU generator seeded per
  input, cast to the input dtype, then scaled in it), then ``* residual_scale``. Without transforms the
  builder uses the generic ``concat`` method, which the engine copies file to file.
- ``moe_constant(inputs=[], value)``: a tensor computed up front (router gate weights, zero biases).

Noise is reproducible with --random-seed (same seed, same model, on any device and in any tensor order)
but is not the same random stream as mergekit's, which draws from torch's global generator in its own
tensor order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergekit_fast import methods
from mergekit_fast.methods.base import BasePolicy, Context, Contract, MergeMethod, Param, Scope


def expert_transform(x: torch.Tensor, noise_scale: float | None, seed: int | None, scale: float | None,
                     math_dtype: torch.dtype | None = None) -> torch.Tensor:  # fmt: skip
    """mergekit's ``noise_and_scale`` on one expert tensor (the result is in the math dtype)."""
    if math_dtype is not None and x.dtype != math_dtype:
        x = x.to(math_dtype)
    if noise_scale is not None:
        gen = torch.Generator().manual_seed(int(seed))
        noise = torch.randn(x.shape, generator=gen, dtype=torch.float32).to(device=x.device, dtype=x.dtype)
        x = x + noise * noise_scale
    if scale is not None:
        x = x * scale
    return x


def moe_concat(inputs: Sequence[torch.Tensor], shape, transforms=None, math_dtypes=None) -> torch.Tensor:
    first = inputs[0]
    out = torch.empty(tuple(shape), dtype=first.dtype, device=first.device)
    flat = out.view(-1)
    offset = 0
    for k, x in enumerate(inputs):
        n = x.numel()
        if transforms is not None:
            noise, seed, scale = transforms[k]
            x = expert_transform(x, noise, seed, scale, math_dtypes[k] if math_dtypes else None)
        flat[offset : offset + n].copy_(x.reshape(-1))
        offset += n
    if offset != flat.numel():
        raise ValueError(
            f"moe_concat: the inputs hold {offset} elements, the output {list(shape)} needs {flat.numel()}"
        )
    return out


def moe_concat_ref(inputs: Sequence[torch.Tensor], shape, transforms=None, math_dtypes=None) -> torch.Tensor:
    """Reference (for --verify): torch.cat of the transformed, flattened inputs."""
    parts = []
    for k, x in enumerate(inputs):
        if transforms is not None:
            noise, seed, scale = transforms[k]
            x = expert_transform(x, noise, seed, scale, math_dtypes[k] if math_dtypes else None)
        parts.append(x.reshape(-1))
    return torch.cat(parts).to(inputs[0].dtype).view(tuple(shape))


_EXACT = {"bfloat16": 0.0, "float16": 0.0, "float32": 0.0, "float64": 0.0}


class MoEConcat(MergeMethod):
    """The fused expert layout with mergekit's per-expert noise and residual scale."""

    name = "moe_concat"
    internal = True
    same_shape = False
    params = (
        Param("shape", tuple, Scope.SHARED),
        Param("transforms", object, Scope.SHARED, None),
        Param("math_dtypes", object, Scope.SHARED, None),
    )
    contract = Contract(BasePolicy.IGNORED, 1, None)
    tolerance = _EXACT

    def compute(self, inputs, params, ctx: Context, out=None):
        r = moe_concat(inputs, **params)
        return r if out is None else out.copy_(r)

    def reference(self, inputs, params, ctx: Context):
        return moe_concat_ref(inputs, **params)


class MoEConstant(MergeMethod):
    """A tensor computed up front (router gate weights, zero biases): no inputs."""

    name = "moe_constant"
    internal = True
    same_shape = False
    params = (Param("value", object, Scope.SHARED),)
    contract = Contract(BasePolicy.IGNORED, 0, 0)
    tolerance = _EXACT

    def reference(self, inputs, params, ctx: Context):
        if inputs:
            raise ValueError("moe_constant takes no inputs")
        return params["value"]  # the value is its own specification


for _m in (MoEConcat(), MoEConstant()):
    if _m.name not in methods.names(internal=True):
        methods.register(_m)
