// Host element formats of the CPU kernels (one per mkf::DType): load to the arithmetic type, store
// with round-to-nearest-even. Included by kernel files inside their per-level namespace (see
// common/cpu_isa.h), so every instruction-set level has its own copies.
//
// `A` is the arithmetic type torch uses for the dtype (fp32 opmath for 16- and 32-bit floats,
// fp64 for fp64); `round` rounds an A value to the dtype and back (rD in common/ta_math.h).
#pragma once
#include <cstdint>

#include "common/dtype.h"

struct HostBF16 {
  using storage = uint16_t;
  using A = float;
  static inline float load(storage v) { return ::mkf::bf16_to_f32(v); }
  static inline storage store(float f) {
    uint32_t u = ::mkf::f32_to_bits(f);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    uint32_t nan = (u >> 16) | 0x0040u;
    return static_cast<storage>(((u & 0x7fffffffu) > 0x7f800000u) ? nan : rounded);
  }
  static inline float round(float f) { return load(store(f)); }
};
struct HostF16 {
#if defined(__FLT16_MAX__) && !defined(MKF_NO_FLOAT16)
  using storage = _Float16;
  static inline float load(storage v) { return static_cast<float>(v); }
  static inline storage store(float f) { return static_cast<_Float16>(f); }
#else
  using storage = uint16_t;
  static inline float load(storage v) { return ::mkf::f16_to_f32(v); }
  static inline storage store(float f) { return ::mkf::f32_to_f16(f); }
#endif
  using A = float;
  static inline float round(float f) { return load(store(f)); }
};
struct HostF32 {
  using storage = float;
  using A = float;
  static inline float load(storage v) { return v; }
  static inline storage store(float f) { return f; }
  static inline float round(float f) { return f; }
};
struct HostF64 {
  using storage = double;
  using A = double;
  static inline double load(storage v) { return v; }
  static inline storage store(double f) { return f; }
  static inline double round(double f) { return f; }
};

template <typename Fn>
void host_by_dtype(int dtype, const char* op, Fn&& fn) {
  switch (dtype) {
    case ::mkf::kF32: fn(HostF32{}); break;
    case ::mkf::kF16: fn(HostF16{}); break;
    case ::mkf::kBF16: fn(HostBF16{}); break;
    case ::mkf::kF64: fn(HostF64{}); break;
    default: throw std::invalid_argument(std::string(op) + ": unsupported dtype tag " + std::to_string(dtype));
  }
}
