// Dtype tags shared by Python (mergekit_fast/_native.py) and the native kernels, and scalar
// conversions between the 16-bit float formats and fp32, usable on host and device.
#pragma once
#include <cstdint>
#include <cstring>

#include "hd.h"

namespace mkf {

// Keep in sync with mergekit_fast/_native.py (DTYPE_TAGS).
enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3 };

MKF_HD float bits_to_f32(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

MKF_HD uint32_t f32_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

MKF_HD float bf16_to_f32(uint16_t h) { return bits_to_f32(static_cast<uint32_t>(h) << 16); }

// Round to nearest even, as torch's .to(torch.bfloat16) does; NaN stays a quiet NaN.
MKF_HD uint16_t f32_to_bf16(float f) {
  uint32_t u = f32_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// IEEE binary16 <-> binary32, round to nearest even, subnormals and Inf/NaN handled.
MKF_HD float f16_to_f32(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  if (exp == 0x1fu) return bits_to_f32(sign | 0x7f800000u | (man << 13));
  if (exp == 0) {
    if (man == 0) return bits_to_f32(sign);
    // subnormal: value = man * 2^-24
    float v = static_cast<float>(man) * 5.9604644775390625e-08f;
    return sign ? -v : v;
  }
  return bits_to_f32(sign | ((exp + 112u) << 23) | (man << 13));
}

MKF_HD uint16_t f32_to_f16(float f) {
  uint32_t u = f32_to_bits(f);
  uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);  // NaN
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to Inf
  if (a < 0x38800000u) {
    // Result is subnormal or zero: add 0.5 (as float) so the FPU rounds to nearest even.
    float af = bits_to_f32(a) + 0.5f;
    return static_cast<uint16_t>(sign | static_cast<uint16_t>(f32_to_bits(af) - 0x3f000000u));
  }
  uint32_t mant_odd = (a >> 13) & 1u;
  a += 0xc8000fffu + mant_odd;  // rebias exponent (-112 << 23) and round
  return static_cast<uint16_t>(sign | static_cast<uint16_t>(a >> 13));
}

// Element access by tag, for generic host loops.
template <typename T>
struct Elem;
template <>
struct Elem<float> {
  static MKF_HD float load(const float* p, int64_t i) { return p[i]; }
  static MKF_HD void store(float* p, int64_t i, float v) { p[i] = v; }
};

struct bf16_t {
  uint16_t x;
};
struct f16_t {
  uint16_t x;
};

MKF_HD float to_f32(float v) { return v; }
MKF_HD float to_f32(bf16_t v) { return bf16_to_f32(v.x); }
MKF_HD float to_f32(f16_t v) { return f16_to_f32(v.x); }

template <typename T>
MKF_HD T from_f32(float v);
template <>
MKF_HD float from_f32<float>(float v) { return v; }
template <>
MKF_HD bf16_t from_f32<bf16_t>(float v) { return bf16_t{f32_to_bf16(v)}; }
template <>
MKF_HD f16_t from_f32<f16_t>(float v) { return f16_t{f32_to_f16(v)}; }

}  // namespace mkf
