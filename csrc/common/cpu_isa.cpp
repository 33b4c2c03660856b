// Run-time choice of the CPU kernels' instruction-set level (see cpu_isa.h). Compiled once, for
// the baseline.
#include "common/cpu_isa.h"

#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#define MKF_X86 1
#else
#define MKF_X86 0
#endif

namespace mkf {
namespace {

#if MKF_X86
bool bit(uint32_t reg, int b) { return (reg >> b) & 1u; }

uint64_t xgetbv0() {
  uint32_t eax = 0, edx = 0;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<uint64_t>(edx) << 32) | eax;
}

// Exactly the features setup.py enables for each level (its X86_LEVELS), plus the OS's saving
// of the registers (XCR0): a CPU with AVX-512 under an OS that does not save ZMM state cannot
// run AVX-512 code.
CpuIsa detect() {
  uint32_t a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return CpuIsa::kBaseline;
  const uint32_t c1 = c;
  const bool osxsave = bit(c1, 27);
  if (!osxsave) return CpuIsa::kBaseline;
  const uint64_t xcr0 = xgetbv0();
  const bool os_avx = (xcr0 & 0x6) == 0x6;        // SSE and AVX state
  const bool os_avx512 = (xcr0 & 0xe6) == 0xe6;   // plus opmask, ZMM_Hi256, Hi16_ZMM
  const bool v2 = bit(c1, 0) && bit(c1, 9) && bit(c1, 19) && bit(c1, 20) && bit(c1, 23);
  const bool v3_leaf1 = bit(c1, 12) && bit(c1, 22) && bit(c1, 28) && bit(c1, 29);  // FMA MOVBE AVX F16C
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return CpuIsa::kBaseline;
  const uint32_t b7 = b;
  const bool v3_leaf7 = bit(b7, 3) && bit(b7, 5) && bit(b7, 8);  // BMI1 AVX2 BMI2
  bool lzcnt = false;
  if (__get_cpuid(0x80000001u, &a, &b, &c, &d)) lzcnt = bit(c, 5);
  const bool v3 = v2 && v3_leaf1 && v3_leaf7 && lzcnt && os_avx;
  // AVX512 F, DQ, CD, BW, VL
  const bool v4 = v3 && bit(b7, 16) && bit(b7, 17) && bit(b7, 28) && bit(b7, 30) && bit(b7, 31) &&
                  os_avx512;
  return v4 ? CpuIsa::kAvx512 : (v3 ? CpuIsa::kAvx2 : CpuIsa::kBaseline);
}
#else
CpuIsa detect() { return CpuIsa::kBaseline; }
#endif

// MERGEKIT_FAST_CPU_ISA: unset, "" or "auto" puts no cap.
CpuIsa requested_cap() {
  const char* env = std::getenv("MERGEKIT_FAST_CPU_ISA");
  const std::string v = env ? env : "";
  if (v.empty() || v == "auto") return CpuIsa::kAvx512;
  if (v == "baseline") return CpuIsa::kBaseline;
  if (v == "avx2") return CpuIsa::kAvx2;
  if (v == "avx512") return CpuIsa::kAvx512;
  throw std::invalid_argument("MERGEKIT_FAST_CPU_ISA=" + v +
                              " is not one of auto, baseline, avx2, avx512");
}

CpuIsa choose() {
  const CpuIsa cap = requested_cap();  // validated in every build, so a typo never goes unseen
#if MKF_CPU_MULTI_ISA
  const CpuIsa cpu = detect();
  return static_cast<int>(cpu) < static_cast<int>(cap) ? cpu : cap;
#elif defined(MKF_ISA_MARCH)
  (void)cap;
  return CpuIsa::kMarch;
#else
  (void)cap;
  return CpuIsa::kBaseline;
#endif
}

}  // namespace

CpuIsa cpu_isa() {
  static const CpuIsa isa = choose();
  return isa;
}

CpuIsa cpu_isa_supported() {
  static const CpuIsa isa = detect();
  return isa;
}

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kBaseline: return "baseline";
    case CpuIsa::kAvx2: return "avx2";
    case CpuIsa::kAvx512: return "avx512";
    case CpuIsa::kMarch: return "march";
  }
  return "unknown";
}

const char* cpu_isas_compiled() {
#if MKF_CPU_MULTI_ISA
  return "baseline;avx2;avx512";
#elif defined(MKF_ISA_MARCH)
  return "march";
#else
  return "baseline";
#endif
}

}  // namespace mkf
