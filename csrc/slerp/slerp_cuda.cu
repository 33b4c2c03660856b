// SLERP on the GPU. Same math as csrc/slerp/slerp_cpu.cpp and the torch reference
// (mergekit_fast/ops/slerp.py: slerp_ref), for one whole flattened tensor of n elements:
//   S_aa = sum a_i^2, S_bb = sum b_i^2, S_ab = sum a_i b_i in fp64;
//   (c_a, c_b) = slerp_coeffs(S_aa, S_bb, S_ab, t, eps, thr) (common/slerp_math.h) in fp64,
//   rounded to the compute type C (fp32; fp64 for fp64 inputs);
//   out_i = c_a a_i + c_b b_i in C with two roundings (__fmul_rn/__fadd_rn are never contracted
//   into an FMA, whatever --fmad says), cast to the storage type round-to-nearest-even.
// A NaN or Inf anywhere makes a sum non-finite, both coefficients NaN and every output NaN.
//
// slerp_cuda (one large tensor), three kernels on the caller's stream, no host synchronisation:
//   1. slerp_partials_kernel: block k sums its fixed chunk of kChunk elements (16-byte vector
//      loads, per-thread fp64 accumulators, warp shuffles and shared memory in a fixed tree)
//      and writes three fp64 partials to the workspace;
//   2. slerp_finish_kernel: one block adds the partials in a fixed order and writes (c_a, c_b);
//   3. slerp_interp_kernel: reads the coefficients from the workspace and a and b once more,
//      writes out.
//   Traffic: 5n elements plus 24 bytes per chunk. The partition depends on n and on the pointers'
//   position within 16 bytes, never on the device or on timing: results are reproducible.
// slerp_segments_cuda (many tensors of at most a few ten thousand elements), one launch, one block
//   per tensor: the block keeps its first kSegTiles tiles of vectors in registers, sums, computes
//   the coefficients, writes those tiles from registers and re-reads the rest (from L2). Traffic
//   3n elements from DRAM.
//
// Alignment: torch allocations start 16-byte aligned, views may not. A tensor runs vectorised from
// its first 16-byte boundary when all its pointers share the same offset within 16 bytes (head and
// tail elements run scalar); otherwise every element runs scalar.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/dtype.h"
#include "common/slerp_math.h"
#include "slerp/slerp.h"

namespace mkf {
namespace {

constexpr int kThreads = 256;        // partials, interpolation and segment kernels
constexpr int kFinishThreads = 1024;  // the single-block reduction of the partials
constexpr int64_t kChunk = 16384;     // elements per partial sum (a multiple of every vector width)
constexpr int kInterpUnroll = 4;      // vectors per thread in the interpolation kernel
constexpr int kSegTiles = 4;          // tiles of kThreads vectors a segment block keeps in regs

// ----------------------------------------------------------------------------- element formats
// Per storage type T: the compute type C, the number of elements in a 16-byte vector, and
// conversions. Unpacking bf16 is a shift (exact); packing rounds to nearest even in hardware.
template <typename T>
struct Fmt;

template <>
struct Fmt<float> {
  using C = float;
  static constexpr int kVec = 4;
  static __device__ __forceinline__ C load(const float* p, int64_t i) { return __ldg(p + i); }
  static __device__ __forceinline__ void store(float* p, int64_t i, C v) { p[i] = v; }
  static __device__ __forceinline__ void unpack(const uint4& r, C (&x)[kVec]) {
    x[0] = __uint_as_float(r.x);
    x[1] = __uint_as_float(r.y);
    x[2] = __uint_as_float(r.z);
    x[3] = __uint_as_float(r.w);
  }
  static __device__ __forceinline__ uint4 pack(const C (&x)[kVec]) {
    return make_uint4(__float_as_uint(x[0]), __float_as_uint(x[1]), __float_as_uint(x[2]),
                      __float_as_uint(x[3]));
  }
};

template <>
struct Fmt<double> {
  using C = double;
  static constexpr int kVec = 2;
  static __device__ __forceinline__ C load(const double* p, int64_t i) { return __ldg(p + i); }
  static __device__ __forceinline__ void store(double* p, int64_t i, C v) { p[i] = v; }
  static __device__ __forceinline__ void unpack(const uint4& r, C (&x)[kVec]) {
    x[0] = __hiloint2double(static_cast<int>(r.y), static_cast<int>(r.x));
    x[1] = __hiloint2double(static_cast<int>(r.w), static_cast<int>(r.z));
  }
  static __device__ __forceinline__ uint4 pack(const C (&x)[kVec]) {
    return make_uint4(static_cast<unsigned>(__double2loint(x[0])),
                      static_cast<unsigned>(__double2hiint(x[0])),
                      static_cast<unsigned>(__double2loint(x[1])),
                      static_cast<unsigned>(__double2hiint(x[1])));
  }
};

// 16-bit formats: 8 elements per 16-byte vector, two per 32-bit word; Derived supplies the word
// conversions (unpack2/pack2) and the scalar load/store.
template <typename Derived>
struct Packed16 {
  using C = float;
  static constexpr int kVec = 8;
  static __device__ __forceinline__ void unpack(const uint4& r, C (&x)[kVec]) {
    Derived::unpack2(r.x, x[0], x[1]);
    Derived::unpack2(r.y, x[2], x[3]);
    Derived::unpack2(r.z, x[4], x[5]);
    Derived::unpack2(r.w, x[6], x[7]);
  }
  static __device__ __forceinline__ uint4 pack(const C (&x)[kVec]) {
    return make_uint4(Derived::pack2(x[0], x[1]), Derived::pack2(x[2], x[3]), Derived::pack2(x[4], x[5]),
                      Derived::pack2(x[6], x[7]));
  }
};

template <>
struct Fmt<__nv_bfloat16> : Packed16<Fmt<__nv_bfloat16>> {
  static __device__ __forceinline__ C load(const __nv_bfloat16* p, int64_t i) {
    return __bfloat162float(p[i]);
  }
  static __device__ __forceinline__ void store(__nv_bfloat16* p, int64_t i, C v) {
    p[i] = __float2bfloat16_rn(v);
  }
  static __device__ __forceinline__ void unpack2(unsigned w, C& lo, C& hi) {
    lo = __uint_as_float(w << 16);
    hi = __uint_as_float(w & 0xffff0000u);
  }
  static __device__ __forceinline__ unsigned pack2(C lo, C hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return static_cast<unsigned>(__bfloat16_as_ushort(h.x)) |
           (static_cast<unsigned>(__bfloat16_as_ushort(h.y)) << 16);
  }
};

template <>
struct Fmt<__half> : Packed16<Fmt<__half>> {
  static __device__ __forceinline__ C load(const __half* p, int64_t i) {
    return __half2float(p[i]);
  }
  static __device__ __forceinline__ void store(__half* p, int64_t i, C v) {
    p[i] = __float2half_rn(v);
  }
  static __device__ __forceinline__ void unpack2(unsigned w, C& lo, C& hi) {
    lo = __half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xffffu)));
    hi = __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16)));
  }
  static __device__ __forceinline__ unsigned pack2(C lo, C hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return static_cast<unsigned>(__half_as_ushort(h.x)) |
           (static_cast<unsigned>(__half_as_ushort(h.y)) << 16);
  }
};

// ----------------------------------------------------------------------------- arithmetic
// Explicitly rounded operations: the result does not depend on the compiler's FMA contraction.
__device__ __forceinline__ float mul_rn(float x, float y) { return __fmul_rn(x, y); }
__device__ __forceinline__ double mul_rn(double x, double y) { return __dmul_rn(x, y); }
__device__ __forceinline__ float add_rn(float x, float y) { return __fadd_rn(x, y); }
__device__ __forceinline__ double add_rn(double x, double y) { return __dadd_rn(x, y); }

struct Sums {
  double aa = 0.0, bb = 0.0, ab = 0.0;
  __device__ __forceinline__ void add(double x, double y) {
    aa = __dadd_rn(aa, __dmul_rn(x, x));
    bb = __dadd_rn(bb, __dmul_rn(y, y));
    ab = __dadd_rn(ab, __dmul_rn(x, y));
  }
};

template <typename T>
__device__ __forceinline__ uint4 load_vec(const T* p, int64_t v) {
  return __ldg(reinterpret_cast<const uint4*>(p) + v);
}

template <typename T>
__device__ __forceinline__ void store_vec(T* p, int64_t v, uint4 r) {
  reinterpret_cast<uint4*>(p)[v] = r;
}

template <typename T>
__device__ __forceinline__ void sum_vec(Sums& s, const uint4& ra, const uint4& rb) {
  using F = Fmt<T>;
  typename F::C x[F::kVec], y[F::kVec];
  F::unpack(ra, x);
  F::unpack(rb, y);
#pragma unroll
  for (int j = 0; j < F::kVec; ++j) s.add(static_cast<double>(x[j]), static_cast<double>(y[j]));
}

template <typename T, typename C>
__device__ __forceinline__ uint4 interp_vec(const uint4& ra, const uint4& rb, C ca, C cb) {
  using F = Fmt<T>;
  C x[F::kVec], y[F::kVec];
  F::unpack(ra, x);
  F::unpack(rb, y);
#pragma unroll
  for (int j = 0; j < F::kVec; ++j) x[j] = add_rn(mul_rn(ca, x[j]), mul_rn(cb, y[j]));
  return F::pack(x);
}

// Sum over the block in a fixed tree (shuffles within warps, then warp 0 over the warps' sums);
// the total is valid in thread 0. Called once per kernel (it owns a static shared buffer).
template <int kBlock>
__device__ __forceinline__ Sums block_sum(Sums s) {
  constexpr int kWarps = kBlock / 32;
  __shared__ double red[3][kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    s.aa += __shfl_down_sync(0xffffffffu, s.aa, off);
    s.bb += __shfl_down_sync(0xffffffffu, s.bb, off);
    s.ab += __shfl_down_sync(0xffffffffu, s.ab, off);
  }
  if (lane == 0) {
    red[0][warp] = s.aa;
    red[1][warp] = s.bb;
    red[2][warp] = s.ab;
  }
  __syncthreads();
  if (warp == 0) {
    s.aa = lane < kWarps ? red[0][lane] : 0.0;
    s.bb = lane < kWarps ? red[1][lane] : 0.0;
    s.ab = lane < kWarps ? red[2][lane] : 0.0;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      s.aa += __shfl_down_sync(0xffffffffu, s.aa, off);
      s.bb += __shfl_down_sync(0xffffffffu, s.bb, off);
      s.ab += __shfl_down_sync(0xffffffffu, s.ab, off);
    }
  }
  return s;
}

// ----------------------------------------------------------------------------- one large tensor
// Vector layout of a tensor: elements [head, head + nvec * kVec) as 16-byte vectors, the other
// n - nvec * kVec elements (head and tail, or all of them when nvec == 0) scalar. Scalar element r
// of the `rest` is at r < head ? r : r + nvec * kVec.
struct Layout {
  int64_t head = 0;
  int64_t nvec = 0;
  __device__ __forceinline__ int64_t rest_index(int64_t r, int vec) const {
    return r < head ? r : r + nvec * vec;
  }
};

// Phase 1. Block k sums chunk k: vectors [k, k+1) * kChunk / kVec of the vector region (block 0
// also takes the scalar rest), or elements [k, k+1) * kChunk when nothing is vectorised. Writes
// the partials to part[k], part[P + k], part[2P + k]. Reads 2 elements per element of its chunk.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    slerp_partials_kernel(const T* __restrict__ a, const T* __restrict__ b, int64_t n, Layout lay,
                          double* __restrict__ part, int64_t num_parts) {
  using F = Fmt<T>;
  const int64_t k = blockIdx.x;
  Sums s;
  if (lay.nvec > 0) {
    const T* av = a + lay.head;
    const T* bv = b + lay.head;
    constexpr int64_t kChunkVecs = kChunk / F::kVec;
    const int64_t end = min(lay.nvec, (k + 1) * kChunkVecs);
#pragma unroll 8
    for (int64_t v = k * kChunkVecs + threadIdx.x; v < end; v += kThreads)
      sum_vec<T>(s, load_vec(av, v), load_vec(bv, v));
    if (k == 0) {
      const int64_t rest = n - lay.nvec * F::kVec;
      for (int64_t r = threadIdx.x; r < rest; r += kThreads) {
        const int64_t i = lay.rest_index(r, F::kVec);
        s.add(static_cast<double>(F::load(a, i)), static_cast<double>(F::load(b, i)));
      }
    }
  } else {
    const int64_t end = min(n, (k + 1) * kChunk);
#pragma unroll 4
    for (int64_t i = k * kChunk + threadIdx.x; i < end; i += kThreads)
      s.add(static_cast<double>(F::load(a, i)), static_cast<double>(F::load(b, i)));
  }
  s = block_sum<kThreads>(s);
  if (threadIdx.x == 0) {
    part[k] = s.aa;
    part[num_parts + k] = s.bb;
    part[2 * num_parts + k] = s.ab;
  }
}

// Phase 1b, one block: thread j adds partials j, j + kFinishThreads, ... then the block tree;
// a fixed order for a given number of partials. Writes (c_a, c_b), rounded to C, to coef[0..1].
template <typename C>
__global__ void __launch_bounds__(kFinishThreads)
    slerp_finish_kernel(const double* __restrict__ part, int64_t num_parts, double t, double eps,
                        double thr, double* __restrict__ coef) {
  Sums s;
#pragma unroll 4
  for (int64_t k = threadIdx.x; k < num_parts; k += kFinishThreads) {
    s.aa += part[k];
    s.bb += part[num_parts + k];
    s.ab += part[2 * num_parts + k];
  }
  s = block_sum<kFinishThreads>(s);
  if (threadIdx.x == 0) {
    const SlerpCoeffs c = slerp_coeffs(s.aa, s.bb, s.ab, t, eps, thr);
    coef[0] = static_cast<double>(static_cast<C>(c.ca));
    coef[1] = static_cast<double>(static_cast<C>(c.cb));
  }
}

// Phase 2. Block k interpolates vectors [k, k+1) * kThreads * kInterpUnroll (block 0 also the
// scalar rest), or as many scalar elements when nothing is vectorised. Reads 2, writes 1 element
// per element.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    slerp_interp_kernel(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ out,
                        int64_t n, Layout lay, const double* __restrict__ coef) {
  using F = Fmt<T>;
  using C = typename F::C;
  const C ca = static_cast<C>(coef[0]);
  const C cb = static_cast<C>(coef[1]);
  constexpr int64_t kPerBlock = int64_t{kThreads} * kInterpUnroll;
  const int64_t base = blockIdx.x * kPerBlock + threadIdx.x;
  if (lay.nvec > 0) {
    const T* av = a + lay.head;
    const T* bv = b + lay.head;
    T* ov = out + lay.head;
    uint4 ra[kInterpUnroll], rb[kInterpUnroll];
#pragma unroll
    for (int j = 0; j < kInterpUnroll; ++j) {
      const int64_t v = base + j * kThreads;
      if (v < lay.nvec) {
        ra[j] = load_vec(av, v);
        rb[j] = load_vec(bv, v);
      }
    }
#pragma unroll
    for (int j = 0; j < kInterpUnroll; ++j) {
      const int64_t v = base + j * kThreads;
      if (v < lay.nvec) store_vec(ov, v, interp_vec<T>(ra[j], rb[j], ca, cb));
    }
    if (blockIdx.x == 0) {
      const int64_t rest = n - lay.nvec * F::kVec;
      for (int64_t r = threadIdx.x; r < rest; r += kThreads) {
        const int64_t i = lay.rest_index(r, F::kVec);
        F::store(out, i, add_rn(mul_rn(ca, F::load(a, i)), mul_rn(cb, F::load(b, i))));
      }
    }
  } else {
#pragma unroll
    for (int j = 0; j < kInterpUnroll; ++j) {
      const int64_t i = base + j * kThreads;
      if (i < n) F::store(out, i, add_rn(mul_rn(ca, F::load(a, i)), mul_rn(cb, F::load(b, i))));
    }
  }
}

// ----------------------------------------------------------------------------- many small tensors
// One block per tensor s. Vectorised when a, b and out are all 16-byte aligned (else scalar).
// Pass 1 loads tiles r < kSegTiles (kThreads vectors each) into registers and streams the rest;
// pass 2 writes the register tiles and re-reads the rest, which the block has just read (L2).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    slerp_segments_kernel(const uint64_t* __restrict__ a_ptrs, const uint64_t* __restrict__ b_ptrs,
                          const uint64_t* __restrict__ out_ptrs, const int64_t* __restrict__ numels,
                          const double* __restrict__ ts, double eps, double thr) {
  using F = Fmt<T>;
  using C = typename F::C;
  const int64_t seg = blockIdx.x;
  const T* a = reinterpret_cast<const T*>(a_ptrs[seg]);
  const T* b = reinterpret_cast<const T*>(b_ptrs[seg]);
  T* out = reinterpret_cast<T*>(out_ptrs[seg]);
  const int64_t n = numels[seg];
  const bool aligned = ((a_ptrs[seg] | b_ptrs[seg] | out_ptrs[seg]) & 15u) == 0;
  const int64_t nvec = aligned ? n / F::kVec : 0;
  const int64_t scalar_from = nvec * F::kVec;

  Sums s;
  uint4 ra[kSegTiles], rb[kSegTiles];
#pragma unroll
  for (int r = 0; r < kSegTiles; ++r) {
    const int64_t v = r * kThreads + threadIdx.x;
    if (v < nvec) {
      ra[r] = load_vec(a, v);
      rb[r] = load_vec(b, v);
      sum_vec<T>(s, ra[r], rb[r]);
    }
  }
  for (int64_t v = kSegTiles * kThreads + threadIdx.x; v < nvec; v += kThreads)
    sum_vec<T>(s, load_vec(a, v), load_vec(b, v));
  for (int64_t i = scalar_from + threadIdx.x; i < n; i += kThreads)
    s.add(static_cast<double>(F::load(a, i)), static_cast<double>(F::load(b, i)));

  s = block_sum<kThreads>(s);
  __shared__ C coef[2];
  if (threadIdx.x == 0) {
    const SlerpCoeffs c = slerp_coeffs(s.aa, s.bb, s.ab, ts[seg], eps, thr);
    coef[0] = static_cast<C>(c.ca);
    coef[1] = static_cast<C>(c.cb);
  }
  __syncthreads();
  const C ca = coef[0], cb = coef[1];

#pragma unroll
  for (int r = 0; r < kSegTiles; ++r) {
    const int64_t v = r * kThreads + threadIdx.x;
    if (v < nvec) store_vec(out, v, interp_vec<T>(ra[r], rb[r], ca, cb));
  }
  for (int64_t v = kSegTiles * kThreads + threadIdx.x; v < nvec; v += kThreads)
    store_vec(out, v, interp_vec<T>(load_vec(a, v), load_vec(b, v), ca, cb));
  for (int64_t i = scalar_from + threadIdx.x; i < n; i += kThreads)
    F::store(out, i, add_rn(mul_rn(ca, F::load(a, i)), mul_rn(cb, F::load(b, i))));
}

// ----------------------------------------------------------------------------- host side

int64_t num_parts(int64_t n) { return n <= kChunk ? 1 : (n + kChunk - 1) / kChunk; }

// The vector layout shared by all `ptrs` (they must sit at the same offset within 16 bytes).
template <typename T>
Layout layout_of(int64_t n, std::initializer_list<const void*> ptrs) {
  constexpr int vec = Fmt<T>::kVec;
  const uintptr_t phase = reinterpret_cast<uintptr_t>(*ptrs.begin()) & 15u;
  for (const void* p : ptrs)
    if ((reinterpret_cast<uintptr_t>(p) & 15u) != phase) return Layout{};
  if (phase % sizeof(T) != 0) return Layout{};
  const int64_t head = phase == 0 ? 0 : static_cast<int64_t>((16 - phase) / sizeof(T));
  if (head >= n) return Layout{};
  return Layout{head, (n - head) / vec};
}

void check_launch(const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("slerp (CUDA): launching ") + kernel +
                             " failed: " + cudaGetErrorString(err));
}

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("slerp (CUDA): ") + what + ": " + cudaGetErrorString(err));
}

// Makes the stream's device current for the launches (tensors may live on any GPU).
class StreamDevice {
 public:
  explicit StreamDevice(cudaStream_t stream) {
    int dev = 0;
    check_cuda(cudaStreamGetDevice(stream, &dev), "cudaStreamGetDevice");
    check_cuda(cudaGetDevice(&prev_), "cudaGetDevice");
    if (dev != prev_) check_cuda(cudaSetDevice(dev), "cudaSetDevice");
    changed_ = dev != prev_;
  }
  ~StreamDevice() {
    if (changed_) cudaSetDevice(prev_);
  }
  StreamDevice(const StreamDevice&) = delete;
  StreamDevice& operator=(const StreamDevice&) = delete;

 private:
  int prev_ = 0;
  bool changed_ = false;
};

template <typename T>
void two_phase(const void* a_, const void* b_, void* out_, int64_t n, double t, double eps,
               double thr, double* ws, cudaStream_t stream) {
  using C = typename Fmt<T>::C;
  const T* a = static_cast<const T*>(a_);
  const T* b = static_cast<const T*>(b_);
  T* out = static_cast<T*>(out_);
  const int64_t parts = num_parts(n);
  double* coef = ws;
  double* part = ws + 2;

  const Layout sum_layout = layout_of<T>(n, {a, b});
  slerp_partials_kernel<T><<<static_cast<unsigned>(parts), kThreads, 0, stream>>>(
      a, b, n, sum_layout, part, parts);
  check_launch("slerp_partials_kernel");
  slerp_finish_kernel<C><<<1, kFinishThreads, 0, stream>>>(part, parts, t, eps, thr, coef);
  check_launch("slerp_finish_kernel");

  const Layout lay = layout_of<T>(n, {a, b, out});
  constexpr int64_t kPerBlock = int64_t{kThreads} * kInterpUnroll;
  const int64_t units = lay.nvec > 0 ? lay.nvec : n;
  const int64_t blocks = (units + kPerBlock - 1) / kPerBlock;
  slerp_interp_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a, b, out, n, lay,
                                                                                 coef);
  check_launch("slerp_interp_kernel");
}

template <typename Fn>
void by_dtype(int dtype, Fn&& fn) {
  switch (dtype) {
    case kF32: fn(float{}); break;
    case kF16: fn(__half{}); break;
    case kBF16: fn(__nv_bfloat16{}); break;
    case kF64: fn(double{}); break;
    default:
      throw std::invalid_argument("slerp (CUDA): unsupported dtype tag " + std::to_string(dtype));
  }
}

}  // namespace

int64_t slerp_cuda_workspace_bytes(int64_t n) {
  return (2 + 3 * num_parts(n)) * static_cast<int64_t>(sizeof(double));
}

void slerp_cuda(int dtype, const void* a, const void* b, void* out, int64_t n, double t,
                double eps, double dot_threshold, void* workspace, uintptr_t stream) {
  if (n <= 0) return;
  if (n / (int64_t{kThreads} * kInterpUnroll) >= INT_MAX)
    throw std::invalid_argument("slerp (CUDA): a tensor of " + std::to_string(n) +
                                " elements is too large");
  if (reinterpret_cast<uintptr_t>(workspace) % alignof(double) != 0)
    throw std::invalid_argument("slerp (CUDA): the workspace must be 8-byte aligned");
  const cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  by_dtype(dtype, [&](auto tag) {
    StreamDevice guard(st);
    two_phase<decltype(tag)>(a, b, out, n, t, eps, dot_threshold,
                             static_cast<double*>(workspace), st);
  });
}

void slerp_segments_cuda(int dtype, int64_t count, const uint64_t* a_ptrs, const uint64_t* b_ptrs,
                         const uint64_t* out_ptrs, const int64_t* numels, const double* ts,
                         double eps, double dot_threshold, uintptr_t stream) {
  if (count <= 0) return;
  if (count > INT_MAX)
    throw std::invalid_argument("slerp (CUDA): too many segments (" + std::to_string(count) + ")");
  const cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    StreamDevice guard(st);
    slerp_segments_kernel<T><<<static_cast<unsigned>(count), kThreads, 0, st>>>(
        a_ptrs, b_ptrs, out_ptrs, numels, ts, eps, dot_threshold);
    check_launch("slerp_segments_kernel");
  });
}

}  // namespace mkf
