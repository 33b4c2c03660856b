"""Which backends exist here, and which one an op call gets.

Backends, fastest first for their device:
  cuda    native CUDA kernels in mergekit_fast._C (CUDA tensors)
  triton  Triton kernels (CUDA tensors; CPU tensors only under TRITON_INTERPRET=1)
  cpp     native C++ CPU kernels in mergekit_fast._C (CPU tensors)
  torch   the plain torch reference (any device): the oracle and the last fallback

``backend="auto"`` (or MERGEKIT_FAST_BACKEND) picks the first available backend for the tensors'
device and logs once why a faster one was skipped. A backend named explicitly that cannot run
raises ``BackendUnavailable``: never a silent fallback. A device is a torch.device or its type
("cpu", "cuda"); choosing a CPU backend does not import torch.

The cuda backend also needs code for the GPU at hand: the native build holds machine code for
some compute capabilities and PTX for others (``cuda_code_reason``); a GPU it cannot serve makes
``auto`` fall back and an explicit ``cuda`` raise, both with the reason.
"""

from __future__ import annotations

import functools
import logging
import os

from mergekit_fast import _native

log = logging.getLogger("mergekit_fast")

BACKENDS = ("cuda", "triton", "cpp", "torch")
ENV_BACKEND = "MERGEKIT_FAST_BACKEND"


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run here."""


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


@functools.cache
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means "unavailable"
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    return None


def triton_version() -> str | None:
    if _triton_import_error() is not None:
        return None
    import triton

    return triton.__version__


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _runs_on(arch: str, cap: tuple[int, int], ptx: bool) -> bool:
    major, minor, suffix = _native.parse_arch(arch)
    if suffix == "a":  # architecture-specific code: that exact capability only
        return cap == (major, minor)
    if ptx and not suffix:  # PTX is compiled by the driver for this GPU: any newer capability
        return cap >= (major, minor)
    return cap[0] == major and cap[1] >= minor  # machine code (and family PTX): same major, newer minor


def cuda_code_reason(capability: tuple[int, int], sass: list[str], ptx: list[str]) -> str | None:
    """None when CUDA code built for ``sass`` (machine code) and ``ptx`` runs on a GPU of
    ``capability`` (major, minor), else why not."""
    cap = (int(capability[0]), int(capability[1]))
    if any(_runs_on(a, cap, ptx=False) for a in sass) or any(_runs_on(a, cap, ptx=True) for a in ptx):
        return None
    return (
        f"the native CUDA kernels have no code for compute capability {cap[0]}.{cap[1]}: built for "
        f"{_native.describe_cuda_targets(sass, ptx)}; rebuild with MERGEKIT_FAST_CUDA_ARCHS={cap[0]}{cap[1]}"
    )


def _gpu_code_reason(device) -> str | None:
    """Why the native CUDA kernels cannot run on ``device``'s GPU, or None."""
    targets = _native.cuda_targets()
    if targets is None:  # a build that does not say what it holds: the launch will tell
        return None
    import torch

    index = getattr(device, "index", None)
    if index is None:
        index = torch.cuda.current_device()
    why = cuda_code_reason(torch.cuda.get_device_capability(index), *targets)
    return f"{torch.cuda.get_device_name(index)}: {why}" if why else None


def unavailable_reason(backend: str, device) -> str | None:
    """None when ``backend`` can run on tensors of ``device``, else a short reason."""
    dev = getattr(device, "type", device)
    if backend == "torch":
        return None
    if dev == "cuda" and backend in ("cuda", "triton") and not _cuda_available():
        return "no GPU visible"
    if backend == "cpp":
        if dev != "cpu":
            return f"the C++ kernels run on CPU tensors, not {dev}"
        return _native.import_error()
    if backend == "cuda":
        if dev != "cuda":
            return "no GPU visible" if not _cuda_available() else f"tensors are on {dev}, not cuda"
        err = _native.import_error()
        if err:
            return err
        if not _native.has_cuda_kernels():
            return f"native module built without CUDA ({_cuda_skipped_reason()})"
        return _gpu_code_reason(device)
    if backend == "triton":
        err = _triton_import_error()
        if err:
            return err
        if dev == "cuda":
            return None
        if dev == "cpu":
            return None if triton_interpreted() else "triton on CPU tensors needs TRITON_INTERPRET=1"
        return f"triton does not run on {dev}"
    return f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)} or auto)"


def _cuda_skipped_reason() -> str:
    cuda = _native.build_info().get("cuda")
    if isinstance(cuda, dict) and cuda.get("reason"):
        return cuda["reason"]
    return "nvcc not found or MERGEKIT_FAST_SKIP_CUDA=1 at build time"


def default_backend() -> str:
    value = os.environ.get(ENV_BACKEND, "auto").strip().lower() or "auto"
    if value != "auto" and value not in BACKENDS:
        raise ValueError(f"{ENV_BACKEND}={value!r} is not one of auto, {', '.join(BACKENDS)}")
    return value


_AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpp", "torch")}


@functools.cache
def _log_fallback_once(op: str, device: str, chosen: str, skipped: tuple) -> None:
    reasons = "; ".join(f"{b}: {r}" for b, r in skipped)
    log.warning("mergekit_fast.%s on %s uses the %s backend (%s)", op, device, chosen, reasons)


def select(op: str, device, requested: str | None, implemented=BACKENDS) -> str:
    """The backend that runs ``op`` on tensors of ``device``.

    ``implemented`` lists the backends this op has; ``requested`` is a backend name, "auto" or None.
    """
    req = (requested or default_backend()).lower()
    dev = getattr(device, "type", device)
    if req != "auto":
        if req not in BACKENDS:
            raise ValueError(f"{op}: unknown backend {req!r}; choose from auto, {', '.join(BACKENDS)}")
        if req not in implemented:
            raise BackendUnavailable(f"{op}: no {req} implementation")
        why = unavailable_reason(req, device)
        if why:
            raise BackendUnavailable(f"{op}: backend {req!r} is unavailable for {dev} tensors: {why}")
        return req
    skipped = []
    for cand in _AUTO_ORDER.get(dev, ("torch",)):
        if cand not in implemented:
            continue
        why = unavailable_reason(cand, device)
        if why is None:
            if skipped:
                _log_fallback_once(op, dev, cand, tuple(skipped))
            return cand
        skipped.append((cand, why))
    return "torch"


def report() -> dict[str, dict[str, str | bool]]:
    """Availability of every backend on every device that exists here (for ``mergekit_fast.info``)."""
    import torch

    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.insert(0, torch.device("cuda"))
    out: dict[str, dict[str, str | bool]] = {}
    for b in BACKENDS:
        for d in devices:
            why = unavailable_reason(b, d)
            if why is None:
                out[b] = {"available": True, "device": d.type}
                break
        else:
            # Say why it is missing on the device it is meant for.
            home = torch.device("cpu") if b == "cpp" else torch.device("cuda")
            if b == "triton" and not torch.cuda.is_available():
                why = _triton_import_error() or (
                    "no GPU visible (set TRITON_INTERPRET=1 to run it on the CPU, slowly)"
                )
            elif b == "cuda" and not torch.cuda.is_available():
                why = "no GPU visible"
                native = _native.import_error() or (
                    None
                    if _native.has_cuda_kernels()
                    else f"native module built without CUDA ({_cuda_skipped_reason()})"
                )
                if native:
                    why += f"; {native}"
            else:
                why = unavailable_reason(b, home)
            out[b] = {"available": False, "device": home.type, "reason": why or "unavailable"}
    return out
