// The element math of the select and combine ops, written once for host and device (the C++
// CPU kernels, the CUDA kernels; triton_kernels/combine.py restates it in Triton).
//
// The spec is mergekit_fast/methods/_task_arithmetic.py (mergekit 0.1.5's
// GeneralizedTaskArithmeticMerge): every step rounds to the input dtype D exactly where torch
// does. "rD(v)" below is v rounded to D; the arithmetic runs in A = fp32 for 16- and 32-bit D
// (torch's opmath for bf16/fp16) and in fp64 for fp64 D. Per non-base input i and element j:
//
//   d  = rD(x - base)
//   s  = the sparsified delta, by the input's work kind (where mergekit's sparsifier computes):
//          kWorkD  (magnitude selections; DARE/DELLA on bf16 and fp32): s = rD(d * m), then with a
//                  rescale s = rD(s * f), f a D value
//          kWorkC  (fp32 work for 16-bit D: DARE/DELLA on fp16, and precise_sparsify; fp64 work
//                  for fp64 D with precise_sparsify): u = d * m (exact), u = rC(u * f), s = rD(u)
//          kWork32 (DARE/DELLA on fp64: mergekit works in fp32): u = f32(d) * m,
//                  u = f32(u * f), s = u
//        m is 1 or 0 *as a factor* (d * 0 is -0 for a negative d and NaN for an infinite one, as
//        torch's delta * mask is); kMaskAll is d itself, kMaskZero a +0 (torch.zeros_like).
//   v  = rD(s * w), w the weight rounded to D
// then over the inputs (S(.) = a sum in A from 0, input by input, rounded to D: torch's order for
// a stack of up to 4 inputs; more are summed in fp64 and rounded once):
//   consensus sum:   majority = S(v) >= 0 ? +1 : -1      (NaN: -1)
//   consensus count: majority = sum sign(v) >= 0 ? +1 : -1   (sign(NaN) = 0, as torch.sign)
//   agree = sign(v) == majority;  mixed = S(rD(v * agree));  divisor = S(rD(w * agree)), 1 if 0
//   no consensus:    mixed = S(v), divisor = the scalar S(w) (1 where |S(w)| < rD(1e-8))
//   normalize: mixed = rD(mixed / divisor);  lambda != 1: mixed = rD(mixed * fp32(lambda));
//   out = rD(base + mixed).
//
// Keep masks of the magnitude selections come from a rule on the magnitude key (the fp32 bit
// pattern of |d| as fp32, every NaN mapped to kNanKey, above +inf: the order of torch's CPU sort
// comparators) and, for keys equal to a threshold, a tie bitmap written by select's introselect.
#pragma once
#include <cstdint>

#include "dtype.h"
#include "hd.h"
#include "philox.h"

namespace mkf {

constexpr uint32_t kNanKey = 0x7FC00000u;

// mask kinds of one input (CombineInput::mask)
enum TaMask : uint32_t { kMaskAll = 0, kMaskZero = 1, kMaskRule = 2, kMaskBitmap = 3, kMaskRandom = 4 };
// work kinds (CombineInput::work)
enum TaWork : uint32_t { kWorkD = 0, kWorkC = 1, kWork32 = 2 };
// rule flags (CombineInput::rule_flags): keys equal to lo (hi) are all kept unless a tie bitmap
// decides them
enum TaRuleFlags : uint32_t { kLoAll = 1, kHiAll = 2 };
// consensus (CombineSeg::consensus)
enum TaConsensus : int32_t { kConsensusNone = 0, kConsensusSum = 1, kConsensusCount = 2 };
// Stacks of up to this many inputs are summed in torch's order (sequentially from 0 in A).
constexpr int kTaSeqSumMax = 4;

MKF_HD uint32_t ta_key(float f) {
  uint32_t u = f32_to_bits(f) & 0x7fffffffu;
  return u > 0x7f800000u ? kNanKey : u;
}
MKF_HD uint32_t ta_key(double d) { return ta_key(static_cast<float>(d)); }

// keep by the threshold rule: lo < key < hi, a key equal to lo or hi kept when its flag says all
// are, else when its tie bit is set (bitwise logic, no short circuit: CPU loops over it vectorise)
MKF_HD bool ta_rule_keep(uint32_t key, uint32_t lo, uint32_t hi, uint32_t flags, bool tie_bit) {
  const bool above = (key > lo) | ((key == lo) & (((flags & kLoAll) != 0) | tie_bit));
  const bool below = (key < hi) | ((key == hi) & (((flags & kHiAll) != 0) | tie_bit));
  return above & below;
}

MKF_HD bool ta_bit(const uint64_t* bm, int64_t j) {
  return ((bm[j >> 6] >> (j & 63)) & 1u) != 0;
}

// Bernoulli keep of a DARE draw: (word >> 8) * 2^-24 < p, i.e. (word >> 8) < thr with
// thr = ceil(p * 2^24) (p in fp32)
MKF_HD bool ta_draw_keep(uint32_t word, uint32_t thr) { return (word >> 8) < thr; }

// m as a factor: x * 1 or x * 0 (the sign of zero, NaN for Inf and NaN)
template <typename A>
MKF_HD A ta_masked(A x, bool keep) {
  return keep ? x : x * A(0);
}

// sign as torch.sign: -1, 0 or 1; 0 for NaN
template <typename A>
MKF_HD A ta_sign(A x) {
  return x > A(0) ? A(1) : (x < A(0) ? A(-1) : A(0));
}

// DELLA's keep probability of rank r (0-based) in a row of len elements, mergekit's arithmetic in
// the work dtype W: ranks + 1, normalised by (max - min) of the row ranks, clamped, then
// (density - epsilon) + rank_norm * 2 * epsilon. RW rounds a value to W (A = float or double);
// dme = rW(fp32(density - epsilon)) (torch converts the scalar of an add to the tensor's dtype),
// eps = fp32(epsilon) (the scalar of a mul stays in the fp32 opmath).
template <typename A, typename RW>
MKF_HD A della_prob(int64_t r, int64_t len, A dme, A eps, RW rw) {
  A one = A(1);
  A rank = rw(rw(static_cast<A>(r)) + one);
  A lo = one;  // rw(rw(0) + 1)
  A hi = rw(rw(static_cast<A>(len - 1)) + one);
  A norm = rw(rw(rank - lo) / rw(hi - lo));
  norm = norm < A(0) ? A(0) : (norm > one ? one : norm);
  A t = rw(rw(norm * A(2)) * eps);
  return rw(dme + t);
}

}  // namespace mkf
