// The scalar math of the gram-based merge methods (model_stock, nuslerp, multislerp, karcher),
// written once for host and device, in the input dtype's arithmetic (common/rounding.h).
//
// The torch references (mergekit_fast/methods/*.py) are the spec: they run mergekit 0.1.5's ops
// in the input dtype, so every intermediate is a value of that dtype, and each op rounds once
// (16-bit dtypes: an fp32 op, then a rounding to the dtype). The functions below replay those ops
// one by one on values held in the compute type C: `R(x)` is F::round(x). The sums the ops take
// over whole tensors (norms, dot products) arrive as fp64 sums of exactly the terms torch adds
// (squares of the dtype's values, or products rounded to the dtype); torch adds them in fp32 (in
// fp64 for fp64 tensors) and rounds once, so `sum_to<F>` converts the fp64 sum to C and rounds.
// For 16-bit dtypes that is the value torch computes except where torch's own fp32 rounding error
// moves a sum across a rounding boundary of the 16-bit dtype (about 1e-5 of the sums of 4096
// terms; tests/test_methods_native.py measures it); for fp32 and fp64 tensors torch's order of
// additions cannot be matched, and the methods' tolerance_of covers the difference.
//
// Comparisons with a Python scalar (`x < 1e-6`) compare in the tensor's dtype, the scalar rounded
// to it, as torch does; clamps keep NaN.
#pragma once
#include <cmath>

#include "common/hd.h"
#include "common/rounding.h"

namespace mkf {

// libm functions by compute type (glibc's acosf etc. on the host, as torch's scalar loops use).
MKF_HD float m_sqrt(float x) { return sqrtf(x); }
MKF_HD double m_sqrt(double x) { return sqrt(x); }
MKF_HD float m_acos(float x) { return acosf(x); }
MKF_HD double m_acos(double x) { return acos(x); }
MKF_HD float m_sin(float x) { return sinf(x); }
MKF_HD double m_sin(double x) { return sin(x); }
MKF_HD float m_cos(float x) { return cosf(x); }
MKF_HD double m_cos(double x) { return cos(x); }

// The value torch holds for a sum of terms of F's dtype whose exact-ish fp64 sum is s.
template <typename F>
MKF_HD typename F::C sum_to(double s) {
  return F::round(static_cast<typename F::C>(s));
}

// torch.norm of a tensor of F's dtype whose squares add up to s (fp64).
template <typename F>
MKF_HD typename F::C norm_of(double s) {
  using C = typename F::C;
  return F::round(m_sqrt(static_cast<C>(s)));
}

// x.clamp(min=lo) with lo a Python float (rounded to the dtype); NaN stays NaN.
template <typename F>
MKF_HD typename F::C clamp_min(typename F::C x, double lo) {
  using C = typename F::C;
  C m = F::round(static_cast<C>(lo));
  return (x < m) ? m : x;  // NaN < m is false: NaN stays
}

// x.clamp(-1, 1); NaN stays NaN.
template <typename C>
MKF_HD C clamp_unit(C x) {
  return x < C(-1) ? C(-1) : (x > C(1) ? C(1) : x);
}

// A Python float as the compute type (how it enters an op on a tensor of F's dtype).
template <typename F>
MKF_HD typename F::C scalar(double v) {
  return static_cast<typename F::C>(v);
}

// ------------------------------------------------------------------------------- model_stock
// From the Gram matrix of the N task vectors d_i = R(x_i - base) in the "input" rounding
// (diagonal: sums of d_i^2; off-diagonal: sums of R(d_i d_j)), row-major N x N:
//   norm_i = R(sqrt(G_ii)), dot_ij = R(G_ij),
//   cos_ij = clamp(R(dot_ij / clamp(R(norm_i norm_j), min=1e-6)), -1, 1),
//   cos = R(sum_{i<j} cos_ij / K) (K = N(N-1)/2: torch's mean adds in fp32 and divides once),
//   den = R(1 + R((N - 1) cos)), t = 0 where |den| < 1e-6, else R(R(N cos) / den).
// Returns t (a value of the dtype, in C).
template <typename F>
MKF_HD typename F::C model_stock_t(const double* G, int n) {
  using C = typename F::C;
  C acc = C(0);
  int pairs = 0;
  for (int i = 0; i < n; ++i) {
    for (int j = i + 1; j < n; ++j) {
      C ni = norm_of<F>(G[i * n + i]);
      C nj = norm_of<F>(G[j * n + j]);
      C den = clamp_min<F>(F::round(ni * nj), 1e-6);
      C c = clamp_unit(F::round(sum_to<F>(G[i * n + j]) / den));
      acc = acc + c;  // the mean's sum (fp32 for 16-bit dtypes: not rounded per term)
      ++pairs;
    }
  }
  C cos = F::round(acc / static_cast<C>(pairs));
  C den = F::round(C(1) + F::round(static_cast<C>(n - 1) * cos));
  C thr = F::round(scalar<F>(1e-6));
  C aden = den < C(0) ? -den : den;
  if (aden < thr) return C(0);  // the models cancel out: keep the base (NaN is not < thr)
  return F::round(F::round(static_cast<C>(n) * cos) / den);
}

// ------------------------------------------------------------------------------- nuslerp
// Scalars of one interpolated vector pair (t from the weights, in fp64 as mergekit's Python).
template <typename F>
struct NuslerpCoeffs {
  typename F::C n0, n1;  // the clamped norms the vectors are divided by
  typename F::C s0, s1, st;  // R(sin((1-t) theta)), R(sin(t theta)), R(sin(theta))
  typename F::C l0, l1;      // (1 - t) and t as the compute type (the lerp's Python scalars)
  bool colinear;
};

// The norms (pass 1: sums of squares of the vectors) clamped as nuslerp does: max(norm, 1e-7).
template <typename F>
MKF_HD typename F::C nuslerp_norm(double sum_sq) {
  return clamp_min<F>(norm_of<F>(sum_sq), 1e-7);
}

// After pass 2 (the sum of R(R(v0/n0) R(v1/n1))): the angle and the sines.
template <typename F>
MKF_HD void nuslerp_angle(NuslerpCoeffs<F>& c, double dot_sum, double t) {
  using C = typename F::C;
  C cos = clamp_unit(sum_to<F>(dot_sum));
  C one_minus_sq = F::round(C(1) - F::round(cos * cos));
  C eps = F::round(scalar<F>(1e-16));
  c.colinear = one_minus_sq <= eps;  // NaN: false (spherical, NaN everywhere)
  C theta = F::round(m_acos(c.colinear ? C(0) : cos));
  c.s0 = F::round(m_sin(F::round(scalar<F>(1.0 - t) * theta)));
  c.s1 = F::round(m_sin(F::round(scalar<F>(t) * theta)));
  c.st = F::round(m_sin(theta));
  c.l0 = scalar<F>(1.0 - t);
  c.l1 = scalar<F>(t);
}

// One element: R(R(R(s0 v0) + R(s1 v1)) / st), or the lerp R(R((1-t) v0) + R(t v1)).
template <typename F>
MKF_HD typename F::C nuslerp_elem(const NuslerpCoeffs<F>& c, typename F::C v0, typename F::C v1) {
  if (c.colinear) return F::round(F::round(c.l0 * v0) + F::round(c.l1 * v1));
  return F::round(F::round(F::round(c.s0 * v0) + F::round(c.s1 * v1)) / c.st);
}

}  // namespace mkf
