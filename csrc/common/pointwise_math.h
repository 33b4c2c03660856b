// The per-element math of the pointwise merge methods (nearswap, ram, ramplus_tl), written once for
// host and device, op by op as the torch references (mergekit_fast/methods/*.py) compute them in the
// input dtype (common/rounding.h: `F::round` is one store to the dtype; F::C the compute type).
//
// torch's roundings replayed here:
// * `t / d` with a Python scalar t is `d.reciprocal() * t` (Tensor.__rtruediv__): two roundings;
// * a comparison with a Python scalar (`|d| > epsilon`, `clamp(min=1e-6)`) rounds the scalar to the
//   dtype; arithmetic with one (`r * rho`, `1 - w`) takes it as the compute type;
// * a bool mask in arithmetic is 1 or 0 of the dtype: `d * False` is a signed zero, or NaN for an
//   infinite d, as torch gives;
// * sums over the models (`.sum(dim=0)`) add in the compute type from +0, model by model (torch's
//   outer reduction for up to 16 rows), and round once.
#pragma once
#include <cmath>
#include <cstdint>

#include "common/hd.h"
#include "common/method_math.h"
#include "common/rounding.h"

namespace mkf {

template <typename C>
MKF_HD C m_abs(C x) {
  return std::fabs(x);  // clears the sign of a NaN too, as torch.abs
}

// ------------------------------------------------------------------------------- nearswap
// w = clamp(R(R(1 / max(|R(b - x)|, lo)) * t), 0, 1); R(R(w x) + R(R(1 - w) b)), lo the clamp's 1e-6
// in the dtype (clamp_min's rounding) and t as the compute type.
template <typename F>
MKF_HD typename F::C nearswap_elem(typename F::C b, typename F::C x, typename F::C t, typename F::C lo) {
  using C = typename F::C;
  C d = m_abs(F::round(b - x));
  d = (d < lo) ? lo : d;  // clamp(min=1e-6): NaN stays
  C w = F::round(F::round(C(1) / d) * t);
  w = w < C(0) ? C(0) : (w > C(1) ? C(1) : w);  // clamp(0, 1): NaN stays
  return F::round(F::round(w * x) + F::round(F::round(C(1) - w) * b));
}

// ------------------------------------------------------------------------------- ram, ramplus_tl
// The task vector d = R(x - b) and whether it counts (|d| > epsilon, epsilon rounded to the dtype).
template <typename F>
MKF_HD bool ram_changed(typename F::C d, typename F::C eps) {
  return m_abs(d) > eps;
}

// ramplus_tl's lambda_i from the model's counts over the tensor, in fp32 as mergekit (an int64 count
// divided by the fp32 clamp of another count): 1 + r * clamp(shared / max(unique, epsilon), 0, alpha).
MKF_HD float ramplus_lambda(int64_t shared, int64_t unique, double r, double alpha, double epsilon) {
  const float u = static_cast<float>(unique);
  const float e = static_cast<float>(epsilon);
  const float rho = static_cast<float>(shared) / (u < e ? e : u);
  const float a = static_cast<float>(alpha);
  float c = rho < 0.0f ? 0.0f : rho;  // torch's clamp: max with min, then min with max; NaN stays
  c = c > a ? a : c;
  return 1.0f + static_cast<float>(r) * c;
}

}  // namespace mkf
