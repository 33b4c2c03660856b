"""slerp: spherical interpolation of the base and one other model, one angle per whole tensor.

mergekit 0.1.5 (merge_methods/slerp.py): ``t`` (shared, required) interpolates from the base (t = 0)
to the other model (t = 1); values outside [0, 1] extrapolate, as in mergekit. The math is the SLERP
op's (``mergekit_fast.ops.slerp``): fp32 coefficients (fp64 for fp64 inputs) from fp64 sums, lerp
when |cos| > 0.9995, result in the input dtype. An optional weight only one model has is copied.
"""

from __future__ import annotations

import math

from mergekit_fast.methods.base import (
    BasePolicy,
    Context,
    Contract,
    MergeMethod,
    OptionalPolicy,
    Param,
    Scope,
)
from mergekit_fast.ops import SLERP_DOT_THRESHOLD, SLERP_EPS, SLERP_SEGMENT_MAX_NUMEL, check_slerp_t


class Slerp(MergeMethod):
    name = "slerp"
    description = "spherical interpolation from the base (t = 0) to the other model (t = 1), per tensor"
    params = (Param("t", float, Scope.SHARED, doc="interpolation factor"),)
    contract = Contract(BasePolicy.REQUIRED, 2, 2, hint=" (the base_model and exactly one other model)")
    optional_policy = OptionalPolicy.PASSTHROUGH_SINGLETON
    batch_max_numel = SLERP_SEGMENT_MAX_NUMEL
    finite_probe = "first"  # a NaN/Inf input makes the coefficients, hence every element, NaN

    @property
    def tolerance(self):
        from mergekit_fast.ops.slerp import MAX_ULPS

        return {str(k).replace("torch.", ""): v for k, v in MAX_ULPS.items()}

    def plan(self, group):
        planned = super().plan(group)
        if planned is None or planned.method != self.name:
            return planned
        return type(planned)(planned.method, planned.inputs, (("t", float(group.shared["t"])),), True)

    def reference(self, inputs, params, ctx: Context):
        from mergekit_fast.ops.slerp import slerp_ref

        return slerp_ref(params["t"], inputs[0], inputs[1])

    def compute(self, inputs, params, ctx: Context, out=None):
        return self.compute_many([inputs], [params], [ctx], None if out is None else [out])[0]

    def compute_many(self, inputs_list, params_list, ctxs, outs=None):
        from mergekit_fast.ops.slerp import slerp_batched

        backend = ctxs[0].backend if ctxs else "auto"
        return slerp_batched([p["t"] for p in params_list], [i[0] for i in inputs_list],
                             [i[1] for i in inputs_list], backend=backend, outs=outs)  # fmt: skip

    def verify_scale(self, inputs, params):
        import torch

        from mergekit_fast.ops.slerp import slerp_ref_coefficients

        ca, cb = slerp_ref_coefficients(params["t"], inputs[0], inputs[1])
        if not math.isfinite(ca):
            return None
        cdt = torch.float64 if inputs[0].dtype == torch.float64 else torch.float32
        return abs(ca) * inputs[0].to(cdt).abs() + abs(cb) * inputs[1].to(cdt).abs()

    # streamed: the sums over 2^20-element chunks (the blocks the reference and the C++ kernel add in
    # order, so a streamed tensor gets the coefficients of a whole one), then the interpolation
    stream_passes = 2
    stream_align = 1 << 20

    def stream_begin(self, t, params, ctx):
        from mergekit_fast import _native, backends

        try:
            native = backends.select("slerp", "cpu", ctx.backend) == "cpp" and _native.C is not None
        except (backends.BackendUnavailable, ValueError):
            native = False
        return {"partials": [], "native": native and t.in_dtype.native is not None}

    def stream_reduce(self, state, inputs, start, params, ctx):
        import torch

        a, b = inputs
        if state["native"] and a.device.type == "cpu":
            from mergekit_fast import _native

            n = a.numel()
            buf = torch.empty(3 * (-(-n // _native.C.slerp_block)), dtype=torch.float64)
            _native.C.slerp_block_sums_cpu(_native.dtype_tag(a.dtype), a.data_ptr(), b.data_ptr(), n,
                                           buf.data_ptr(), ctx.threads)  # fmt: skip
            state["partials"].append(buf.view(-1, 3))
            return
        from mergekit_fast.ops.slerp import _sums_ref

        step = 1 << 20  # the reference's chunks
        rows = [_sums_ref(a[s : s + step], b[s : s + step]) for s in range(0, a.numel(), step)]
        state["partials"].append(torch.tensor(rows, dtype=torch.float64).view(-1, 3))

    def stream_between(self, state, params, ctx):
        from mergekit_fast.ops.slerp import slerp_coefficients

        saa = sbb = sab = 0.0
        for part in state["partials"]:
            for x, y, z in part.tolist():  # in order, as the whole-tensor sums add their blocks
                saa += x
                sbb += y
                sab += z
        state["coefficients"] = slerp_coefficients(
            saa, sbb, sab, float(params["t"]), SLERP_EPS, SLERP_DOT_THRESHOLD
        )

    def stream_apply(self, state, inputs, start, params, ctx, out):
        import torch

        a, b = inputs
        ca, cb = state["coefficients"]
        if state["native"] and a.device.type == "cpu":
            from mergekit_fast import _native

            _native.C.slerp_lerp_cpu(_native.dtype_tag(a.dtype), a.data_ptr(), b.data_ptr(), out.data_ptr(),
                                     a.numel(), ca, cb, ctx.threads)  # fmt: skip
            return out
        cdt = torch.float64 if a.dtype == torch.float64 else torch.float32
        from mergekit_fast.ops.slerp import _round_to

        ca, cb = _round_to(ca, cdt), _round_to(cb, cdt)
        return out.copy_((ca * a.to(cdt) + cb * b.to(cdt)).to(a.dtype))

    @staticmethod
    def native_cpu(tensors, inputs, outs, threads, seed=None):
        """SLERP by the C++ kernel on mapped memory, one call for all tensors (all of one dtype)."""
        from mergekit_fast import _native

        _native.slerp_cpu_many(
            tensors[0].in_dtype.native, [check_slerp_t(dict(t.params)["t"], f"t of {t.name}") for t in tensors],
            [a for a, _ in inputs], [b for _, b in inputs], outs, [math.prod(t.shape) for t in tensors],
            SLERP_EPS, SLERP_DOT_THRESHOLD, threads,
        )  # fmt: skip


METHOD = Slerp()
