// The MoE top-k routing selection rule, written once for the C++ CPU kernel and the CUDA kernel.
// mergekit_fast/ops/routing.py (topk_routing_ref) is the spec in plain torch and
// triton_kernels/routing.py ports the same operations; every backend performs the same IEEE fp32
// operations in the same order, so all of them return bit-identical ids AND weights.
//
// Per token (row x of E logits, converted to fp32):
//   valid_i  = !isnan(x_i)
//   softmax scores (only computed where needed):
//     m   = max of the valid x (-inf when none)
//     e_i = valid_i ? exp_f32(x_i == m ? 0 : x_i - m) : 0      (x_i == m also covers m = +-inf)
//     Z   = from_fixed(sum_i to_fixed(e_i))                      (exact int64 sum: order-free)
//     s_i = Z > 0 ? e_i / Z : 0
//   sigmoid scores: s_i = valid_i ? 1 / (1 + exp_f32(-x_i)) : 0
//   selection value v_i = x_i when there is no bias and no top-2-sum group stage (same order as
//     the scores, without their rounding ties), else s_i + bias_i (bias 0 when absent).
//   rank key: order_key(v_i) (0 for an invalid expert or a NaN v_i, i.e. below -inf), packed with
//     the inverted index so that one unsigned max picks the larger value, then the lower index.
//   groups (active when topk_groups < num_groups): group value = value of its best member (max)
//     or sum of its two best members' values (top2_sum); a member ranked by key 0 counts as -inf,
//     a NaN group value ranks below every other; keep the topk_groups best groups (ties: lower
//     group index), exclude the experts of the others.
//   top-k by packed key, in descending order.
//   weights (from the selected logits x_j, in selection order j = 0..k-1):
//     softmax, renormalize:  m' = max valid selected x; t_j = valid ? exp_f32(x_j == m' ? 0 : x_j - m') : 0
//     softmax, otherwise:    t_j = s_j (same formula as above, recomputed from x_j, m and Z)
//     sigmoid:               t_j = s_j
//     renormalize:           den = ((t_0 + t_1) + ...) + 1e-20f; w_j = t_j / den
//     w_j = w_j * scaling
//
// exp_f32 uses only +, -, *, integer ops and bit casts (Cephes expf's range reduction and
// polynomial), so it rounds identically under gcc (-ffp-contract=off), nvcc (--fmad=false), the
// Triton kernel (enable_fp_fusion=False) and torch's elementwise ops. Its error against the exact
// exp is below 2 ulp.
#pragma once
#include <cstdint>

#include "dtype.h"
#include "hd.h"

namespace mkf {
namespace routing {

enum Scoring : int { kSoftmax = 0, kSigmoid = 1 };
enum GroupScore : int { kGroupMax = 0, kGroupTop2Sum = 1 };

// 2^40: e_i in [0, 1] becomes an integer below 2^40 + 1, so up to 2^22 experts sum in an int64.
constexpr float kFixedScale = 0x1p40f;
constexpr float kFixedInv = 0x1p-40f;
constexpr float kRenormEps = 0x1.79ca1p-67f;  // fp32(1e-20), as transformers adds it
constexpr uint64_t kTaken = 0;                // packed key of an excluded / already chosen expert

// What one routing call computes; the same for every token.
struct RouteConfig {
  int64_t E;
  int64_t k;
  int scoring;
  bool renormalize;
  bool has_bias;
  int64_t num_groups;   // 0: no group stage
  int64_t topk_groups;  // groups kept when num_groups > 0
  int group_score;
  float scaling;

  MKF_HD bool groups_active() const { return num_groups > 0 && topk_groups < num_groups; }
  MKF_HD int64_t group_size() const { return num_groups > 0 ? E / num_groups : E; }
  // Selection compares the logits themselves (no bias, no top-2-sum group stage).
  MKF_HD bool select_on_logits() const {
    return !has_bias && !(groups_active() && group_score == kGroupTop2Sum);
  }
  // Softmax statistics (m, Z) are needed for the keys or for unrenormalised weights.
  MKF_HD bool need_softmax_stats() const {
    return scoring == kSoftmax && (!select_on_logits() || !renormalize);
  }
};

MKF_HD float f32_inf() { return bits_to_f32(0x7f800000u); }

MKF_HD float pow2i(int n) {  // 2^n for n in [-126, 127]
  return bits_to_f32(static_cast<uint32_t>(n + 127) << 23);
}

// exp(x) in fp32 from basic operations only (see the file comment). NaN -> NaN.
MKF_HD float exp_f32(float x) {
  if (x != x) return x;
  if (x > 89.0f) return f32_inf();
  if (x < -104.0f) return 0.0f;
  // n = rint(x * log2(e)) by the 1.5 * 2^23 trick (round to nearest even).
  float n = (x * 0x1.715476p+0f + 12582912.0f) - 12582912.0f;
  // r = x - n * ln2 in two steps (Cody-Waite): n * 0x1.63p-1 is exact for |n| <= 2^15.
  float r = x - n * 0x1.63p-1f;
  r = r - n * -0x1.bd0106p-13f;
  float z = r * r;
  float p = 0x1.a0d2cep-13f;
  p = p * r + 0x1.6e879cp-10f;
  p = p * r + 0x1.111210p-7f;
  p = p * r + 0x1.555382p-5f;
  p = p * r + 0x1.555554p-3f;
  p = p * r + 0x1p-1f;
  p = (p * z + r) + 1.0f;
  // Scale by 2^n in two exact-or-once-rounded steps: n in [-150, 128] -> halves in [-75, 64].
  int ni = static_cast<int>(n);
  int n1 = ni >> 1;
  int n2 = ni - n1;
  return (p * pow2i(n1)) * pow2i(n2);
}

MKF_HD float sigmoid_f32(float x) { return 1.0f / (1.0f + exp_f32(-x)); }

// exp(x - m) for the softmax numerators; x == m (including m = +-inf) gives exactly 1.
MKF_HD float softmax_numerator(float x, float m) {
  if (x != x) return 0.0f;
  return exp_f32(x == m ? 0.0f : x - m);
}

MKF_HD int64_t to_fixed(float e) { return static_cast<int64_t>(e * kFixedScale); }
MKF_HD float from_fixed(int64_t q) { return static_cast<float>(q) * kFixedInv; }
MKF_HD float softmax_score(float e, float z) { return z > 0.0f ? e / z : 0.0f; }

// Monotone map of fp32 values to uint32 (larger value -> larger key). -0 and +0 share a key;
// NaN maps to 0, below every number (-inf maps to 0x007fffff).
MKF_HD uint32_t order_key(float v) {
  if (v != v) return 0u;
  if (v == 0.0f) v = 0.0f;
  uint32_t u = f32_to_bits(v);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Inverse of order_key; key 0 (NaN or invalid) reads as -inf.
MKF_HD float key_value(uint32_t key) {
  if (key == 0u) return -f32_inf();
  uint32_t u = (key & 0x80000000u) ? (key & 0x7fffffffu) : ~key;
  return bits_to_f32(u);
}

MKF_HD uint64_t pack(uint32_t key, uint32_t index) {
  return (static_cast<uint64_t>(key) << 32) | static_cast<uint64_t>(0xffffffffu - index);
}
MKF_HD uint32_t packed_index(uint64_t packed) {
  return 0xffffffffu - static_cast<uint32_t>(packed & 0xffffffffull);
}
MKF_HD uint32_t packed_key(uint64_t packed) { return static_cast<uint32_t>(packed >> 32); }

// The rank key of expert i: x = its logit, s = its score (unused when selecting on logits).
MKF_HD uint32_t expert_key(const RouteConfig& c, float x, float s, float bias) {
  if (x != x) return 0u;
  if (c.select_on_logits()) return order_key(x);
  return order_key(c.has_bias ? s + bias : s);
}

// Group value from the packed keys of the group's best and second-best members.
MKF_HD float group_value(const RouteConfig& c, uint64_t best, uint64_t second) {
  float a = key_value(packed_key(best));
  if (c.group_score == kGroupMax) return a;
  return a + key_value(packed_key(second));
}

// Score of expert i from its logit and the row statistics m, Z (softmax) -- s_i in the spec.
MKF_HD float row_score(const RouteConfig& c, float x, float m, float z) {
  if (x != x) return 0.0f;
  if (c.scoring == kSigmoid) return sigmoid_f32(x);
  return softmax_score(softmax_numerator(x, m), z);
}

// Weight term t_j of a selected expert with logit x; m_sel = max valid selected logit.
MKF_HD float weight_term(const RouteConfig& c, float x, float m_sel, float m, float z) {
  if (c.scoring == kSoftmax && c.renormalize) return softmax_numerator(x, m_sel);
  return row_score(c, x, m, z);
}

}  // namespace routing
}  // namespace mkf
