"""Backend selection when the native CUDA kernels have no code for the GPU at hand (mocked GPU)."""

from __future__ import annotations

import logging

import pytest
import torch

from mergekit_fast import _native, backends
from mergekit_fast.backends import BackendUnavailable


@pytest.fixture
def fake_gpu(monkeypatch):
    """A visible GPU of a settable compute capability, and a native build for sm_80/90/100 + PTX 100."""
    cap = {"value": (9, 0)}
    monkeypatch.setattr(backends, "_cuda_available", lambda: True)
    monkeypatch.setattr(_native, "import_error", lambda: None)
    monkeypatch.setattr(_native, "has_cuda_kernels", lambda: True)
    monkeypatch.setattr(_native, "cuda_targets", lambda: (["80", "90", "100"], ["100"]))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: cap["value"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "Fake GPU")
    backends._log_fallback_once.cache_clear()
    yield cap
    backends._log_fallback_once.cache_clear()


@pytest.mark.parametrize("capability", [(8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (10, 3), (12, 0)])
def test_a_gpu_the_build_serves_gets_cuda(fake_gpu, capability):
    fake_gpu["value"] = capability  # sm_8x and 9.x by machine code, 10.x by sm_100, 12.0 by the PTX
    assert backends.select("slerp", torch.device("cuda"), "auto") == "cuda"
    assert backends.select("slerp", torch.device("cuda:0"), "cuda") == "cuda"


def test_a_gpu_the_build_cannot_serve_falls_back_with_the_reason(fake_gpu, caplog):
    fake_gpu["value"] = (7, 5)
    with caplog.at_level(logging.WARNING, logger="mergekit_fast"):
        for _ in range(3):
            chosen = backends.select("slerp", torch.device("cuda"), "auto", implemented=("cuda", "torch"))
            assert chosen == "torch"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, "the fallback is logged once"
    msg = warnings[0].getMessage()
    assert "Fake GPU" in msg and "compute capability 7.5" in msg
    assert "sm_80, sm_90, sm_100 and PTX compute_100" in msg and "MERGEKIT_FAST_CUDA_ARCHS=75" in msg


def test_an_explicit_cuda_backend_on_such_a_gpu_raises_the_reason(fake_gpu):
    fake_gpu["value"] = (7, 5)
    with pytest.raises(BackendUnavailable, match=r"compute capability 7\.5: built for sm_80"):
        backends.select("slerp", torch.device("cuda"), "cuda")


def test_capability_rules():
    reason = backends.cuda_code_reason
    assert reason((8, 6), ["80"], []) is None  # same major, newer minor: the sm_80 code runs
    assert reason((9, 0), ["80"], []) is not None  # another major needs PTX
    assert reason((9, 0), ["80"], ["80"]) is None  # ... which the driver compiles for 9.0
    assert reason((7, 5), ["80"], ["80"]) is not None  # PTX never runs on an older GPU
    assert reason((9, 0), ["90a"], []) is None and reason((9, 1), ["90a"], []) is not None
    assert "no PTX" in reason((12, 0), ["80", "90"], [])
