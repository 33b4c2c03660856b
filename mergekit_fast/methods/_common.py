"""Helpers shared by the method files (a private module: not loaded as a merge method).

Nothing here imports torch at import time.
"""

from __future__ import annotations

from mergekit_fast.methods.base import Planned, passthrough_of


def with_float32(dtype):
    """torch.promote_types(dtype, float32) for a floating-point ``DType``: 16-bit and 8-bit floats become
    float32, float32 and float64 stay. The dtype mergekit's kernels produce where an fp32 tensor (a mask,
    a per-model factor) multiplies the input-dtype values."""
    from mergekit_fast import dtypes

    return dtype if dtype.itemsize >= 4 else dtypes.BY_NAME["float32"]


def base_only(planned: Planned | None) -> Planned | None:
    """A plan whose only input is the base becomes a copy of the base (mergekit's kernels return the base
    tensor itself when no other model has the weight); any other plan is returned unchanged."""
    if (
        planned is not None
        and planned.method != "passthrough"
        and planned.has_base
        and len(planned.inputs) == 1
    ):
        return passthrough_of(planned.inputs[0])
    return planned


def abs_sum(inputs):
    """Sum of |x_i| in float64: the magnitude of the terms a method combines, the scale at which --verify
    measures its error (a result that cancels large terms carries their rounding error)."""
    import torch

    total = None
    for x in inputs:
        a = x.to(torch.float64).abs()
        total = a if total is None else total.add_(a)
    return total


def shared(planned: Planned, convert: dict) -> tuple[tuple[str, object], ...]:
    """The planned parameters with each value converted by ``convert[name]`` (float, bool, int, ...);
    parameters not named in ``convert`` are dropped."""
    p = dict(planned.params)
    return tuple((name, fn(p[name])) for name, fn in convert.items())


class Pointwise:
    """The torch-free path of a pointwise method (csrc/combine/pointwise_cpu.cpp): a native kernel that
    takes the base and the models by address and returns whether every output is finite. A mixin (before
    MergeMethod in the bases): the method names its kernel (``kernel``), whether it takes one model
    (``one_model``: base and x) or a table of them, whether it also writes the promoted result dtype
    (``promotes``), the most models it serves per dtype (``model_limit``) and its scalar arguments
    (``kernel_args``)."""

    kernel: str = ""
    one_model = False  # the kernel's arguments: (base, x) instead of (count, base, table of models)
    promotes = False  # the kernel takes an output dtype: the input's or the promoted result's

    def model_limit(self, dtype_name: str) -> int:
        """The most models besides the base the kernel serves (csrc/combine/combine.h kCombineMaxInputs)."""
        return 8

    def kernel_args(self, params: dict) -> tuple:
        raise NotImplementedError

    def _kernel(self):
        from mergekit_fast import _native

        return getattr(_native.C, self.kernel, None) if _native.C is not None else None

    def native_ok(self, tensor) -> bool:
        return (
            self._kernel() is not None
            and tensor.in_dtype.native is not None
            and 2 <= len(tensor.inputs) <= 1 + self.model_limit(tensor.in_dtype.name)
        )

    def native_writes(self, tensor) -> bool:
        """The kernel writes the input dtype, or (``promotes``) the promoted result dtype."""
        return tensor.out_dtype == tensor.in_dtype or (
            self.promotes and tensor.out_dtype == self.result_dtype(tensor.in_dtype, dict(tensor.params))
        )

    def run_native(
        self, tag: int, out_tag: int, numel: int, ptrs, out: int, params: dict, threads: int
    ) -> bool:
        """The kernel on one tensor: ``ptrs`` the base, then the models (addresses of ``numel`` elements of
        dtype ``tag``); the result, in dtype ``out_tag``, at ``out``."""
        from array import array

        if numel == 0:
            return True
        kernel, args = self._kernel(), self.kernel_args(params)
        if self.one_model:
            return bool(kernel(tag, numel, ptrs[0], ptrs[1], out, *args, threads))
        xs = array("Q", ptrs[1:])
        lead = (tag, out_tag) if self.promotes else (tag,)
        return bool(kernel(*lead, numel, len(ptrs) - 1, ptrs[0], xs.buffer_info()[0], out, *args, threads))

    def native_cpu(self, tensors, inputs, outs, threads, seed=None):
        import math

        flags = []
        for t, ins, out in zip(tensors, inputs, outs):
            n = math.prod(t.shape)
            flags.append(self.run_native(t.in_dtype.native, t.out_dtype.native, n, list(ins), out, dict(t.params),
                                         threads))  # fmt: skip
        return flags

    def compute(self, inputs, params, ctx, out=None):
        """CPU tensors of one dtype: the native kernel (the reference's bits); else the reference."""
        from mergekit_fast import _native, dtypes
        from mergekit_fast.ops.gram import native_ready

        if self._kernel() is None or not native_ready(inputs, ctx.backend):
            return super().compute(inputs, params, ctx, out)
        import torch

        x0 = inputs[0]
        dt = dtypes.of(x0.dtype)
        if not 2 <= len(inputs) <= 1 + self.model_limit(dt.name):
            return super().compute(inputs, params, ctx, out)
        want = self.result_dtype(dt, params).torch  # the input dtype, or the promoted one with ``promotes``
        if out is not None and out.is_contiguous() and out.dtype in (x0.dtype, want):
            result = out  # a 16-bit out of a promoted result: the fp32 value rounded once, as out.copy_ does
        else:
            result = torch.empty(x0.shape, dtype=want)
        ptrs = [x.data_ptr() for x in inputs]
        self.run_native(dt.native, _native.dtype_tag(result.dtype), x0.numel(), ptrs, result.data_ptr(), params,
                        ctx.threads)  # fmt: skip
        if out is not None and result is not out:
            return out.copy_(result)
        return result
