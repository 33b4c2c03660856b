// Fused MoE top-k routing entry points. Pointers are raw host or device addresses; the Python
// side (mergekit_fast/ops/routing.py) validates shapes, dtypes, devices, contiguity and the
// parameters before calling. The selection rule itself is in common/routing_select.h.
//
// Arguments shared by the CPU and CUDA entry points:
//   dtype        mkf::DType tag of the logits (f32, f16, bf16)
//   logits       [T, E] contiguous
//   bias         fp32 [E] or null (selection only)
//   weights      fp32 [T, k] out;  ids  int32 [T, k] out (descending selection order)
//   scoring      routing::kSoftmax / kSigmoid;  group_score routing::kGroupMax / kGroupTop2Sum
//   num_groups   0 for no group stage, else a divisor of E;  topk_groups in [1, num_groups]
//
// Counts and the expert-sorted slot order (for grouped matmuls):
//   counts  int32 [E]:   counts[e] = number of (token, slot) pairs routed to expert e
//   order   int32 [T*k]: slot indices s = t * k + j sorted by ids.flat[s], stable (ascending s
//                        within an expert), so expert e's slots are
//                        order[offset[e] : offset[e] + counts[e]], offset = exclusive cumsum.
#pragma once
#include <cstdint>

#include "common/cpu_isa.h"

namespace mkf {

// ---- CPU (csrc/routing/routing_cpu.cpp) ----
// Declared in mkf and once per instruction-set level (common/cpu_isa.h).
#define MKF_ROUTING_CPU_API                                                                   \
  void topk_routing_cpu(int dtype, const void* logits, const float* bias, float* weights,    \
                        int32_t* ids, int64_t T, int64_t E, int64_t k, int scoring,          \
                        bool renormalize, int64_t num_groups, int64_t topk_groups,           \
                        int group_score, float scaling, int threads);                        \
  void routing_counts_cpu(const int32_t* ids, int64_t n_slots, int64_t E, int32_t* counts,   \
                          int32_t* order, int threads)
MKF_ROUTING_CPU_API;
MKF_DECLARE_PER_ISA(MKF_ROUTING_CPU_API)

#if defined(MKF_WITH_CUDA)
// ---- CUDA (csrc/routing/routing_cuda.cu) ----
// Limits of the CUDA kernel (checked again here; the Python side routes larger cases elsewhere).
constexpr int64_t kRoutingCudaMaxExperts = 16384;
constexpr int64_t kRoutingCudaMaxGroups = 1024;
void topk_routing_cuda(int dtype, const void* logits, const float* bias, float* weights,
                       int32_t* ids, int64_t T, int64_t E, int64_t k, int scoring,
                       bool renormalize, int64_t num_groups, int64_t topk_groups, int group_score,
                       float scaling, uintptr_t stream);
// Device workspace (bytes) for routing_counts_cuda.
int64_t routing_counts_cuda_workspace_bytes(int64_t n_slots, int64_t E);
void routing_counts_cuda(const int32_t* ids, int64_t n_slots, int64_t E, int32_t* counts,
                         int32_t* order, void* workspace, uintptr_t stream);
#endif

}  // namespace mkf
