"""``python -m mergekit_fast.info [--json]``: versions, the native build, and for each backend
whether it runs here and why not.

What it says of the native module is what is true of this process: whether ``_C`` imports, the
facts compiled into it (CPU levels and the one in use, CUDA targets and PTX), and whether the
build record beside it describes that same build.
"""

from __future__ import annotations

import json
import platform
import sys


def native_report() -> dict:
    """The native module as this process sees it (see mergekit_fast._native)."""
    from mergekit_fast import _native

    agrees, record_note = _native.record_status()
    return {
        "importable": _native.C is not None,
        "import_error": _native.import_error(),
        "facts": _native.module_facts(),
        "record": _native.build_record(),
        "record_agrees": agrees,
        "record_note": record_note,
        "cpu_isa": _native.cpu_isa(),
    }


def collect() -> dict:
    import torch

    import mergekit_fast
    from mergekit_fast import backends

    return {
        "mergekit_fast": mergekit_fast.__version__,
        "package": str(mergekit_fast.__path__[0]),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": backends.triton_version(),
        "gpu": _gpu() if torch.cuda.is_available() else None,
        "native": native_report(),
        "backends": backends.report(),
        "default_backend": backends.default_backend(),
    }


def _gpu() -> str:
    import torch

    major, minor = torch.cuda.get_device_capability(0)
    return f"{torch.cuda.get_device_name(0)} (compute capability {major}.{minor})"


def _cpu_line(facts: dict, isa: dict | None) -> str:
    cpu = facts.get("cpu") or {}
    levels = ", ".join(cpu.get("levels") or []) or "?"
    if isa is None:
        return f"compiled for {levels}"
    if "error" in isa:
        return f"{isa['error']} (compiled for {levels})"
    if cpu.get("mode") == "march":
        return (f"march (built with -march={cpu.get('march')}: for the build machine's CPU, not portable; "
                f"this CPU supports up to {isa['supported']})")  # fmt: skip
    capped = ""
    if isa["in_use"] != isa["supported"] and cpu.get("mode") == "dispatch":
        capped = ", capped by MERGEKIT_FAST_CPU_ISA"
    return f"{isa['in_use']} in use (this CPU supports up to {isa['supported']}{capped}; compiled: {levels})"


def _cuda_line(facts: dict) -> str:
    from mergekit_fast import _native

    cuda = facts.get("cuda") or {}
    if not cuda.get("built"):
        return f"not built: {cuda.get('reason') or 'no reason recorded'}"
    line = _native.describe_cuda_targets(cuda.get("sass") or [], cuda.get("ptx") or [])
    line += f" (nvcc {cuda.get('nvcc')})"
    for note in cuda.get("notes") or []:
        line += f"; {note}"
    return line


def format_text(info: dict) -> str:
    out = [
        f"mergekit_fast {info['mergekit_fast']}  (python {info['python']}; {info['package']})",
        f"torch         {info['torch']}  (CUDA {info['torch_cuda'] or 'none'})",
        f"triton        {info['triton'] or 'not installed'}",
        f"GPU           {info['gpu'] or 'none visible'}",
    ]
    nat = info["native"]
    facts = nat["facts"]
    if nat["importable"]:
        build = (facts or {}).get("build_id") or "unknown"
        out.append(f"native module mergekit_fast._C imports (build {build}; {nat['record_note']})")
        if facts:
            out.append(f"  CPU kernels  {_cpu_line(facts, nat['cpu_isa'])}")
            out.append(f"  CUDA kernels {_cuda_line(facts)}")
    else:
        out.append(f"native module mergekit_fast._C unavailable: {nat['import_error']}")
        rec = nat["record"]
        if rec and rec.get("native"):
            out.append(f"  the build record says: CPU {', '.join(rec.get('cpu', {}).get('levels') or [])}; "
                       f"CUDA {_cuda_line(rec)}")  # fmt: skip
    out.append(f"default       {info['default_backend']} (MERGEKIT_FAST_BACKEND)")
    out.append("backends:")
    for name, b in info["backends"].items():
        state = f"available on {b['device']}" if b["available"] else f"unavailable: {b['reason']}"
        out.append(f"  {name:7s} {state}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    info = collect()
    if "--json" in argv:
        print(json.dumps(info, indent=2))
    else:
        print(format_text(info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
