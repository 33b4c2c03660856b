"""Guarded access to the optional native module ``mergekit_fast._C``, and the facts of its build.

The module is optional at build time (MERGEKIT_FAST_SKIP_NATIVE=1) and at import time: when it is
missing, ``C`` is None and ``import_error()`` says why. Two sources describe a build:
  * the module itself: ``C.build_info()``, the facts setup.py compiled into it (CPU levels, CUDA
    targets, a build id); they describe the module that actually imported;
  * the build record, ``_build_info.json`` beside it, written by the same build into the build
    output (so it travels inside wheels). It is what remains to say why when no module imports.
``record_status()`` compares the two.
"""

from __future__ import annotations

import json
from array import array
from pathlib import Path

from mergekit_fast import dtypes

RECORD = Path(__file__).with_name("_build_info.json")

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


def build_record() -> dict | None:
    """The build record (_build_info.json) beside the package, or None when there is none."""
    try:
        return json.loads(RECORD.read_text())
    except (OSError, ValueError):
        return None


def module_facts() -> dict | None:
    """The facts compiled into the importable module, or None when it does not import."""
    if C is None or not hasattr(C, "build_info"):
        return None
    return C.build_info()


def build_info() -> dict:
    """What is known of the native build here: the module's own facts when it imports, else the
    record's (``native`` False with a ``reason`` for a pure-Python build), else {}."""
    return module_facts() or build_record() or {}


def record_status() -> tuple[bool | None, str]:
    """(agrees, description): whether the build record describes the importable module.

    ``agrees`` is None when there is nothing to compare (no module, or no record)."""
    rec, facts = build_record(), module_facts()
    if facts is None:
        if rec is None:
            return None, "no build record"
        return None, "the build record describes a build whose module is not importable here"
    if rec is None:
        return None, f"no build record beside the module (build {facts.get('build_id')})"
    if rec.get("native") and rec.get("build_id") == facts.get("build_id"):
        return True, "the build record agrees"
    what = f"build {rec['build_id']}" if rec.get("native") else "a pure-Python build"
    return False, (
        f"the build record describes {what}, not the module that imports (build {facts.get('build_id')}):"
        " a stale file from another build; the module's own facts are shown"
    )


def import_error() -> str | None:
    """Why ``_C`` is unavailable, or None when it imported."""
    if C is not None:
        return None
    rec = build_record()
    if rec is not None and not rec.get("native"):
        return f"the native module was not built ({rec.get('reason') or 'no reason recorded'})"
    if rec is not None:
        return (
            f"the native module (build {rec.get('build_id')}) was built but does not import ({_IMPORT_ERROR})"
        )
    return f"native module not built or not importable ({_IMPORT_ERROR}); no build record"


def cpu_isa() -> dict | None:
    """The CPU kernels' instruction-set levels: {compiled, supported, in_use}; None without _C.

    ``in_use`` is replaced by an ``error`` when MERGEKIT_FAST_CPU_ISA holds an unknown value."""
    if C is None or not hasattr(C, "cpu_isa"):
        return None
    try:
        return dict(C.cpu_isa())
    except ValueError as exc:
        return {"error": str(exc)}


def cuda_targets() -> tuple[list[str], list[str]] | None:
    """(machine-code archs, PTX archs) the module's CUDA kernels were built for, e.g.
    (['80', '90', '100'], ['100']); None when the module has no CUDA kernels or does not say."""
    if not has_cuda_kernels():
        return None
    cuda = (module_facts() or {}).get("cuda") or {}
    if not cuda.get("built") or "sass" not in cuda:
        return None
    return list(cuda["sass"]), list(cuda.get("ptx") or [])


def parse_arch(arch: str) -> tuple[int, int, str]:
    """A CUDA target as the build names it -> (major, minor, suffix): '86' -> (8, 6, ''),
    '100' -> (10, 0, ''), '90a' -> (9, 0, 'a')."""
    num = arch.rstrip("af")
    return int(num) // 10, int(num) % 10, arch[len(num) :]


def describe_cuda_targets(sass: list[str], ptx: list[str]) -> str:
    """'sm_80, sm_90, sm_100 and PTX compute_100 (for compute capability 10.0 and newer)'."""
    out = ", ".join(f"sm_{a}" for a in sass) or "no machine code"
    if ptx:
        lows = ", ".join("{}.{}".format(*parse_arch(a)[:2]) for a in ptx)
        out += f" and PTX compute_{', compute_'.join(ptx)} (for compute capability {lows} and newer)"
    else:
        out += ", no PTX"
    return out


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
