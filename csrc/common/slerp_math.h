// SLERP coefficient math, written once for host and device.
//
// Semantics are mergekit 0.1.5's slerp (merge_methods/slerp.py), for one whole flattened tensor:
//   |a|, |b| at or below eps count as 1; dot = a.b / (|a||b|) clamped to [-1, 1];
//   |dot| > dot_threshold -> lerp coefficients (1 - t, t);
//   else theta = acos(dot), c_a = sin((1-t) theta) / sin(theta), c_b = sin(t theta) / sin(theta).
// The result is c_a * a + c_b * b on the unnormalised inputs.
//
// The three sums (|a|^2, |b|^2, a.b) arrive in fp64: squares of bf16/fp32 values up to their max
// (3.4e38) overflow fp32 accumulators, while fp64 holds them with room to spare. mergekit
// normalises chunks before the dot for the same reason; both agree to fp32 rounding.
//
// Non-finite inputs: a NaN or Inf anywhere in a or b makes a sum NaN or Inf, the dot NaN, and
// both coefficients NaN, so every output element is NaN. mergekit 0.1.5 behaves the same way.
#pragma once
#include <cmath>

#include "hd.h"

namespace mkf {

struct SlerpCoeffs {
  double ca;
  double cb;
};

MKF_HD SlerpCoeffs slerp_coeffs(double sum_aa, double sum_bb, double sum_ab, double t, double eps,
                                double dot_threshold) {
  double na = sqrt(sum_aa);
  double nb = sqrt(sum_bb);
  // `!(x > eps)` keeps torch.where(norm > eps, norm, 1) semantics, NaN included.
  if (!(na > eps)) na = 1.0;
  if (!(nb > eps)) nb = 1.0;
  double dot = sum_ab / (na * nb);
  if (dot != dot) return SlerpCoeffs{dot, dot};  // NaN propagates to every element
  dot = dot < -1.0 ? -1.0 : (dot > 1.0 ? 1.0 : dot);
  if (fabs(dot) > dot_threshold) return SlerpCoeffs{1.0 - t, t};
  double theta = acos(dot);
  double s = sin(theta);
  return SlerpCoeffs{sin((1.0 - t) * theta) / s, sin(t * theta) / s};
}

}  // namespace mkf
