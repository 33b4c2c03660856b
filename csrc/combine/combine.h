// The combine op: base + lambda * sum_i w_i * mask_i * (x_i - base) / divisor, with the masks
// built inside the kernel (select's threshold rules and tie bitmaps, the Philox Bernoulli draw),
// mergekit's L1 rescale, TIES' sign election, and the rounding of every step to the input dtype
// where torch rounds (the spec: common/ta_math.h). Linear is its simplest case.
#pragma once
#include <cstdint>

#include "common/cpu_isa.h"

namespace mkf {

// The most non-base inputs one combine takes (their sums follow torch's order up to
// kTaSeqSumMax; the Python side sends larger stacks to the torch path).
constexpr int kCombineMaxInputs = 8;

// ---- CPU (csrc/combine/combine_cpu.cpp) ----
#define MKF_COMBINE_CPU_API                                                                       \
  /* One output tensor of the task-arithmetic family. Per non-base input i (count of them): */   \
  /* xs[i] its data; masks[i] a TaMask; works[i] a TaWork; rules[3 i ..] lo, hi, flags of a */    \
  /* kMaskRule; bitmaps[i] the address of its tie bitmap (0: none); thrs[i] the Bernoulli */      \
  /* threshold and hashes[i] the Philox stream hash of a kMaskRandom; weights[i] its weight. */  \
  /* rescale: mergekit's L1 rescale of the sparsified deltas (a first pass for the norms). */      \
  /* Returns 1 when every output element is finite, else 0. */                                  \
  int ta_combine_cpu(int dtype, int64_t n, const void* base, void* out, int64_t count,          \
                     const uint64_t* xs, const uint32_t* masks, const uint32_t* works,            \
                     const uint32_t* rules, const uint64_t* bitmaps, const uint32_t* thrs,        \
                     const uint64_t* hashes, const double* weights, uint64_t seed,                \
                     int consensus, int normalize, int rescale, double lambda, int threads);      \
  /* linear: out = (sum_i w_i x_i) [/ sum_i w_i], in fp32 (fp64 for fp64), as mergekit's */       \
  /* addcmul loop; weights rounded to fp32. Returns 1 when every output element is finite. */      \
  int linear_cpu(int dtype, int64_t n, int64_t count, const uint64_t* xs, void* out,            \
                 const double* weights, int normalize, int threads);                               \
  /* The pointwise methods (combine/pointwise_cpu.cpp, math in common/pointwise_math.h), in */     \
  /* the input dtype as their torch references; each returns 1 when every output is finite. */    \
  /* nearswap: base and one model. */                                                           \
  int nearswap_cpu(int dtype, int64_t n, const void* base, const void* x, void* out, double t,   \
                   int threads);                                                                 \
  /* ram: base and m models (xs, 1 <= m <= kCombineMaxInputs). */                                \
  int ram_cpu(int dtype, int64_t n, int64_t m, const void* base, const uint64_t* xs, void* out,  \
              double epsilon, int threads);                                                      \
  /* ramplus_tl: as ram, a first pass for the per-model counts; its fp32 result (fp64 for fp64) */ \
  /* stored in out_dtype: the input dtype, or fp32 for 16-bit inputs. */                          \
  int ramplus_tl_cpu(int dtype, int out_dtype, int64_t n, int64_t m, const void* base,           \
                     const uint64_t* xs, void* out, double r, double alpha, double epsilon,       \
                     int threads);                                                                \
  /* sce's passes (mergekit 0.1.5 sce, after the variance selection: select/select.h */           \
  /* sce_select_cpu), m models (1 <= m <= kCombineMaxInputs), keep: the selection's bitmap, or */   \
  /* 0 (select_topk >= 1: no mask). The selected deltas s_i = rD(rD(x_i - base) * keep). */        \
  /* sce_squares: rD(s_i^2) into out[i * n + j] (the tensor whose per-model mean torch takes; */  \
  /* out may be 0) and, when sums is not 0, sums[i] = their fp64 sum (blocks of 2^14 in index */   \
  /* order, the same for any thread count). */                                                   \
  void sce_squares_cpu(int dtype, int64_t n, int64_t m, const void* base, const uint64_t* xs,     \
                       const uint64_t* keep, void* out, double* sums, int threads);              \
  /* sce_apply: the sum sign consensus and the weighted mean with the weights w (m values of */    \
  /* the dtype): base + S(s_i * w_i a_i) / max(S(w_i a_i), 1e-6), a_i = sign(s_i) == the sign of */ \
  /* S(s_i) (>= 0 counts as +). Returns 1 when every output element is finite. */                   \
  int sce_apply_cpu(int dtype, int64_t n, int64_t m, const void* base, const uint64_t* xs,       \
                    const uint64_t* keep, const double* w, void* out, int threads)
MKF_COMBINE_CPU_API;
MKF_DECLARE_PER_ISA(MKF_COMBINE_CPU_API)

}  // namespace mkf
