"""``python -m mergekit_fast.info``: versions and, for each backend, whether it runs here and why not."""

from __future__ import annotations

import json
import platform
import sys


def collect() -> dict:
    import torch

    import mergekit_fast
    from mergekit_fast import _native, backends

    info = {
        "mergekit_fast": mergekit_fast.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": backends.triton_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "native_build": _native.build_info(),
        "backends": backends.report(),
        "default_backend": backends.default_backend(),
    }
    return info


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    info = collect()
    if "--json" in argv:
        print(json.dumps(info, indent=2))
        return 0
    print(f"mergekit_fast {info['mergekit_fast']}  (python {info['python']})")
    print(f"torch         {info['torch']}  (CUDA {info['torch_cuda'] or 'none'})")
    print(f"triton        {info['triton'] or 'not installed'}")
    print(f"GPU           {info['gpu'] or 'none visible'}")
    nb = info["native_build"]
    if nb:
        cuda = f"CUDA for sm_{',sm_'.join(nb.get('cuda_archs') or [])}" if nb.get("cuda") else "no CUDA"
        print(f"native build  {'ok' if nb.get('native') else 'failed'} ({cuda})"
              + (f": {nb['error']}" if nb.get("error") else ""))  # fmt: skip
    print(f"default       {info['default_backend']} (MERGEKIT_FAST_BACKEND)")
    print("backends:")
    for name, b in info["backends"].items():
        state = f"available on {b['device']}" if b["available"] else f"unavailable: {b['reason']}"
        print(f"  {name:7s} {state}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
