// The gram op's per-element terms, written once for host and device.
//
// G[i][j] = sum_e d_i[e] d_j[e] over the elements e of k same-shaped tensors x_i, where
// d_i = x_i, or with a base tensor d_i = x_i - base; every sum accumulates in fp64.
//
// Two roundings (the `rounding` argument of every entry point):
//   kGramFp64  d_i = x_i - base in fp64 and every product in fp64: the Gram matrix of the
//              values, as exactly as fp64 holds it;
//   kGramInput as torch computes these quantities in the input dtype (common/rounding.h):
//              d_i = R(x_i - base) (an op in that dtype), the off-diagonal terms R(d_i d_j)
//              (`(d_i * d_j).sum()`), and the diagonal terms d_i^2 unrounded (`torch.norm(d_i)`
//              squares in its accumulation type). model_stock's cosines are exactly these sums.
// Both are exact for the products of 16-bit values (fp64 holds them), so the sums differ from the
// exact ones only by fp64 accumulation error: about n 2^-53 relative to sum |terms|.
#pragma once
#include <cstdint>
#include <type_traits>

#include "common/rounding.h"

namespace mkf {

enum GramRounding : int { kGramFp64 = 0, kGramInput = 1 };

// Most inputs one call takes (k); more go through the torch reference.
constexpr int kGramMaxInputs = 16;

template <typename F, bool kRound>
struct GramTerm {
  using S = typename F::S;
  using C = typename F::C;
  // the type a task vector's element is held in: the dtype's value (in C), or fp64
  using D = std::conditional_t<kRound, C, double>;

  static MKF_RI D value(S x) { return static_cast<D>(F::load(x)); }
  static MKF_RI D delta(S x, S b) {
    if constexpr (kRound) {
      return F::round(F::load(x) - F::load(b));
    } else {
      return static_cast<double>(F::load(x)) - static_cast<double>(F::load(b));
    }
  }
  static MKF_RI double square(D d) { return static_cast<double>(d) * static_cast<double>(d); }
  static MKF_RI double product(D a, D b) {
    if constexpr (kRound) {
      return static_cast<double>(F::round(a * b));
    } else {
      return a * b;
    }
  }
};

}  // namespace mkf
