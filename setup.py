"""Build script for mergekit_fast.

Builds the native module ``mergekit_fast._C`` with pybind11 (it never imports or links torch):
  * the C++ CPU kernels, always. Portable by default: on x86-64 every kernel file
    (csrc/<op>/*_cpu.cpp) is compiled for three instruction-set levels (baseline x86-64,
    avx2 = x86-64-v3, avx512 = x86-64-v4) and the module picks one at run time
    (csrc/common/cpu_isa.h explains the pattern). ``-march=native`` only on request.
  * the CUDA kernels (csrc/**/*.cu) when nvcc is found: code for sm_80, sm_90 and sm_100 (those
    this nvcc supports) plus PTX of the newest one, which newer GPUs compile at load time.

A native build that was asked for and fails stops the install with the reason (pip then says
so). ``MERGEKIT_FAST_SKIP_NATIVE=1`` installs the pure-Python package instead (torch and triton
backends only), and the build record and ``python -m mergekit_fast.info`` say so.

The build record, mergekit_fast/_build_info.json, is written into the build output next to the
module (so it travels inside wheels; it is never part of the sdist), and the module embeds the
same facts (``_C.build_info()``), which ``mergekit_fast.info`` compares with the record.

Environment switches:
  MERGEKIT_FAST_SKIP_NATIVE=1      no native code at all: the pure-Python package
  MERGEKIT_FAST_SKIP_CUDA=1        the C++ CPU kernels only, even where nvcc is found
  MERGEKIT_FAST_CUDA_ARCHS=LIST    CUDA targets, ';'-separated: "80;90;100+PTX" (the default) is
                                   machine code for each, and PTX for those marked +PTX; "8.0"
                                   and "90a" work too; "native" is the GPUs visible now
                                   (nvidia-smi), without PTX. An explicit list is not filtered.
  MERGEKIT_FAST_MARCH=ARCH         compile the CPU kernels once, with -march=ARCH (e.g. native):
                                   fastest on this machine, not portable to older CPUs
  NVCC=/path/to/nvcc               nvcc to use (default: $CUDA_HOME/bin/nvcc, then PATH)
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py
from setuptools.errors import CompileError

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
RECORD_NAME = "_build_info.json"
MODULE = "mergekit_fast._C"
DEFAULT_CUDA_ARCHS = "80;90;100+PTX"
# -ffp-contract=off: no FMA contraction, so every level rounds as the torch reference does.
# -Wno-psabi: GCC notes that 512-bit vector arguments change the ABI between levels; the kernels'
# vector helpers are internal to one level's namespace (csrc/common/cpu_isa.h), so none crosses.
COMMON_CFLAGS = ["-O3", "-std=c++17", "-fvisibility=hidden", "-ffp-contract=off", "-Wno-psabi"]
# CPU levels of a portable x86-64 build: flags, and the features csrc/common/cpu_isa.cpp checks.
_X86_V3 = ["-msse4.2", "-mpopcnt", "-mavx", "-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2", "-mlzcnt",
           "-mmovbe"]  # fmt: skip
X86_LEVELS = {
    "baseline": ["-march=x86-64", "-mtune=generic"],
    "avx2": ["-march=x86-64", "-mtune=generic", *_X86_V3],
    "avx512": [
        "-march=x86-64",
        "-mtune=generic",
        *_X86_V3,
        "-mavx512f",
        "-mavx512bw",
        "-mavx512cd",
        "-mavx512dq",
        "-mavx512vl",
    ],  # fmt: skip
}


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _version() -> str:
    m = re.search(r'^version\s*=\s*"([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    return m.group(1) if m else "unknown"


def _say(msg: str) -> None:
    sys.stderr.write(f"mergekit_fast: {msg}\n")
    sys.stderr.flush()


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _cpp_sources() -> list[str]:
    return sorted(_rel(p) for p in CSRC.rglob("*.cpp"))


def _kernel_files() -> list[str]:
    """The files compiled once per CPU level (csrc/common/cpu_isa.h): csrc/<op>/*_cpu.cpp."""
    return sorted(_rel(p) for p in CSRC.glob("*/*_cpu.cpp"))


def _source_digest() -> str:
    h = hashlib.sha256()
    for p in sorted(CSRC.rglob("*")):
        if p.is_file():
            h.update(_rel(p).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _write_if_changed(path: Path, text: str) -> None:
    """Keep the file's time stamp when nothing changed, so an up-to-date build is not redone."""
    if path.exists() and path.read_text() == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _write_record(pkg_dir: Path, record: dict) -> Path:
    path = pkg_dir / RECORD_NAME
    _write_if_changed(path, json.dumps(record, indent=2, sort_keys=True) + "\n")
    return path


def _x86_64() -> bool:
    return sysconfig.get_platform().endswith(("x86_64", "amd64"))


def _cpu_config() -> dict:
    """How the CPU kernels are compiled: {mode, levels: {name: flags}, primary}."""
    march = os.environ.get("MERGEKIT_FAST_MARCH", "").strip()
    if march:
        return {"mode": "march", "march": march, "levels": {"march": [f"-march={march}"]}}
    if _x86_64():
        return {"mode": "dispatch", "levels": dict(X86_LEVELS)}
    return {"mode": "baseline", "levels": {"baseline": []}}


# ------------------------------------------------------------------------------------------ CUDA


def _find_nvcc() -> str | None:
    if os.environ.get("NVCC"):
        return os.environ["NVCC"]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    m = re.search(r"V(\d+\.\d+\.\d+)", out) or re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else "unknown"


def _nvcc_supported(nvcc: str) -> set[str] | None:
    """The sm_XX this nvcc can generate, or None when it cannot say (old nvcc)."""
    try:
        out = subprocess.run([nvcc, "--list-gpu-code"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return {m.group(1) for m in re.finditer(r"sm_(\w+)", out)}


def _native_gpu_archs() -> list[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, check=True, timeout=60).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        raise CompileError(
            f"MERGEKIT_FAST_CUDA_ARCHS=native needs a GPU visible to nvidia-smi ({exc})"
        ) from exc
    archs = sorted({c.strip().replace(".", "") for c in out.splitlines() if c.strip()}, key=_arch_key)
    if not archs:
        raise CompileError("MERGEKIT_FAST_CUDA_ARCHS=native: nvidia-smi lists no GPU")
    return archs


def _arch_key(arch: str) -> tuple[int, str]:
    m = re.fullmatch(r"(\d+)(\w*)", arch)
    return (int(m.group(1)), m.group(2)) if m else (0, arch)


def _parse_archs(raw: str) -> tuple[list[str], list[str]]:
    """'80;90;100+PTX' -> (machine-code archs, PTX archs), as '80', '90a', '100'."""
    sass, ptx = [], []
    for tok in raw.replace(",", ";").replace(" ", ";").split(";"):
        tok = tok.strip()
        if not tok:
            continue
        if tok == "native":
            sass += _native_gpu_archs()
            continue
        with_ptx = tok.upper().endswith("+PTX")
        arch = tok[:-4] if with_ptx else tok
        arch = arch.replace(".", "").replace("sm_", "").replace("compute_", "")
        if not re.fullmatch(r"\d{2,3}[af]?", arch):
            raise CompileError(
                f"MERGEKIT_FAST_CUDA_ARCHS: cannot read {tok!r} (examples: 80, 9.0, 90a, 100+PTX)"
            )
        sass.append(arch)
        if with_ptx:
            ptx.append(arch)
    dedup = lambda xs: sorted(set(xs), key=_arch_key)  # noqa: E731
    return dedup(sass), dedup(ptx)


def _cuda_config() -> dict:
    """What CUDA code to build: {built: False, reason} or {built: True, sass, ptx, nvcc, ...}."""
    if _flag("MERGEKIT_FAST_SKIP_CUDA"):
        return {"built": False, "reason": "MERGEKIT_FAST_SKIP_CUDA=1 at build time"}
    cu_files = sorted(_rel(p) for p in CSRC.rglob("*.cu"))
    if not cu_files:
        return {"built": False, "reason": "no .cu sources"}
    nvcc = _find_nvcc()
    if nvcc is None:
        return {"built": False, "reason": "nvcc not found at build time (set NVCC or CUDA_HOME)"}
    explicit = os.environ.get("MERGEKIT_FAST_CUDA_ARCHS", "").strip()
    sass, ptx = _parse_archs(explicit or DEFAULT_CUDA_ARCHS)
    notes = []
    if not explicit:  # the default list: only what this nvcc supports, PTX of the newest kept
        supported = _nvcc_supported(nvcc)
        if supported is not None:
            dropped = [a for a in sass if a not in supported]
            if dropped:
                notes.append(f"sm_{', sm_'.join(dropped)} not built: this nvcc does not support them")
                sass = [a for a in sass if a in supported]
                if not sass:
                    raise CompileError(
                        f"{nvcc} supports none of the default CUDA targets {DEFAULT_CUDA_ARCHS}"
                    )
                if ptx and ptx[0] in dropped:
                    ptx = [sass[-1]]
    return {"built": True, "sass": sass, "ptx": ptx, "nvcc": _nvcc_version(nvcc), "nvcc_path": nvcc,
            "requested": explicit or f"default ({DEFAULT_CUDA_ARCHS})", "notes": notes,
            "sources": cu_files}  # fmt: skip


def _gencode(cuda: dict) -> list[str]:
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in cuda["sass"]]
    flags += [f"-gencode=arch=compute_{a},code=compute_{a}" for a in cuda["ptx"]]
    return flags


# ------------------------------------------------------------------------------------ commands


def _failure(what: str, exc: BaseException) -> CompileError:
    _say(f"*** {what} failed: {type(exc).__name__}: {exc}")
    _say("*** Fix the cause above, or choose what to build: MERGEKIT_FAST_SKIP_CUDA=1 builds the C++ "
         "kernels without CUDA, MERGEKIT_FAST_CUDA_ARCHS picks the CUDA targets, and "
         "MERGEKIT_FAST_SKIP_NATIVE=1 installs the pure-Python package (torch and triton backends only).")  # fmt: skip
    return CompileError(f"{what} failed: {exc}")


class NativeBuild(build_ext):
    """Builds mergekit_fast._C: CPU levels, CUDA objects, the build facts; fails loudly."""

    def build_extension(self, ext: Extension) -> None:
        try:
            self._build(ext)
        except Exception as exc:  # noqa: BLE001 - compiler, linker, nvcc: each one fails the build
            raise _failure(f"building the native module {MODULE}", exc) from exc

    def _build(self, ext: Extension) -> None:
        try:
            import pybind11
        except ImportError as exc:
            raise CompileError(
                "pybind11 is not installed (pip install pybind11, or build with isolation)"
            ) from exc
        cpu, cuda = _cpu_config(), _cuda_config()
        levels = list(cpu["levels"])
        primary = levels[0]
        gen_dir = Path(self.build_temp) / "mkf_generated"
        ext.include_dirs = [pybind11.get_include(), str(CSRC), str(gen_dir)]
        macros = [("MKF_CPU_MULTI_ISA", "1" if cpu["mode"] == "dispatch" else "0")]
        if cpu["mode"] == "march":
            macros.append(("MKF_ISA_MARCH", "1"))
        if cuda["built"]:
            macros.append(("MKF_WITH_CUDA", "1"))
        ext.define_macros = [*macros, ("MKF_ISA_NS", primary), ("MKF_ISA_PRIMARY", "1")]
        ext.extra_compile_args = [*COMMON_CFLAGS, *cpu["levels"][primary]]
        headers = sorted(str(p) for p in CSRC.rglob("*.h")) + sorted(str(p) for p in CSRC.rglob("*.cuh"))
        cu_files = cuda.get("sources", [])
        ext.depends = [*headers, *cu_files, str(gen_dir / "mkf_build_facts.h")]

        facts = self._facts(cpu, cuda)
        literal = json.dumps(facts, sort_keys=True)
        _write_if_changed(gen_dir / "mkf_build_facts.h",
                          "// Generated by setup.py: the facts of this build (see bindings.cpp).\n#pragma once\n"
                          f'#define MKF_BUILD_FACTS_JSON R"mkf({literal})mkf"\n')  # fmt: skip

        ext_path = self.get_ext_fullpath(ext.name)
        sources = list(ext.sources) + list(ext.depends)
        if self.force or _newer_group(sources, ext_path):
            _say(f"building {MODULE}: CPU kernels for {', '.join(levels)}"
                 + (f"; CUDA for sm_{', sm_'.join(cuda['sass'])}"
                    + (f" + PTX compute_{', compute_'.join(cuda['ptx'])}" if cuda["ptx"] else "")
                    + f" (nvcc {cuda['nvcc']}: the slowest part, one to three minutes on 2 cores)"
                    if cuda["built"] else f"; no CUDA: {cuda['reason']}"))  # fmt: skip
            # Objects linked after the baseline ones (cpu_isa.h: the linker keeps the first copy
            # of shared inline code, so the baseline's).
            extra = self._cpu_level_objects(ext, cpu, macros, levels[1:])
            if cuda["built"]:
                extra += self._cuda_objects(cuda)
                cuda_root = Path(cuda["nvcc_path"]).resolve().parent.parent
                for libdir in (
                    cuda_root / "lib64",
                    cuda_root / "lib",
                    cuda_root / "targets/x86_64-linux/lib",
                ):
                    if libdir.exists():
                        ext.library_dirs = [*ext.library_dirs, str(libdir)]
                # Static cudart: no libcudart.so path needed at run time, and no link to torch's.
                ext.libraries = [*ext.libraries, "cudart_static", "rt", "dl", "pthread"]
            ext.extra_objects = [*ext.extra_objects, *extra]
            ext.extra_link_args = ["-pthread"]
            self.force = True  # the objects above are new: link even if setuptools sees no change
        super().build_extension(ext)
        self._record = facts
        _write_record(Path(self.get_ext_fullpath(ext.name)).parent, facts)

    def copy_extensions_to_source(self) -> None:
        """Editable / --inplace builds: the record goes beside the module copied to the source."""
        super().copy_extensions_to_source()
        record = getattr(self, "_record", None)
        if record is not None:
            pkg = self.get_finalized_command("build_py").get_package_dir("mergekit_fast")
            _write_record(Path(pkg), record)

    def _facts(self, cpu: dict, cuda: dict) -> dict:
        compiler = self.compiler.compiler_so[0] if getattr(self.compiler, "compiler_so", None) else "cc"
        try:
            cc_version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
            cc_version = cc_version.splitlines()[0].strip()
        except (OSError, IndexError):
            cc_version = compiler
        cuda_facts = {k: v for k, v in cuda.items() if k not in ("nvcc_path", "sources")}
        facts = {
            "mergekit_fast": _version(),
            "native": True,
            "platform": sysconfig.get_platform(),
            "python": sys.implementation.cache_tag,
            "compiler": cc_version,
            "cpu": {
                "mode": cpu["mode"],
                "levels": list(cpu["levels"]),
                "flags": {k: " ".join(v) for k, v in cpu["levels"].items()},
                **({"march": cpu["march"]} if cpu["mode"] == "march" else {}),
            },  # fmt: skip
            "cuda": cuda_facts,
            "sources": _source_digest(),
        }
        facts["build_id"] = hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]
        return facts

    def _cpu_level_objects(self, ext: Extension, cpu: dict, macros: list, levels: list[str]) -> list[str]:
        objects = []
        for level in levels:
            objects += self.compiler.compile(
                _kernel_files(),
                output_dir=str(Path(self.build_temp) / f"cpu-{level}"),
                macros=[*macros, ("MKF_ISA_NS", level), ("MKF_ISA_PRIMARY", "0")],
                include_dirs=ext.include_dirs,
                extra_postargs=[*COMMON_CFLAGS, *cpu["levels"][level]],
                depends=ext.depends,
            )
        return objects

    def _cuda_objects(self, cuda: dict) -> list[str]:
        obj_dir = Path(self.build_temp) / "cuda"
        obj_dir.mkdir(parents=True, exist_ok=True)
        objects = []
        for src in cuda["sources"]:
            obj = obj_dir / (src.replace("/", "_") + ".o")
            cmd = [
                cuda["nvcc_path"], "-c", str(ROOT / src), "-o", str(obj), "-O3", "-std=c++17",
                "-lineinfo", "--fmad=false",  # no FMA contraction: bit-parity with the reference
                "-Xcompiler", "-fPIC", "-I", str(CSRC), "-DMKF_WITH_CUDA=1",
                "--expt-relaxed-constexpr", "--threads", "0", *_gencode(cuda),
            ]  # fmt: skip
            _say(f"nvcc {src} ({len(cuda['sass'])} targets + {len(cuda['ptx'])} PTX)")
            print(" ".join(cmd), flush=True)
            subprocess.check_call(cmd)
            objects.append(str(obj))
        return objects


def _newer_group(sources: list[str], target: str) -> bool:
    if not os.path.exists(target):
        return True
    t = os.path.getmtime(target)
    return any(not os.path.exists(s) or os.path.getmtime(s) > t for s in sources)


def _pure_record() -> dict:
    return {
        "mergekit_fast": _version(),
        "native": False,
        "reason": "MERGEKIT_FAST_SKIP_NATIVE=1 at build time: a pure-Python install, torch and triton backends only",
        "platform": sysconfig.get_platform(),
        "python": sys.implementation.cache_tag,
    }


class BuildPy(build_py):
    """In a pure-Python build, writes the record that says so and removes a stale _C."""

    def run(self) -> None:
        super().run()
        if not NATIVE_REQUESTED:
            targets = [Path(self.build_lib) / "mergekit_fast"]
            if getattr(self, "editable_mode", False):
                targets.append(Path(self.get_package_dir("mergekit_fast")))
            for pkg in targets:
                for stale in glob.glob(str(pkg / "_C.*")):
                    _say(f"removing {stale}, left by an earlier native build")
                    os.remove(stale)
                _write_record(pkg, _pure_record())
            _say("MERGEKIT_FAST_SKIP_NATIVE=1: installing the pure-Python package, without the native "
                 "module (no C++ or CUDA kernels; the torch and triton backends only)")  # fmt: skip


NATIVE_REQUESTED = not _flag("MERGEKIT_FAST_SKIP_NATIVE")

setup(
    # Every package under mergekit_fast/ (a new subpackage needs no entry here), and triton_kernels/
    # installed as mergekit_fast.triton_kernels.
    packages=[*find_packages(include=["mergekit_fast", "mergekit_fast.*"]), "mergekit_fast.triton_kernels"],
    package_dir={"mergekit_fast.triton_kernels": "triton_kernels"},
    package_data={"mergekit_fast": ["py.typed", "data/*.json"]},
    ext_modules=[Extension(MODULE, sources=_cpp_sources(), language="c++")] if NATIVE_REQUESTED else [],
    cmdclass={"build_ext": NativeBuild, "build_py": BuildPy},
    zip_safe=False,
)
