"""nuslerp: spherical interpolation of two models by their weights (mergekit 0.1.5 merge_methods/nuslerp.py).

``weight`` (per model other than the base, required) gives t = w_1 / (w_0 + w_1), or 0.5 when
|w_0 + w_1| < 1e-6; t = 0 is the first model, t = 1 the second; weights of any sign are accepted, so t
may fall outside [0, 1] (extrapolation, as in mergekit). With a base_model the two task vectors
x_i - base are interpolated and the base added back; without one, the models themselves.

The interpolation normalises each vector by max(|v|, 1e-7), takes cos = u_0.u_1 clamped to [-1, 1] and
theta = acos(cos); the result is (sin((1 - t) theta) v_0 + sin(t theta) v_1) / sin(theta) on the
unnormalised vectors, or the lerp (1 - t) v_0 + t v_1 where the vectors are colinear (1 - cos^2 <=
1e-16: there is no 0.9995 threshold, unlike slerp). ``nuslerp_flatten`` (default true) makes the whole
tensor one vector; otherwise each row along the last dimension is one, or with ``nuslerp_row_wise``
each column (the vectors run along dim 0). Computed in the input dtype (no fp32 upcast), as in
mergekit. An optional weight only one model has is copied from it.
"""

from __future__ import annotations

from mergekit_fast.methods._common import abs_sum
from mergekit_fast.methods.base import (
    BasePolicy,
    Context,
    Contract,
    MergeMethod,
    OptionalPolicy,
    Param,
    Planned,
    Scope,
)

_COLINEAR_EPS = 1e-8  # vectors count as colinear where 1 - cos^2 <= _COLINEAR_EPS**2
_NORM_EPS = 1e-7  # the norm a vector is divided by is at least this


def interpolation_t(weights) -> float:
    """The interpolation factor of the two models' weights (Python float arithmetic, as mergekit)."""
    total = sum(weights)
    return 0.5 if abs(total) < 1e-6 else weights[1] / total


def nuslerp(t: float, v0, v1, *, row_wise: bool = False, flatten: bool = True):
    """Spherical interpolation of v0 (t = 0) and v1 (t = 1), in their dtype (see the module docstring)."""
    import torch

    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    u0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=_NORM_EPS)
    u1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=_NORM_EPS)
    cos = torch.sum(u0 * u1, dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= _COLINEAR_EPS**2
    # the angle of a colinear pair is taken at cos = 0 so that the unused branch stays finite
    theta = torch.acos(torch.where(colinear, 0, cos))
    spherical = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    out = torch.where(colinear, (1 - t) * v0 + t * v1, spherical)
    if row_wise and not flatten:
        out = out.transpose(0, -1)
    return out.reshape(shape)


# The native kernel's sums are exact (fp64). torch's sum of a bf16 tensor (the dot's
# `torch.sum(u0 * u1)`) is not the fp32 sum of its terms rounded once beyond 2^15 elements (measured:
# about a quarter of the sums of 2^16 to 2^19 terms round to the neighbouring bf16 value), and a dot an
# ulp off moves every element: longer vectors take torch's sums (Nuslerp._between_torch_sums), which
# reproduces mergekit's bits.
_NATIVE_MAX_VECTOR = 1 << 15


def _native_rows(shape, params) -> int | None:
    """The native kernel's row length for this tensor (0: the whole tensor), or None where it does not
    serve it (columns, a 0-d tensor, vectors longer than _NATIVE_MAX_VECTOR)."""
    import math

    if len(shape) == 0 or (params.get("row_wise", False) and not params.get("flatten", True)):
        return None
    row_len = 0 if params.get("flatten", True) or len(shape) < 2 else shape[-1]
    return row_len if (row_len or math.prod(shape)) <= _NATIVE_MAX_VECTOR else None


def _run_native(dtype, ptrs: list[int], out: int, numel: int, row_len: int, t: float, threads: int) -> int:
    """ptrs: the base (optional) and the two models, in the planned order."""
    from array import array

    from mergekit_fast import _native

    base = ptrs[0] if len(ptrs) == 3 else 0
    x0, x1 = ptrs[-2:]
    table = array("Q", [x0, x1, base, out])
    return _native.C.nuslerp_cpu(
        _native.dtype_tag(dtype), table.buffer_info()[0], numel, row_len, float(t), threads
    )


class Nuslerp(MergeMethod):
    name = "nuslerp"
    description = "spherical interpolation of two models (or their task vectors) at t = w_1 / (w_0 + w_1)"
    params = (
        Param("weight", float, Scope.NON_BASE, doc="the model's weight; t = w_1 / (w_0 + w_1)"),
        Param("nuslerp_row_wise", bool, Scope.SHARED, False, doc="interpolate the columns (along dim 0)"),
        Param("nuslerp_flatten", bool, Scope.SHARED, True, doc="interpolate the whole tensor as one vector"),
    )
    contract = Contract(BasePolicy.OPTIONAL, 1, None, min_non_base=2, max_non_base=2,
                        hint=" (two models to interpolate, plus an optional base_model)")  # fmt: skip
    optional_policy = OptionalPolicy.PASSTHROUGH_SINGLETON
    # CPU: 16-bit tensors run natively (compute), with the reference's ops in the dtype; their sums are
    # exact in fp64 where torch's are fp32, which can round a norm or the dot to the neighbouring value
    # of the dtype, and torch's vectorised sin/acos (Sleef) can differ from libm's by an fp32 ulp: the
    # angle, so the coefficients, move by an ulp of the dtype. On another device the input-dtype norms
    # and the dot product round differently, with the same effect.
    tolerance = {"bfloat16": 2.0, "float16": 2.0, "float32": 4.0, "float64": 4.0}

    def plan(self, group):
        planned = super().plan(group)
        if planned is None or planned.method != self.name:
            return planned
        p = dict(planned.params)
        weights = tuple(float(w) for w in p["weight"])
        params = (
            ("t", interpolation_t(weights)),
            ("weights", weights),
            ("row_wise", bool(p["nuslerp_row_wise"])),
            ("flatten", bool(p["nuslerp_flatten"])),
        )
        return Planned(self.name, planned.inputs, params, planned.has_base)

    def reference(self, inputs, params, ctx: Context):
        t, kw = params["t"], {"row_wise": params["row_wise"], "flatten": params["flatten"]}
        if len(inputs) == 3:  # base, then the two models: interpolate the task vectors
            base, x0, x1 = inputs
            return base + nuslerp(t, x0 - base, x1 - base, **kw)
        return nuslerp(t, inputs[0], inputs[1], **kw)

    def compute(self, inputs, params, ctx: Context, out=None):
        """16-bit CPU tensors: the native kernel (nuslerp_cpu: the norms from the gram op, the dot of
        the normalised vectors, the interpolation, each a pass, op by op in the dtype as torch computes
        them) for vectors up to _NATIVE_MAX_VECTOR elements; a longer whole tensor, native passes
        between torch's sums (_between_torch_sums); anything else (columns): the reference."""
        from mergekit_fast import _native
        from mergekit_fast.ops.gram import native_ready

        row_len = _native_rows(inputs[0].shape, params)
        if (
            inputs[0].itemsize != 2
            or not native_ready(inputs, ctx.backend)
            or not hasattr(_native.C, "nuslerp_cpu")
        ):
            return super().compute(inputs, params, ctx, out)
        if row_len is None:
            if params.get("flatten", True) and inputs[0].dim() > 0:
                return self._between_torch_sums(inputs, params, ctx, out)
            return super().compute(inputs, params, ctx, out)
        import torch

        result = out if out is not None and out.is_contiguous() and out.dtype == inputs[0].dtype else None
        result = torch.empty_like(inputs[0]) if result is None else result
        ptrs = [x.data_ptr() for x in inputs]
        _run_native(
            inputs[0].dtype, ptrs, result.data_ptr(), inputs[0].numel(), row_len, params["t"], ctx.threads
        )
        if out is not None and result is not out:
            return out.copy_(result)
        return result

    @staticmethod
    def _between_torch_sums(inputs, params, ctx: Context, out=None):
        """A whole 16-bit tensor longer than _NATIVE_MAX_VECTOR: the reference's norms and dot product
        are torch's, on the very vectors it reduces; the elementwise steps between them are three native
        passes (csrc/gram/apply_cpu.cpp, nuslerp_pass_cpu: the task vectors, the dot's terms, the
        interpolation plus the base) and the coefficients torch's ops on one-element tensors, as in the
        reference: mergekit's bits, without the reference's dozen full-size temporaries."""
        import torch

        from mergekit_fast.ops.gram import native_pass

        t = params["t"]
        base = inputs[0] if len(inputs) == 3 else None
        x0, x1 = inputs[-2:]
        numel, dtype = x0.numel(), x0.dtype

        def native(step: int, tensors, scalars=()) -> int:
            return native_pass("nuslerp_pass_cpu", tensors, numel, step, scalars, threads=ctx.threads)

        if base is not None:
            v0, v1 = torch.empty(numel, dtype=dtype), torch.empty(numel, dtype=dtype)
            native(0, [x0, x1, base, v0, v1])  # x_i - base
        else:
            v0, v1 = x0.reshape(-1), x1.reshape(-1)
        n0 = torch.norm(v0, dim=-1, keepdim=True).clamp(min=_NORM_EPS)
        n1 = torch.norm(v1, dim=-1, keepdim=True).clamp(min=_NORM_EPS)
        terms = torch.empty(numel, dtype=dtype)
        native(1, [v0, v1, terms], [n0.item(), n1.item()])  # u0 * u1
        cos = torch.sum(terms, dim=-1, keepdim=True).clamp(-1, 1)
        colinear = (1 - cos.square()) <= _COLINEAR_EPS**2
        theta = torch.acos(torch.where(colinear, 0, cos))
        sines = (torch.sin((1 - t) * theta), torch.sin(t * theta), torch.sin(theta))
        usable = out is not None and out.is_contiguous() and out.dtype == dtype
        result = out if usable else torch.empty_like(x0)
        native(
            2, [v0, v1, base, result], [float(bool(colinear.item())), *(s.item() for s in sines), 1 - t, t]
        )
        if out is not None and result is not out:
            return out.copy_(result)
        return result

    def native_ok(self, tensor) -> bool:
        """The torch-free path serves 16-bit tensors interpolated whole or by rows (not by columns)."""
        from mergekit_fast import _native

        return (
            _native.C is not None
            and hasattr(_native.C, "nuslerp_cpu")
            and tensor.in_dtype.itemsize == 2
            and _native_rows(tuple(tensor.shape), dict(tensor.params)) is not None
        )

    @staticmethod
    def native_cpu(tensors, inputs, outs, threads, seed=None):
        """nuslerp by address (csrc/gram/apply_cpu.cpp, nuslerp_cpu), without torch."""
        import math

        flags = []
        for t, ins, out in zip(tensors, inputs, outs):
            p = dict(t.params)
            bad = _run_native(t.in_dtype, list(ins), out, math.prod(t.shape), _native_rows(tuple(t.shape), p), p["t"],
                              threads)  # fmt: skip
            flags.append(bad == 0)
        return flags

    def verify_scale(self, inputs, params):
        # the coefficients are at most 1 / sin(theta) in size; with t in [0, 1] the terms are bounded by
        # the inputs (and the base added back); the sum of magnitudes is the scale of the terms.
        return abs_sum(inputs) * max(1.0, abs(params["t"]), abs(1 - params["t"]))


METHOD = Nuslerp()
