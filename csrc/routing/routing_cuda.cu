// MoE top-k routing on CUDA: one team of threads per token, the row held in registers.
//
//   E <= 512:    a team is W = min(32, next_pow2(E)) lanes of one warp (32 / W tokens per warp,
//                128-thread blocks); each lane holds VPT = ceil(E / W) experts, strided
//                (expert e = lane + i * W, so every load instruction is coalesced).
//   E <= 16384:  a team is a whole block of NT threads (one token per block).
//
// Each expert gets a packed 64-bit key (order-preserving value bits << 32 | ~index, see
// common/routing_select.h), so each of the k passes is one max-reduction over the team (warp
// shuffles, plus shared memory across the warps of a block) and the larger value wins, the
// lower index on ties. The lane that owns the winner marks it taken and stages its logit in the
// output row; after the passes the team turns the staged logits into weights in selection order.
// The group stage (DeepSeek) finds each group's best and second-best keys with 64-bit shared-
// memory atomicMax (exact: keys are unique), ranks the groups by counting, and excludes the
// experts of dropped groups. All arithmetic is routing_select.h's, compiled with --fmad=false,
// so the results are bit-identical to the C++ kernel and the torch reference.
//
// Counts and the stable expert-sorted slot order: one warp per chunk of 256 slots computes each
// slot's rank among the chunk's earlier slots of its expert (__match_any_sync) and the chunk's
// histogram; a per-expert scan over chunks, an exclusive scan over experts and a scatter follow.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/dtype.h"
#include "common/routing_select.h"
#include "routing/routing.h"

namespace mkf {
namespace {

using routing::RouteConfig;

constexpr unsigned kFull = 0xffffffffu;
constexpr int kWarpBlock = 128;   // threads per block of the warp-team kernel
constexpr int kCountChunk = 256;  // slots per warp in the counting kernels
constexpr int kCountWarps = 4;    // warps per block in the counting kernels

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("topk_routing_cuda: ") + what + ": " +
                             cudaGetErrorString(err));
}

template <int DT>
struct Logit;
template <>
struct Logit<kF32> {
  static __device__ __forceinline__ float load(const void* p, int64_t i) {
    return __ldg(static_cast<const float*>(p) + i);
  }
};
template <>
struct Logit<kBF16> {
  static __device__ __forceinline__ float load(const void* p, int64_t i) {
    return bf16_to_f32(__ldg(static_cast<const unsigned short*>(p) + i));
  }
};
template <>
struct Logit<kF16> {
  static __device__ __forceinline__ float load(const void* p, int64_t i) {
    return __half2float(__ushort_as_half(__ldg(static_cast<const unsigned short*>(p) + i)));
  }
};

// ---------------------------------------------------------------------------- teams

// W lanes of one warp (W a power of two <= 32). Every lane of the warp calls every reduction
// and sync (the row-independent control flow guarantees it), so full-mask shuffles are safe.
template <int W>
struct WarpTeam {
  static constexpr int size = W;
  int lane;
  __device__ __forceinline__ int rank() const { return lane; }
  __device__ __forceinline__ void sync() { __syncwarp(); }
  __device__ __forceinline__ uint64_t max_u64(uint64_t v) {
#pragma unroll
    for (int o = W / 2; o > 0; o >>= 1) {
      uint64_t u = __shfl_xor_sync(kFull, static_cast<unsigned long long>(v), o, W);
      v = u > v ? u : v;
    }
    return v;
  }
  // Max of non-NaN values (callers pass -inf for "none").
  __device__ __forceinline__ float max_f32(float v) {
#pragma unroll
    for (int o = W / 2; o > 0; o >>= 1) {
      float u = __shfl_xor_sync(kFull, v, o, W);
      v = u > v ? u : v;
    }
    return v;
  }
  __device__ __forceinline__ int64_t sum_i64(int64_t v) {
#pragma unroll
    for (int o = W / 2; o > 0; o >>= 1)
      v += __shfl_xor_sync(kFull, static_cast<long long>(v), o, W);
    return v;
  }
};

// All NT threads of a block. Reductions go through double-buffered shared memory: one
// __syncthreads per reduction (a thread can only overwrite buffer b after every thread has
// passed the barrier that follows the last reads of b).
template <int NT>
struct BlockTeam {
  static constexpr int size = NT;
  static constexpr int kWarps = NT / 32;
  int tid;
  uint64_t* red;  // [2][kWarps]
  int parity;
  __device__ __forceinline__ int rank() const { return tid; }
  __device__ __forceinline__ void sync() { __syncthreads(); }
  __device__ __forceinline__ uint64_t* exchange(uint64_t v) {
    uint64_t* buf = red + parity * kWarps;
    parity ^= 1;
    if ((tid & 31) == 0) buf[tid >> 5] = v;
    __syncthreads();
    return buf;
  }
  __device__ __forceinline__ uint64_t max_u64(uint64_t v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      uint64_t u = __shfl_xor_sync(kFull, static_cast<unsigned long long>(v), o);
      v = u > v ? u : v;
    }
    const uint64_t* buf = exchange(v);
    v = buf[0];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) v = buf[w] > v ? buf[w] : v;
    return v;
  }
  __device__ __forceinline__ float max_f32(float v) {
    // Order keys are monotone for non-NaN values, so the max of the keys is the key of the max.
    return routing::key_value(static_cast<uint32_t>(max_u64(routing::order_key(v))));
  }
  __device__ __forceinline__ int64_t sum_i64(int64_t v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, static_cast<long long>(v), o);
    const uint64_t* buf = exchange(static_cast<uint64_t>(v));
    int64_t s = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) s += static_cast<int64_t>(buf[w]);
    return s;
  }
};

// ---------------------------------------------------------------------------- one token

// Group stage: exclude the experts of all but the topk_groups best groups. g_best / g_second
// are this team's shared-memory arrays of num_groups entries each.
template <int VPT, class Team>
__device__ __forceinline__ void group_stage(Team& team, const RouteConfig& c, uint64_t (&key)[VPT],
                                            uint64_t* g_best, uint64_t* g_second) {
  const int N = Team::size, r = team.rank();
  const int64_t ng = c.num_groups, gsz = c.group_size();
  for (int64_t g = r; g < ng; g += N) {
    g_best[g] = 0;
    g_second[g] = 0;
  }
  team.sync();
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int64_t e = r + static_cast<int64_t>(i) * N;
    if (e < c.E && key[i] != routing::kTaken)
      atomicMax(reinterpret_cast<unsigned long long*>(g_best + e / gsz),
                static_cast<unsigned long long>(key[i]));
  }
  team.sync();
  if (c.group_score == routing::kGroupTop2Sum) {
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      const int64_t e = r + static_cast<int64_t>(i) * N;
      if (e < c.E && key[i] != routing::kTaken && key[i] != g_best[e / gsz])
        atomicMax(reinterpret_cast<unsigned long long*>(g_second + e / gsz),
                  static_cast<unsigned long long>(key[i]));
    }
  }
  team.sync();
  // Each lane turns its groups' best keys into packed group keys (in place).
  for (int64_t g = r; g < ng; g += N)
    g_best[g] = routing::pack(routing::order_key(routing::group_value(c, g_best[g], g_second[g])),
                              static_cast<uint32_t>(g));
  team.sync();
  // Rank by counting (keys are unique): kept iff fewer than topk_groups groups beat it.
  for (int64_t g = r; g < ng; g += N) {
    const uint64_t mine = g_best[g];
    int64_t above = 0;
    for (int64_t h = 0; h < ng; ++h) above += g_best[h] > mine ? 1 : 0;
    g_second[g] = above < c.topk_groups ? 1 : 0;
  }
  team.sync();
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int64_t e = r + static_cast<int64_t>(i) * N;
    if (e < c.E && g_second[e / gsz] == 0) key[i] = routing::kTaken;
  }
}

template <int DT, int VPT, class Team>
__device__ __forceinline__ void route_row(Team& team, const void* logits, const float* bias,
                                          float* weights, int32_t* ids, int64_t row, bool active,
                                          const RouteConfig& c, uint64_t* g_best,
                                          uint64_t* g_second) {
  const int N = Team::size, r = team.rank();
  const int64_t E = c.E, k = c.k;
  const float neg_inf = -routing::f32_inf();
  float x[VPT];
  uint64_t key[VPT];
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int64_t e = r + static_cast<int64_t>(i) * N;
    x[i] = (active && e < E) ? Logit<DT>::load(logits, row * E + e) : __int_as_float(0x7fc00000);
  }

  // Softmax statistics (config-uniform branch: every lane reduces).
  float m = neg_inf, z = 0.0f;
  if (c.need_softmax_stats()) {
    float lm = neg_inf;
#pragma unroll
    for (int i = 0; i < VPT; ++i)
      if (x[i] == x[i] && x[i] > lm) lm = x[i];
    m = team.max_f32(lm);
    int64_t q = 0;
#pragma unroll
    for (int i = 0; i < VPT; ++i) q += routing::to_fixed(routing::softmax_numerator(x[i], m));
    z = routing::from_fixed(team.sum_i64(q));
  }

  const bool on_logits = c.select_on_logits();
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int64_t e = r + static_cast<int64_t>(i) * N;
    if (active && e < E) {
      const float sc = on_logits ? 0.0f : routing::row_score(c, x[i], m, z);
      const float b = bias != nullptr ? __ldg(bias + e) : 0.0f;
      key[i] = routing::pack(routing::expert_key(c, x[i], sc, b), static_cast<uint32_t>(e));
    } else {
      key[i] = routing::kTaken;
    }
  }

  if (c.groups_active()) group_stage<VPT>(team, c, key, g_best, g_second);

  // k passes: the owner of the winner marks it taken and stages its logit in the output row.
  float* w = weights + row * k;
  int32_t* id = ids + row * k;
  for (int64_t j = 0; j < k; ++j) {
    uint64_t lbest = routing::kTaken;
#pragma unroll
    for (int i = 0; i < VPT; ++i) lbest = key[i] > lbest ? key[i] : lbest;
    const uint64_t best = team.max_u64(lbest);
    if (best != routing::kTaken) {
      float xs = 0.0f;
      bool mine = false;
#pragma unroll
      for (int i = 0; i < VPT; ++i) {
        if (key[i] == best) {
          key[i] = routing::kTaken;
          xs = x[i];
          mine = true;
        }
      }
      if (mine && active) {
        id[j] = static_cast<int32_t>(routing::packed_index(best));
        w[j] = xs;
      }
    }
  }
  team.sync();

  // Weights from the staged logits, in selection order.
  float m_sel = neg_inf;
  if (c.scoring == routing::kSoftmax && c.renormalize) {
    float lm = neg_inf;
    if (active)
      for (int64_t j = r; j < k; j += N) {
        const float xv = w[j];
        if (xv == xv && xv > lm) lm = xv;
      }
    m_sel = team.max_f32(lm);
  }
  if (active)
    for (int64_t j = r; j < k; j += N) w[j] = routing::weight_term(c, w[j], m_sel, m, z);
  team.sync();
  float den = 1.0f;
  if (active && c.renormalize) {
    den = 0.0f;
    for (int64_t j = 0; j < k; ++j) den = den + w[j];  // left to right, like every backend
    den = den + routing::kRenormEps;
  }
  team.sync();
  if (active)
    for (int64_t j = r; j < k; j += N) {
      float t = w[j];
      if (c.renormalize) t = t / den;
      w[j] = t * c.scaling;
    }
}

template <int DT, int W, int VPT>
__global__ void __launch_bounds__(kWarpBlock)
    route_warp_kernel(const void* logits, const float* bias, float* weights, int32_t* ids,
                      int64_t T, RouteConfig c) {
  extern __shared__ uint64_t group_smem[];
  const int team_idx = threadIdx.x / W;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kWarpBlock / W) + team_idx;
  WarpTeam<W> team{static_cast<int>(threadIdx.x % W)};
  uint64_t* g = group_smem + static_cast<int64_t>(team_idx) * 2 * c.num_groups;
  route_row<DT, VPT>(team, logits, bias, weights, ids, row, row < T, c, g, g + c.num_groups);
}

template <int DT, int NT, int VPT>
__global__ void __launch_bounds__(NT)
    route_block_kernel(const void* logits, const float* bias, float* weights, int32_t* ids,
                       RouteConfig c) {
  extern __shared__ uint64_t group_smem[];
  __shared__ uint64_t red[2 * (NT / 32)];
  BlockTeam<NT> team{static_cast<int>(threadIdx.x), red, 0};
  route_row<DT, VPT>(team, logits, bias, weights, ids, static_cast<int64_t>(blockIdx.x), true, c,
                     group_smem, group_smem + c.num_groups);
}

struct Launch {
  const void* logits;
  const float* bias;
  float* weights;
  int32_t* ids;
  int64_t T;
  RouteConfig c;
  size_t group_bytes;  // shared memory per team for the group stage
  cudaStream_t stream;
};

template <int DT, int W, int VPT>
void launch_warp(const Launch& L) {
  constexpr int teams = kWarpBlock / W;
  const int64_t blocks = (L.T + teams - 1) / teams;
  route_warp_kernel<DT, W, VPT><<<static_cast<unsigned>(blocks), kWarpBlock,
                                  teams * L.group_bytes, L.stream>>>(L.logits, L.bias, L.weights,
                                                                     L.ids, L.T, L.c);
}

template <int DT, int NT, int VPT>
void launch_block(const Launch& L) {
  route_block_kernel<DT, NT, VPT><<<static_cast<unsigned>(L.T), NT, L.group_bytes, L.stream>>>(
      L.logits, L.bias, L.weights, L.ids, L.c);
}

template <int DT>
void launch_routing(const Launch& L) {
  const int64_t E = L.c.E;
  if (E <= 1) return launch_warp<DT, 1, 1>(L);
  if (E <= 2) return launch_warp<DT, 2, 1>(L);
  if (E <= 4) return launch_warp<DT, 4, 1>(L);
  if (E <= 8) return launch_warp<DT, 8, 1>(L);
  if (E <= 16) return launch_warp<DT, 16, 1>(L);
  if (E <= 32) return launch_warp<DT, 32, 1>(L);
  if (E <= 64) return launch_warp<DT, 32, 2>(L);
  if (E <= 128) return launch_warp<DT, 32, 4>(L);
  if (E <= 256) return launch_warp<DT, 32, 8>(L);
  if (E <= 512) return launch_warp<DT, 32, 16>(L);
  if (E <= 1024) return launch_block<DT, 128, 8>(L);
  if (E <= 2048) return launch_block<DT, 256, 8>(L);
  if (E <= 4096) return launch_block<DT, 512, 8>(L);
  if (E <= 8192) return launch_block<DT, 1024, 8>(L);
  return launch_block<DT, 1024, 16>(L);
}

// ---------------------------------------------------------------------------- counts

__global__ void count_chunks_kernel(const int32_t* ids, int64_t n, int64_t E, int32_t* hist,
                                    int32_t* rank) {
  const int lane = threadIdx.x & 31;
  const int64_t chunk = static_cast<int64_t>(blockIdx.x) * kCountWarps + threadIdx.x / 32;
  const int64_t n_chunks = (n + kCountChunk - 1) / kCountChunk;
  if (chunk >= n_chunks) return;  // whole warps only
  int32_t* h = hist + chunk * E;
  for (int step = 0; step < kCountChunk / 32; ++step) {
    const int64_t s = chunk * kCountChunk + step * 32 + lane;
    const int e = s < n ? ids[s] : -1;
    const unsigned peers = __match_any_sync(kFull, e);
    const int before = __popc(peers & ((1u << lane) - 1u));
    const int base = e >= 0 ? h[e] : 0;
    __syncwarp();
    if (e >= 0) {
      rank[s] = base + before;
      if (lane == __ffs(peers) - 1) h[e] = base + __popc(peers);
    }
    __syncwarp();
  }
}

// Per expert: exclusive prefix of the chunk histograms (in place) and the total.
__global__ void scan_chunks_kernel(int32_t* hist, int64_t n_chunks, int64_t E, int32_t* counts) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= E) return;
  int32_t run = 0;
  for (int64_t c = 0; c < n_chunks; ++c) {
    const int32_t v = hist[c * E + e];
    hist[c * E + e] = run;
    run += v;
  }
  counts[e] = run;
}

// Exclusive scan of the counts over experts (one block of 1024 threads, tiles with a carry).
__global__ void __launch_bounds__(1024)
    expert_base_kernel(const int32_t* counts, int64_t E, int32_t* base) {
  __shared__ int32_t tile[1024];
  __shared__ int32_t carry_s;
  const int tid = threadIdx.x;
  if (tid == 0) carry_s = 0;
  __syncthreads();
  for (int64_t start = 0; start < E; start += 1024) {
    const int64_t e = start + tid;
    const int32_t v = e < E ? counts[e] : 0;
    tile[tid] = v;
    __syncthreads();
    for (int off = 1; off < 1024; off <<= 1) {
      const int32_t add = tid >= off ? tile[tid - off] : 0;
      __syncthreads();
      tile[tid] += add;
      __syncthreads();
    }
    const int32_t carry = carry_s;
    if (e < E) base[e] = carry + tile[tid] - v;
    __syncthreads();
    if (tid == 1023) carry_s = carry + tile[1023];
    __syncthreads();
  }
}

__global__ void scatter_kernel(const int32_t* ids, int64_t n, int64_t E, const int32_t* hist,
                               const int32_t* base, const int32_t* rank, int32_t* order) {
  const int64_t s = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (s >= n) return;
  const int e = ids[s];
  const int64_t chunk = s / kCountChunk;
  order[base[e] + hist[chunk * E + e] + rank[s]] = static_cast<int32_t>(s);
}

size_t align256(size_t b) { return (b + 255) & ~static_cast<size_t>(255); }

}  // namespace

void topk_routing_cuda(int dtype, const void* logits, const float* bias, float* weights,
                       int32_t* ids, int64_t T, int64_t E, int64_t k, int scoring,
                       bool renormalize, int64_t num_groups, int64_t topk_groups, int group_score,
                       float scaling, uintptr_t stream) {
  if (E < 1 || E > kRoutingCudaMaxExperts || k < 1 || k > E)
    throw std::invalid_argument("topk_routing_cuda: need 1 <= k <= E <= " +
                                std::to_string(kRoutingCudaMaxExperts) + ", got k=" +
                                std::to_string(k) + ", E=" + std::to_string(E));
  if (num_groups > 0 && (E % num_groups != 0 || topk_groups < 1 || topk_groups > num_groups ||
                         k > topk_groups * (E / num_groups)))
    throw std::invalid_argument("topk_routing_cuda: invalid group parameters");
  if (T <= 0) return;
  RouteConfig c{E,           k,           scoring, renormalize, bias != nullptr,
                num_groups, topk_groups, group_score, scaling};
  if (c.groups_active() && num_groups > kRoutingCudaMaxGroups)
    throw std::invalid_argument("topk_routing_cuda: at most " +
                                std::to_string(kRoutingCudaMaxGroups) + " groups");
  if (!c.groups_active()) c.num_groups = 0;  // no shared memory needed
  Launch L{logits,
           bias,
           weights,
           ids,
           T,
           c,
           c.groups_active() ? static_cast<size_t>(2 * c.num_groups) * sizeof(uint64_t) : 0,
           reinterpret_cast<cudaStream_t>(stream)};
  switch (dtype) {
    case kF32: launch_routing<kF32>(L); break;
    case kF16: launch_routing<kF16>(L); break;
    case kBF16: launch_routing<kBF16>(L); break;
    default:
      throw std::invalid_argument("topk_routing_cuda: unsupported dtype tag " +
                                  std::to_string(dtype));
  }
  check_cuda(cudaGetLastError(), "kernel launch");
}

int64_t routing_counts_cuda_workspace_bytes(int64_t n_slots, int64_t E) {
  const int64_t n_chunks = (n_slots + kCountChunk - 1) / kCountChunk;
  return static_cast<int64_t>(align256(sizeof(int32_t) * n_chunks * E) +
                              align256(sizeof(int32_t) * n_slots) +
                              align256(sizeof(int32_t) * E));
}

void routing_counts_cuda(const int32_t* ids, int64_t n_slots, int64_t E, int32_t* counts,
                         int32_t* order, void* workspace, uintptr_t stream_) {
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_);
  if (n_slots <= 0) {
    check_cuda(cudaMemsetAsync(counts, 0, sizeof(int32_t) * E, stream), "memset");
    return;
  }
  const int64_t n_chunks = (n_slots + kCountChunk - 1) / kCountChunk;
  char* ws = static_cast<char*>(workspace);
  int32_t* hist = reinterpret_cast<int32_t*>(ws);
  int32_t* rank = reinterpret_cast<int32_t*>(ws + align256(sizeof(int32_t) * n_chunks * E));
  int32_t* base = reinterpret_cast<int32_t*>(ws + align256(sizeof(int32_t) * n_chunks * E) +
                                             align256(sizeof(int32_t) * n_slots));
  check_cuda(cudaMemsetAsync(hist, 0, sizeof(int32_t) * n_chunks * E, stream), "memset");
  const int64_t count_blocks = (n_chunks + kCountWarps - 1) / kCountWarps;
  count_chunks_kernel<<<static_cast<unsigned>(count_blocks), 32 * kCountWarps, 0, stream>>>(
      ids, n_slots, E, hist, rank);
  scan_chunks_kernel<<<static_cast<unsigned>((E + 255) / 256), 256, 0, stream>>>(hist, n_chunks, E,
                                                                                counts);
  expert_base_kernel<<<1, 1024, 0, stream>>>(counts, E, base);
  scatter_kernel<<<static_cast<unsigned>((n_slots + 255) / 256), 256, 0, stream>>>(
      ids, n_slots, E, hist, base, rank, order);
  check_cuda(cudaGetLastError(), "counts kernel launch");
}

}  // namespace mkf
