"""Build script for mergekit_fast.

Builds the optional native module ``mergekit_fast._C`` with pybind11:
  * C++ CPU kernels always (csrc/**/*.cpp);
  * CUDA kernels (csrc/**/*.cu) when nvcc is found, for sm_80 and sm_90 by default.

The native module never links torch: entry points take raw pointers, sizes, dtype tags and a
CUDA stream handle. If the native build fails, the pure-Python package still installs and
``mergekit_fast`` says why (once) when a native backend is asked for.

Environment switches:
  MERGEKIT_FAST_SKIP_NATIVE=1      build no native code at all
  MERGEKIT_FAST_SKIP_CUDA=1        build the C++ CPU kernels only
  MERGEKIT_FAST_CUDA_ARCHS="80;90" CUDA architectures (e.g. "90" or "native")
  MERGEKIT_FAST_MARCH=native       -march for the CPU kernels ("" to leave the compiler default)
  NVCC=/path/to/nvcc               nvcc to use (default: $CUDA_HOME/bin/nvcc, then PATH)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
BUILD_INFO = ROOT / "mergekit_fast" / "_build_info.json"


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _find_nvcc() -> str | None:
    if os.environ.get("NVCC"):
        return os.environ["NVCC"]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _cuda_archs() -> list[str]:
    raw = os.environ.get("MERGEKIT_FAST_CUDA_ARCHS", "80;90")
    return [a.strip() for a in raw.replace(",", ";").split(";") if a.strip()]


def _write_build_info(info: dict) -> None:
    try:
        BUILD_INFO.write_text(json.dumps(info, indent=2) + "\n")
    except OSError:
        pass


class NativeBuild(build_ext):
    """Compile .cu files with nvcc, link them into the pybind11 module, never fail the install."""

    def run(self):
        info = {"native": False, "cuda": False, "cuda_archs": [], "error": None}
        try:
            self._prepare_cuda(info)
            super().run()
            info["native"] = True
        except Exception as exc:  # noqa: BLE001 - any failure must leave a pure-Python install
            msg = f"{type(exc).__name__}: {exc}"
            info["error"] = msg
            sys.stderr.write(
                "\n*** mergekit_fast: the native module failed to build; installing the pure-Python "
                f"package (torch and triton backends only).\n*** reason: {msg}\n"
            )
            if os.environ.get("MERGEKIT_FAST_DEBUG_BUILD"):
                traceback.print_exc()
        _write_build_info(info)

    def _prepare_cuda(self, info: dict) -> None:
        ext = self.extensions[0]
        cu_files = sorted(str(p.relative_to(ROOT)) for p in CSRC.rglob("*.cu"))
        if _flag("MERGEKIT_FAST_SKIP_CUDA"):
            info["cuda_skipped"] = "MERGEKIT_FAST_SKIP_CUDA=1"
            return
        nvcc = _find_nvcc()
        if nvcc is None or not cu_files:
            info["cuda_skipped"] = "nvcc not found" if nvcc is None else "no .cu sources"
            return
        archs = _cuda_archs()
        gencode = []
        for arch in archs:
            if arch == "native":
                gencode.append("-arch=native")
            else:
                gencode += [f"-gencode=arch=compute_{arch},code=sm_{arch}"]
        obj_dir = Path(self.build_temp) / "cuda"
        obj_dir.mkdir(parents=True, exist_ok=True)
        objects = []
        for src in cu_files:
            obj = obj_dir / (src.replace("/", "_") + ".o")
            cmd = [
                nvcc, "-c", str(ROOT / src), "-o", str(obj), "-O3", "-std=c++17",
                "-lineinfo", "--fmad=false",  # no FMA contraction: bit-parity with the reference
                "-Xcompiler", "-fPIC", "-I", str(CSRC), "-DMKF_WITH_CUDA=1",
                "--expt-relaxed-constexpr", *gencode,
            ]  # fmt: skip
            print(" ".join(cmd))
            subprocess.check_call(cmd)
            objects.append(str(obj))
        ext.extra_objects = list(ext.extra_objects or []) + objects
        # Relink when a .cu changed: setuptools only compares sources and depends with the module.
        ext.depends = list(ext.depends or []) + cu_files
        ext.define_macros = list(ext.define_macros or []) + [("MKF_WITH_CUDA", "1")]
        cuda_lib = Path(nvcc).resolve().parent.parent
        for libdir in (cuda_lib / "lib64", cuda_lib / "lib", cuda_lib / "targets/x86_64-linux/lib"):
            if libdir.exists():
                ext.library_dirs = list(ext.library_dirs or []) + [str(libdir)]
        # Static cudart: no dependency on a libcudart.so path at run time, and no link to torch's.
        ext.libraries = list(ext.libraries or []) + ["cudart_static", "rt", "dl", "pthread"]
        info["cuda"] = True
        info["cuda_archs"] = archs
        info["nvcc"] = nvcc


def _extensions() -> list[Extension]:
    if _flag("MERGEKIT_FAST_SKIP_NATIVE"):
        _write_build_info({"native": False, "cuda": False, "error": "MERGEKIT_FAST_SKIP_NATIVE=1"})
        return []
    try:
        import pybind11
    except ImportError:
        _write_build_info({"native": False, "cuda": False, "error": "pybind11 is not installed"})
        return []
    march = os.environ.get("MERGEKIT_FAST_MARCH", "native")
    cflags = ["-O3", "-std=c++17", "-fvisibility=hidden", "-ffp-contract=off"]
    if march:
        cflags.append(f"-march={march}")
    sources = sorted(str(p.relative_to(ROOT)) for p in CSRC.rglob("*.cpp"))
    return [
        Extension(
            "mergekit_fast._C",
            sources=sources,
            include_dirs=[pybind11.get_include(), str(CSRC)],
            extra_compile_args=cflags,
            extra_link_args=["-pthread"],
            language="c++",
        )
    ]


setup(
    packages=[
        "mergekit_fast",
        "mergekit_fast.ops",
        "mergekit_fast.io",
        "mergekit_fast.methods",
        "mergekit_fast.moe",
        "mergekit_fast.triton_kernels",
    ],
    package_dir={"mergekit_fast.triton_kernels": "triton_kernels"},
    package_data={"mergekit_fast": ["py.typed"]},
    ext_modules=_extensions(),
    cmdclass={"build_ext": NativeBuild},
    zip_safe=False,
)
