"""Small helpers shared by the tests."""

from __future__ import annotations

import pytest
import torch

from mergekit_fast import _native, backends

HAS_GPU = torch.cuda.is_available()

# Tests that call mergekit_fast._C directly; they skip, with the reason, on a pure-Python install
# (MERGEKIT_FAST_SKIP_NATIVE=1). Tests that go through a backend use runnable_backends instead.
needs_native = pytest.mark.skipif(
    _native.C is None, reason=f"needs the native module mergekit_fast._C: {_native.import_error()}"
)


def runnable_backends(device: str, implemented=backends.BACKENDS) -> list:
    """pytest params for every backend of an op, skipped (with the reason) where it cannot run."""
    params = []
    for b in implemented:
        why = backends.unavailable_reason(b, torch.device(device))
        marks = [pytest.mark.skip(reason=f"{b}: {why}")] if why else []
        if b in ("cuda",) or (b == "triton" and device == "cuda"):
            marks.append(pytest.mark.gpu)
        params.append(pytest.param(b, marks=marks, id=f"{b}-{device}"))
    return params


# /work/shared/reference/mergekit.md section 2.4: t of the self_attn tensors per layer for the classic
# gradient SLERP config over 32 layers, as mergekit 0.1.5's planner resolves it, rounded to 3 decimals.
DOC_SELF_ATTN = [0, .065, .129, .194, .258, .323, .387, .452, .494, .468, .442, .416, .39, .365, .339, .313,
                 .326, .377, .429, .481, .532, .584, .635, .687, .729, .768, .806, .845, .884, .923, .961, 1.0]  # fmt: skip
