// Storage formats and "torch rounding" for host and device: the arithmetic a torch op performs in
// a tensor's dtype, written once.
//
// A CPU torch op on bf16 or fp16 tensors converts its operands to fp32, computes in fp32 (one IEEE
// rounding), and rounds the result to the tensor's dtype (to nearest even): two roundings, which
// is what `F::round(a op b)` reproduces with a and b held as floats. fp32 tensors compute in fp32
// (round is the identity), fp64 tensors in fp64. Python scalars enter an op as the compute type
// (`(float)0.3` for 16-bit and fp32 tensors), never rounded to the 16-bit dtype first.
//
// Per format F:
//   F::S           the storage type (uint16_t bits for bf16 and fp16 on the host)
//   F::C           the compute type (float, or double for fp64)
//   F::load(s)     S -> C, exact
//   F::store(c)    C -> S, round to nearest even (NaN stays NaN)
//   F::round(c)    C -> C: the value c takes once stored in S (store then load)
//   F::kTag        the mkf::DType tag
// The host versions are branch-free so that loops over them vectorise.
#pragma once
#include <cstdint>
#include <type_traits>

#include "common/dtype.h"
#include "common/hd.h"

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#endif

#if defined(__CUDA_ARCH__)
#define MKF_RI __device__ __forceinline__
#elif defined(__CUDACC__)
#define MKF_RI __host__ __device__ __forceinline__
#else
#define MKF_RI inline __attribute__((always_inline))
#endif

namespace mkf {

struct FmtF32 {
  using S = float;
  using C = float;
  static constexpr int kTag = kF32;
  static MKF_RI C load(S v) { return v; }
  static MKF_RI S store(C v) { return v; }
  static MKF_RI C round(C v) { return v; }
};

struct FmtF64 {
  using S = double;
  using C = double;
  static constexpr int kTag = kF64;
  static MKF_RI C load(S v) { return v; }
  static MKF_RI S store(C v) { return v; }
  static MKF_RI C round(C v) { return v; }
};

struct FmtBF16 {
  using S = uint16_t;
  using C = float;
  static constexpr int kTag = kBF16;
  static MKF_RI C load(S v) { return bits_to_f32(static_cast<uint32_t>(v) << 16); }
  static MKF_RI S store(C f) {
    uint32_t u = f32_to_bits(f);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    uint32_t nan = (u >> 16) | 0x0040u;
    return static_cast<S>(((u & 0x7fffffffu) > 0x7f800000u) ? nan : rounded);
  }
  static MKF_RI C round(C f) {
    uint32_t u = f32_to_bits(f);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
    uint32_t nan = u | 0x00400000u;
    return bits_to_f32(((u & 0x7fffffffu) > 0x7f800000u) ? (nan & 0xffff0000u) : rounded);
  }
};

struct FmtF16 {
  using S = uint16_t;
  using C = float;
  static constexpr int kTag = kF16;
#if defined(__CUDA_ARCH__)
  static MKF_RI C load(S v) { return __half2float(__ushort_as_half(v)); }
  static MKF_RI S store(C f) { return __half_as_ushort(__float2half_rn(f)); }
#elif defined(__FLT16_MAX__) && !defined(MKF_NO_FLOAT16)
  // _Float16: hardware conversions where the level has them (F16C), exact software ones otherwise.
  static MKF_RI C load(S v) {
    _Float16 h;
    __builtin_memcpy(&h, &v, 2);
    return static_cast<float>(h);
  }
  static MKF_RI S store(C f) {
    _Float16 h = static_cast<_Float16>(f);
    S v;
    __builtin_memcpy(&v, &h, 2);
    return v;
  }
#else
  static MKF_RI C load(S v) { return f16_to_f32(v); }
  static MKF_RI S store(C f) { return f32_to_f16(f); }
#endif
  static MKF_RI C round(C f) { return load(store(f)); }
};

}  // namespace mkf
