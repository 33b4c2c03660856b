"""Guarded access to the optional native module ``mergekit_fast._C``.

The module is optional at build time and at import time: when it is missing, ``C`` is None and
``import_error()`` says why (the build log's reason when setup.py recorded one).
"""

from __future__ import annotations

import json
from array import array
from pathlib import Path

from mergekit_fast import dtypes

try:  # pragma: no cover - depends on the build
    from mergekit_fast import _C as C

    _IMPORT_ERROR: str | None = None
except ImportError as exc:  # pragma: no cover - depends on the build
    C = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"


def dtype_tag(dtype) -> int:
    """The native kernels' tag (csrc/common/dtype.h, mkf::DType) of a DType or torch dtype."""
    tag = dtypes.of(dtype).native
    if tag is None:
        raise ValueError(f"the native kernels do not take {dtype}")
    return tag


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


def slerp_cpu_many(tag: int, ts, a_ptrs, b_ptrs, out_ptrs, numels, eps: float, thr: float, threads: int = 0):
    """SLERP of tensor pairs given by address, all of one dtype, in one native call (no torch).

    ``tag`` is ``dtype_tag(dtype)``; ``threads`` 0 uses every core. The caller has validated the
    pointers and keeps the memory alive.
    """
    if len(ts) == 1:
        C.slerp_cpu(tag, a_ptrs[0], b_ptrs[0], out_ptrs[0], numels[0], ts[0], eps, thr, threads)
        return
    tables = [
        array("Q", a_ptrs),
        array("Q", b_ptrs),
        array("Q", out_ptrs),
        array("q", numels),
        array("d", ts),
    ]
    a, b, o, n, t = (x.buffer_info()[0] for x in tables)
    C.slerp_batched_cpu(tag, len(ts), a, b, o, n, t, eps, thr, threads)


def has_cuda_kernels() -> bool:
    return C is not None and bool(getattr(C, "with_cuda", False))
