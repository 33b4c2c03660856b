"""Cross-checking kernel results against the torch reference.

Errors are measured in ulps of the output dtype, relative to a per-element *scale* that the op
supplies (for SLERP, |c_a a| + |c_b b|: the size of the terms before they cancel). An ulp of the
scale, not of the result, is the right unit: a result near zero that comes from cancelling large
terms carries the rounding error of those terms.
"""

from __future__ import annotations

import torch

from mergekit_fast.ops import verify_requested

MANTISSA_BITS = {torch.float64: 52, torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}
MIN_EXP = {torch.float64: -1022, torch.float32: -126, torch.float16: -14, torch.bfloat16: -126}


class VerificationError(AssertionError):
    """A backend's result disagrees with the torch reference beyond the dtype's tolerance."""


verify_enabled = verify_requested  # verify= or MERGEKIT_FAST_VERIFY=1


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` numbers at |x| (fp64 tensor), subnormal range included."""
    x = x.to(torch.float64).abs()
    _, exp = torch.frexp(x)  # x = m * 2**exp, m in [0.5, 1)
    exp = torch.clamp(exp.to(torch.float64) - 1, min=MIN_EXP[dtype])
    return torch.exp2(exp - MANTISSA_BITS[dtype])


def max_errors(out: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor | None = None):
    """(max abs error, max error in ulps of ``scale`` (default |ref|), NaN masks equal)."""
    o = out.detach().to("cpu", torch.float64).reshape(-1)
    r = ref.detach().to("cpu", torch.float64).reshape(-1)
    s = r.abs() if scale is None else scale.detach().to("cpu", torch.float64).reshape(-1)
    nan_ok = bool(torch.equal(torch.isnan(o), torch.isnan(r)))
    finite = torch.isfinite(o) & torch.isfinite(r)
    inf_ok = (
        bool(torch.equal(o[~finite & ~torch.isnan(o)], r[~finite & ~torch.isnan(r)])) if nan_ok else False
    )
    if not finite.any():
        return 0.0, 0.0, nan_ok and inf_ok
    diff = (o[finite] - r[finite]).abs()
    ulps = diff / ulp(s[finite], out.dtype)
    return float(diff.max()), float(ulps.max()), nan_ok and inf_ok


def check(name: str, out, ref, *, max_ulps: float, scale=None) -> tuple[float, float]:
    """Raise VerificationError naming max abs and max ulp error when ``out`` is not within tolerance."""
    max_abs, max_ulp, masks_ok = max_errors(out, ref, scale)
    if not masks_ok:
        raise VerificationError(f"{name}: NaN/Inf positions differ from the torch reference")
    if max_ulp > max_ulps:
        raise VerificationError(
            f"{name}: disagrees with the torch reference: max abs error {max_abs:.3g}, "
            f"max ulp error {max_ulp:.2f} (tolerance {max_ulps} ulp of {out.dtype})"
        )
    return max_abs, max_ulp
