// CPU instruction-set levels of the C++ kernels: one portable build, chosen at run time.
//
// A portable build (the default on x86-64) compiles every kernel file once per level and picks
// one level per process, at the first kernel call, from what the CPU and the OS support:
//   baseline  the target's default ISA (x86-64: SSE2): runs wherever the wheel installs
//   avx2      x86-64-v3: AVX2, FMA, F16C, BMI1/2, LZCNT, MOVBE (Haswell, Zen 1 and later)
//   avx512    x86-64-v4: the above plus AVX-512 F, BW, CD, DQ, VL (Skylake-SP, Zen 4 and later)
// MERGEKIT_FAST_CPU_ISA=baseline|avx2|avx512 at run time caps the level (tests use it to run
// every level on one machine). MERGEKIT_FAST_MARCH=<arch> at build time (e.g. native) instead
// compiles the kernels once, with -march=<arch>, as the single level "march" (not portable).
// Other architectures than x86-64 build the baseline level only.
//
// How a kernel file takes part (setup.py does the build side; csrc/slerp/slerp_cpu.cpp is the
// example to copy):
//  1. It is named csrc/<op>/<name>_cpu.cpp. setup.py compiles each such file once per level with
//     -DMKF_ISA_NS=<level> and the level's flags. Every other .cpp (bindings.cpp, common/*.cpp)
//     is compiled once, for the baseline.
//  2. All its code lives in `namespace mkf::MKF_ISA_NS`, so every compile defines its own
//     functions under its own names (mkf::baseline::slerp_cpu, mkf::avx2::slerp_cpu, ...).
//  3. Its header lists the entry points in one macro and declares them in mkf and per level:
//       #define MKF_FOO_CPU_API void foo_cpu(const float* x, int64_t n)
//       MKF_FOO_CPU_API;
//       MKF_DECLARE_PER_ISA(MKF_FOO_CPU_API)
//  4. Under `#if MKF_ISA_PRIMARY` (true in exactly one of its compiles, the baseline one) it
//     defines the mkf:: entry points, each one line:
//       void foo_cpu(const float* x, int64_t n) { MKF_CPU_DISPATCH(foo_cpu, x, n); }
// Nothing else changes: the math is the same source for every level, and the tests compare
// every level with the torch reference bit for bit (tests/test_build.py).
//
// Why one process never runs an instruction its CPU lacks: inline functions and template
// instances shared by several compiles (from common/*.h, the standard library) are emitted in
// several objects and the linker keeps the first copy. setup.py links the baseline objects
// before the others, so the kept copy is always the baseline one; code specific to one level is
// named in that level's namespace and is never merged with another level's.
#pragma once

#ifndef MKF_ISA_NS
#define MKF_ISA_NS baseline
#endif
#ifndef MKF_ISA_PRIMARY
#define MKF_ISA_PRIMARY 1
#endif
// 1: baseline, avx2 and avx512 are compiled and dispatched at run time (setup.py on x86-64).
#ifndef MKF_CPU_MULTI_ISA
#define MKF_CPU_MULTI_ISA 0
#endif

namespace mkf {

enum class CpuIsa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2, kMarch = 3 };

// The level the kernels run at in this process, fixed at the first call: the best level that
// is compiled in and that the CPU supports, capped by MERGEKIT_FAST_CPU_ISA. Throws
// std::invalid_argument for an unknown MERGEKIT_FAST_CPU_ISA value.
CpuIsa cpu_isa();
// The best of baseline / avx2 / avx512 that this CPU and OS support (whatever was compiled).
CpuIsa cpu_isa_supported();
const char* cpu_isa_name(CpuIsa isa);
// The levels compiled into this build, separated by ';' (e.g. "baseline;avx2;avx512").
const char* cpu_isas_compiled();

}  // namespace mkf

#if MKF_CPU_MULTI_ISA
#define MKF_DECLARE_PER_ISA(...)   \
  namespace baseline {             \
  __VA_ARGS__;                     \
  }                                \
  namespace avx2 {                 \
  __VA_ARGS__;                     \
  }                                \
  namespace avx512 {               \
  __VA_ARGS__;                     \
  }
#define MKF_CPU_DISPATCH(fn, ...)                                         \
  switch (::mkf::cpu_isa()) {                                             \
    case ::mkf::CpuIsa::kAvx512: return ::mkf::avx512::fn(__VA_ARGS__);   \
    case ::mkf::CpuIsa::kAvx2: return ::mkf::avx2::fn(__VA_ARGS__);       \
    default: return ::mkf::baseline::fn(__VA_ARGS__);                     \
  }
#else
#define MKF_DECLARE_PER_ISA(...) \
  namespace MKF_ISA_NS {         \
  __VA_ARGS__;                   \
  }
#define MKF_CPU_DISPATCH(fn, ...) return ::mkf::MKF_ISA_NS::fn(__VA_ARGS__)
#endif
