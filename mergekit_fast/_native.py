"""Guarded access to the optional native module ``mergekit_fast._C``.

The module is optional at build time and at import time: when it is missing, ``C`` is None and
``import_error()`` says why (the build log's reason when setup.py recorded one).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

try:  # pragma: no cover - depends on the build
    from mergekit_fast import _C as C

    _IMPORT_ERROR: str | None = None
except ImportError as exc:  # pragma: no cover - depends on the build
    C = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

# Keep in sync with csrc/common/dtype.h (mkf::DType).
DTYPE_TAGS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


def build_info() -> dict:
    """What setup.py recorded about the native build (native, cuda, archs, error)."""
    path = Path(__file__).with_name("_build_info.json")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def import_error() -> str | None:
    """Why ``_C`` is unavailable, or None when it imported."""
    if C is not None:
        return None
    recorded = build_info().get("error")
    if recorded:
        return f"native build failed ({recorded})"
    return f"native module not built or not importable ({_IMPORT_ERROR})"


def has_cuda_kernels() -> bool:
    return C is not None and bool(getattr(C, "with_cuda", False))
