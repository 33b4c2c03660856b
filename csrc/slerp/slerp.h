// SLERP entry points. Pointers are raw device or host addresses, sizes are element counts,
// `dtype` is a mkf::DType tag. The Python side (mergekit_fast/ops/slerp.py) validates device,
// dtype, shape and contiguity before calling; nothing here allocates on behalf of the caller
// except small host scratch.
#pragma once
#include <cstdint>

#include "common/cpu_isa.h"

namespace mkf {

// Block size of the SLERP sums (csrc/slerp/slerp_cpu.cpp kBlock): streamed chunks are multiples of it.
constexpr int64_t kSlerpBlock = 1 << 14;

// ---- CPU (csrc/slerp/slerp_cpu.cpp) ----
// Each entry point is declared here and, through MKF_SLERP_CPU_API, once per instruction-set
// level (common/cpu_isa.h): the mkf:: functions call the level this CPU runs.
#define MKF_SLERP_CPU_API                                                                        \
  /* One tensor: the three sums (fp64, deterministic for any thread count), then the */        \
  /* interpolation. */                                                                           \
  void slerp_cpu(int dtype, const void* a, const void* b, void* out, int64_t n, double t,       \
                 double eps, double dot_threshold, int threads);                                 \
  /* Streaming, in two passes over chunks of a tensor too large to hold (the engine's streamed */ \
  /* path): the sums of each kSlerpBlock block of a chunk into partials[3 * block] (the blocks */  \
  /* whole-tensor slerp_cpu adds in order), returning the block count; then the interpolation */  \
  /* with the coefficients of the whole tensor (rounded to the compute dtype). */                 \
  int64_t slerp_block_sums_cpu(int dtype, const void* a, const void* b, int64_t n,             \
                               double* partials, int threads);                                   \
  void slerp_lerp_cpu(int dtype, const void* a, const void* b, void* out, int64_t n, double ca, \
                      double cb, int threads);                                                   \
  /* Many independent tensors, each with its own t (the engine's batched entry point). */       \
  void slerp_batched_cpu(int dtype, int64_t count, const uint64_t* a_ptrs,                     \
                         const uint64_t* b_ptrs, const uint64_t* out_ptrs, const int64_t* numels, \
                         const double* ts, double eps, double dot_threshold, int threads)
MKF_SLERP_CPU_API;
MKF_DECLARE_PER_ISA(MKF_SLERP_CPU_API)

#if defined(MKF_WITH_CUDA)
// ---- CUDA (csrc/slerp/slerp_cuda.cu) ----
// Two-phase SLERP of one large tensor: a reduction pass writing fp64 block partials into
// `workspace` (device memory, at least slerp_cuda_workspace_bytes(n) bytes), a deterministic
// fixed-order reduction, then one read of a and b and one write of out. No host sync.
int64_t slerp_cuda_workspace_bytes(int64_t n);
void slerp_cuda(int dtype, const void* a, const void* b, void* out, int64_t n, double t,
                double eps, double dot_threshold, void* workspace, uintptr_t stream);
// Segmented SLERP: `count` tensors in one launch, one block per tensor, single pass when the
// tensor fits on chip. Tables are DEVICE arrays of length count.
void slerp_segments_cuda(int dtype, int64_t count, const uint64_t* a_ptrs, const uint64_t* b_ptrs,
                         const uint64_t* out_ptrs, const int64_t* numels, const double* ts,
                         double eps, double dot_threshold, uintptr_t stream);
#endif

}  // namespace mkf
