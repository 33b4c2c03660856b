// The gram op's entry points: the k x k fp64 dot products of k same-shaped tensors or of their
// differences to a base (common/gram_math.h has the terms and the two roundings). Pointers are raw
// host or device addresses, sizes element counts, `dtype` a mkf::DType tag. The Python side
// (mergekit_fast/ops/gram.py) validates shapes, dtypes, devices and contiguity first.
//
// Pointer tables: per tensor s, k + 1 addresses at ptrs[s * (k + 1)]: the k inputs, then the base
// (0: none). Outputs: per tensor, rows_s x k x k fp64 values, the tensors one after another, where
// rows_s = numel_s / row_len_s for a tensor summed per row of row_len_s elements and 1 for a whole
// tensor (row_len_s = 0; row_lens may be null: every tensor whole).
#pragma once
#include <cstdint>

#include "common/cpu_isa.h"
#include "common/gram_math.h"

namespace mkf {

// Elements per block of the CPU sums (csrc/gram/gram_blocks.h): streamed chunks start at multiples.
constexpr int64_t kGramBlock = 1 << 14;

// ---- CPU (csrc/gram/gram_cpu.cpp), per instruction-set level (common/cpu_isa.h) ----
#define MKF_GRAM_CPU_API                                                                         \
  /* Gram matrices of `count` tensors; deterministic for any thread count and CPU level. */     \
  void gram_cpu(int dtype, int64_t k, int64_t count, const uint64_t* ptrs, const int64_t* numels, \
                const int64_t* row_lens, int rounding, double* out, int threads);                \
  /* Streaming: the k x k sums of each kGramBlock block of one chunk of a whole tensor into */  \
  /* partials[block * k * k] (the blocks gram_cpu adds in order); returns the block count. */    \
  int64_t gram_partials_cpu(int dtype, int64_t k, const uint64_t* ptrs, int64_t n, int rounding, \
                            double* partials, int threads)
MKF_GRAM_CPU_API;
MKF_DECLARE_PER_ISA(MKF_GRAM_CPU_API)

#if defined(MKF_WITH_CUDA)
// ---- CUDA (csrc/gram/gram_cuda.cu) ----
// One whole tensor (row_len 0) or one tensor per row: a partial-sum kernel over fixed chunks of
// kGramCudaChunk elements writing fp64 partials into `workspace` (gram_cuda_workspace_bytes),
// then a fixed-order reduction into out (device memory, rows x k x k fp64). No host sync.
constexpr int64_t kGramCudaChunk = 1 << 14;
int64_t gram_cuda_workspace_bytes(int64_t k, int64_t n, int64_t row_len);
void gram_cuda(int dtype, int64_t k, const uint64_t* host_ptrs, int64_t n, int64_t row_len,
               int rounding, double* out, void* workspace, uintptr_t stream);
// Many small whole tensors in one launch, one block per tensor: `table` is a DEVICE array of
// count * (k + 2) int64 values: per tensor the k input addresses, the base address (0: none) and
// the numel; out is count x k x k fp64 (device).
void gram_segments_cuda(int dtype, int64_t k, int64_t count, const int64_t* table, int rounding,
                        double* out, uintptr_t stream);
#endif

}  // namespace mkf

namespace mkf {

// ---- the elementwise apply steps of the gram-based methods (csrc/gram/apply_cpu.cpp) ----
// model_stock: out = R(R(t * avg) + R(R(1 - t) * base)) with avg = R(s / n), s = R(...R(R(0 + x_0)
// + x_1)... + x_{n-1}): mergekit's `t * (sum(models) / n) + (1 - t) * base` op by op in the
// tensor's dtype (common/rounding.h). ptrs: the n models, the base, then the output; `ts` holds
// one t per row of row_len elements (row_len 0: one t for the whole tensor), values of the dtype.
// model_stock_cpu: the whole method (16-bit dtypes give mergekit's bits; common/method_math.h):
// the gram of the task vectors in the input rounding, t per row (row_len 0: one t), then the apply
// above. Same ptrs; returns how many output elements are not finite.
// nuslerp_cpu: mergekit's nuslerp of v_i = x_i - base (or x_i; ptrs: x_0, x_1, the base or 0, the
// output) per row of row_len elements (0: the whole tensor), op by op in the dtype: the norms (the
// gram), the dot of the normalised vectors (a second pass), the interpolation (a third); returns
// how many output elements are not finite (common/method_math.h has the scalar math).
#define MKF_GRAM_APPLY_CPU_API                                                                  \
  void model_stock_apply_cpu(int dtype, int64_t n_models, const uint64_t* ptrs, int64_t numel, \
                             int64_t row_len, const double* ts, int threads);                   \
  int64_t model_stock_cpu(int dtype, int64_t n_models, const uint64_t* ptrs, int64_t numel,     \
                          int64_t row_len, int threads);                                         \
  int64_t nuslerp_cpu(int dtype, const uint64_t* ptrs, int64_t numel, int64_t row_len, double t, \
                      int threads);                                                              \
  /* multislerp's and karcher's elementwise passes between torch's reductions */                \
  /* (csrc/gram/sphere_cpu.cpp lists them and their pointer and scalar tables); 16-bit dtypes; */ \
  /* the last pass returns how many output elements are not finite. */                          \
  int64_t multislerp_pass_cpu(int dtype, int pass, int64_t n, int64_t numel, const uint64_t* ptrs, \
                              const double* scalars, int threads);                             \
  int64_t karcher_pass_cpu(int dtype, int pass, int64_t n, int64_t numel, const uint64_t* ptrs,  \
                           const double* scalars, int threads);                                 \
  /* nuslerp of one long vector pair between torch's reductions, 16-bit dtypes: pass 0 the */    \
  /* deltas (ptrs x_0, x_1, base, v_0, v_1), 1 the dot's terms R(R(v_0/n_0) R(v_1/n_1)) (ptrs */ \
  /* v_0, v_1, out; scalars n_0, n_1), 2 the interpolation plus the base (ptrs v_0, v_1, base */  \
  /* or 0, out; scalars colinear, s_0, s_1, sin theta, 1 - t, t); pass 2 returns how many */      \
  /* outputs are not finite. */                                                                 \
  int64_t nuslerp_pass_cpu(int dtype, int pass, int64_t numel, const uint64_t* ptrs,            \
                           const double* scalars, int threads);                                 \
  /* model_stock's terms of torch's sums for long rows: ptrs the n models, the base, then n */    \
  /* outputs d_i = R(x_i - base) and n(n-1)/2 outputs R(d_i d_j) (i < j, row-major pairs). */     \
  void model_stock_terms_cpu(int dtype, int64_t n_models, int64_t numel, const uint64_t* ptrs,  \
                             int threads)
MKF_GRAM_APPLY_CPU_API;
MKF_DECLARE_PER_ISA(MKF_GRAM_APPLY_CPU_API)

}  // namespace mkf
