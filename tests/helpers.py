"""Small helpers shared by the tests."""

from __future__ import annotations

import pytest
import torch

from mergekit_fast import backends

HAS_GPU = torch.cuda.is_available()


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
