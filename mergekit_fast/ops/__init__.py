"""Ops: one module per op, each with its public function, its torch reference (<op>_ref),
backend dispatch and verify= cross-checking. This module holds what callers without torch need
(the engine's native CPU path)."""

from __future__ import annotations

import os

# SLERP: tensors up to this many elements go through the segmented (one-launch, single-pass) GPU
# kernels, and the engine merges them in batches.
SLERP_SEGMENT_MAX_NUMEL = 1 << 15
# mergekit's SLERP constants: norms at or below SLERP_EPS count as 1; above SLERP_DOT_THRESHOLD (in
# |cos|) the coefficients are linear.
SLERP_EPS = 1e-8
SLERP_DOT_THRESHOLD = 0.9995


def verify_requested(flag: bool = False) -> bool:
    """verify= asked for, by the caller or by MERGEKIT_FAST_VERIFY=1."""
    return flag or os.environ.get("MERGEKIT_FAST_VERIFY", "") not in ("", "0")


def check_slerp_t(t, where: str = "t") -> float:
    """SLERP's interpolation factor as a float, or a ValueError naming ``where``. As in mergekit 0.1.5,
    any number is taken: values outside [0, 1] extrapolate (t = 1.5 goes half as far again past the
    other model), and a NaN t gives NaN coefficients."""
    try:
        return float(t)
    except (TypeError, ValueError):
        raise ValueError(f"slerp: {where} must be a number, got {t!r}") from None
