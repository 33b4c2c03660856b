// SLERP on the CPU: two passes over memory (sums, then interpolate), multi-threaded,
// converting bf16/fp16 on the fly with no whole-tensor fp32 temporaries.
//
// Determinism: the sums are taken over fixed blocks of kBlock elements, each with kLanes
// independent fp64 accumulators, and the block partials are added in block order. The
// result therefore does not depend on the thread count, nor on the instruction-set level.
//
// A kernel file (common/cpu_isa.h): compiled once per CPU instruction-set level, each time in
// namespace mkf::MKF_ISA_NS; the baseline compile also defines the mkf:: dispatchers.
#include "slerp/slerp.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "common/dtype.h"
#include "common/parallel.h"
#include "common/slerp_math.h"

namespace mkf::MKF_ISA_NS {
namespace {

constexpr int64_t kBlock = 1 << 14;
constexpr int kLanes = 8;
// Below this many elements a tensor runs on one thread: spawning costs more than it saves.
constexpr int64_t kParallelMin = 1 << 18;

// Host element formats (16-bit floats converted with scalar code gcc vectorises; fp64 inputs use
// fp64 math throughout, as mergekit does).
#include "common/host_formats.h"

// GCC/Clang vector extensions: the accumulators stay in registers and the loop compiles to
// packed conversions and multiply-adds. The kLanes lanes are kParts vectors of kVec doubles:
// one 512-bit vector, except on AVX2, which has no 512-bit registers and where GCC keeps a
// 512-bit generic vector in memory (half the speed of the SSE2 build): there, two 256-bit
// vectors. Lane j accumulates the same elements in the same order either way.
#if defined(__AVX2__) && !defined(__AVX512F__)
constexpr int kVec = 4;
#else
constexpr int kVec = 8;
#endif
constexpr int kParts = kLanes / kVec;
typedef float vecf __attribute__((vector_size(4 * kVec)));
typedef double vecd __attribute__((vector_size(8 * kVec)));
static_assert(kLanes % kVec == 0, "the accumulators hold kLanes elements");

template <typename F>
inline vecd load_vec(const typename F::storage* p) {
  if constexpr (std::is_same_v<typename F::storage, double>) {
    vecd v;
    for (int j = 0; j < kVec; ++j) v[j] = p[j];
    return v;
  } else {
    vecf v;
    for (int j = 0; j < kVec; ++j) v[j] = F::load(p[j]);
    return __builtin_convertvector(v, vecd);
  }
}

template <typename F>
void block_sums(const typename F::storage* a, const typename F::storage* b, int64_t n,
                double out[3]) {
  // Lane j (0 .. kLanes-1) accumulates the elements i = j (mod kLanes) of the block, in order.
  vecd aa[kParts] = {}, bb[kParts] = {}, ab[kParts] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int q = 0; q < kParts; ++q) {
      vecd x = load_vec<F>(a + i + q * kVec);
      vecd y = load_vec<F>(b + i + q * kVec);
      aa[q] += x * x;
      bb[q] += y * y;
      ab[q] += x * y;
    }
  }
  double la[kLanes], lb[kLanes], lab[kLanes];
  for (int q = 0; q < kParts; ++q) {
    for (int j = 0; j < kVec; ++j) {
      la[q * kVec + j] = aa[q][j];
      lb[q * kVec + j] = bb[q][j];
      lab[q * kVec + j] = ab[q][j];
    }
  }
  for (int j = 0; i < n; ++i, ++j) {
    double x = static_cast<double>(F::load(a[i]));
    double y = static_cast<double>(F::load(b[i]));
    la[j] += x * x;
    lb[j] += y * y;
    lab[j] += x * y;
  }
  double s0 = 0, s1 = 0, s2 = 0;
  for (int j = 0; j < kLanes; ++j) {
    s0 += la[j];
    s1 += lb[j];
    s2 += lab[j];
  }
  out[0] = s0;
  out[1] = s1;
  out[2] = s2;
}

template <typename F>
void sums_impl(const void* a_, const void* b_, int64_t n, double sums[3], int threads) {
  auto a = static_cast<const typename F::storage*>(a_);
  auto b = static_cast<const typename F::storage*>(b_);
  int64_t nblocks = (n + kBlock - 1) / kBlock;
  std::vector<double> partial(static_cast<size_t>(nblocks) * 3, 0.0);
  auto work = [&](int64_t lo, int64_t hi) {
    for (int64_t blk = lo; blk < hi; ++blk) {
      int64_t s = blk * kBlock, len = std::min(kBlock, n - s);
      block_sums<F>(a + s, b + s, len, &partial[blk * 3]);
    }
  };
  parallel_for(nblocks, n >= kParallelMin ? threads : 1, work);
  double s0 = 0, s1 = 0, s2 = 0;
  for (int64_t blk = 0; blk < nblocks; ++blk) {
    s0 += partial[blk * 3];
    s1 += partial[blk * 3 + 1];
    s2 += partial[blk * 3 + 2];
  }
  sums[0] = s0;
  sums[1] = s1;
  sums[2] = s2;
}

template <typename F, typename C>
void interp_range(const typename F::storage* a, const typename F::storage* b,
                  typename F::storage* out, int64_t lo, int64_t hi, C ca, C cb) {
  for (int64_t i = lo; i < hi; ++i) {
    C x = static_cast<C>(F::load(a[i]));
    C y = static_cast<C>(F::load(b[i]));
    out[i] = F::store(ca * x + cb * y);
  }
}

template <typename F>
void slerp_impl(const void* a_, const void* b_, void* out_, int64_t n, double t, double eps,
                double thr, int threads) {
  using S = typename F::storage;
  using C = std::conditional_t<std::is_same_v<S, double>, double, float>;
  auto a = static_cast<const S*>(a_);
  auto b = static_cast<const S*>(b_);
  auto out = static_cast<S*>(out_);
  double sums[3] = {0, 0, 0};
  if (n > 0) sums_impl<F>(a_, b_, n, sums, threads);
  SlerpCoeffs c = slerp_coeffs(sums[0], sums[1], sums[2], t, eps, thr);
  if (n == 0) return;
  // The coefficients are rounded to the compute dtype, as mergekit holds them in fp32.
  C ca = static_cast<C>(c.ca), cb = static_cast<C>(c.cb);
  int64_t nblocks = (n + kBlock - 1) / kBlock;
  parallel_for(nblocks, n >= kParallelMin ? threads : 1, [&](int64_t lo, int64_t hi) {
    interp_range<F>(a, b, out, lo * kBlock, std::min(n, hi * kBlock), ca, cb);
  });
}

template <typename F>
int64_t block_sums_impl(const void* a_, const void* b_, int64_t n, double* partials, int threads) {
  auto a = static_cast<const typename F::storage*>(a_);
  auto b = static_cast<const typename F::storage*>(b_);
  int64_t nblocks = (n + kBlock - 1) / kBlock;
  parallel_for(nblocks, n >= kParallelMin ? threads : 1, [&](int64_t lo, int64_t hi) {
    for (int64_t blk = lo; blk < hi; ++blk) {
      int64_t s = blk * kBlock, len = std::min(kBlock, n - s);
      block_sums<F>(a + s, b + s, len, &partials[blk * 3]);
    }
  });
  return nblocks;
}

template <typename F>
void lerp_impl(const void* a_, const void* b_, void* out_, int64_t n, double ca_, double cb_, int threads) {
  using S = typename F::storage;
  using C = std::conditional_t<std::is_same_v<S, double>, double, float>;
  C ca = static_cast<C>(ca_), cb = static_cast<C>(cb_);
  int64_t nblocks = (n + kBlock - 1) / kBlock;
  parallel_for(nblocks, n >= kParallelMin ? threads : 1, [&](int64_t lo, int64_t hi) {
    interp_range<F>(static_cast<const S*>(a_), static_cast<const S*>(b_), static_cast<S*>(out_), lo * kBlock,
                    std::min(n, hi * kBlock), ca, cb);
  });
}

template <typename Fn>
void by_dtype(int dtype, Fn&& fn) {
  switch (dtype) {
    case kF32: fn(HostF32{}); break;
    case kF16: fn(HostF16{}); break;
    case kBF16: fn(HostBF16{}); break;
    case kF64: fn(HostF64{}); break;
    default: throw std::invalid_argument("slerp: unsupported dtype tag " + std::to_string(dtype));
  }
}

}  // namespace

void slerp_cpu(int dtype, const void* a, const void* b, void* out, int64_t n, double t, double eps,
               double dot_threshold, int threads) {
  threads = default_threads(threads);
  by_dtype(dtype, [&](auto f) {
    slerp_impl<decltype(f)>(a, b, out, n, t, eps, dot_threshold, threads);
  });
}

int64_t slerp_block_sums_cpu(int dtype, const void* a, const void* b, int64_t n, double* partials,
                             int threads) {
  threads = default_threads(threads);
  int64_t blocks = 0;
  by_dtype(dtype, [&](auto f) { blocks = block_sums_impl<decltype(f)>(a, b, n, partials, threads); });
  return blocks;
}

void slerp_lerp_cpu(int dtype, const void* a, const void* b, void* out, int64_t n, double ca, double cb,
                    int threads) {
  threads = default_threads(threads);
  by_dtype(dtype, [&](auto f) { lerp_impl<decltype(f)>(a, b, out, n, ca, cb, threads); });
}

void slerp_batched_cpu(int dtype, int64_t count, const uint64_t* a_ptrs, const uint64_t* b_ptrs,
                       const uint64_t* out_ptrs, const int64_t* numels, const double* ts,
                       double eps, double dot_threshold, int threads) {
  threads = default_threads(threads);
  std::vector<int64_t> small;
  for (int64_t s = 0; s < count; ++s) {
    if (numels[s] >= kParallelMin) {
      slerp_cpu(dtype, reinterpret_cast<const void*>(a_ptrs[s]),
                reinterpret_cast<const void*>(b_ptrs[s]), reinterpret_cast<void*>(out_ptrs[s]),
                numels[s], ts[s], eps, dot_threshold, threads);
    } else {
      small.push_back(s);
    }
  }
  // Small tensors: one thread per tensor, whole tensors per thread.
  parallel_for(static_cast<int64_t>(small.size()), threads, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      int64_t s = small[k];
      slerp_cpu(dtype, reinterpret_cast<const void*>(a_ptrs[s]),
                reinterpret_cast<const void*>(b_ptrs[s]), reinterpret_cast<void*>(out_ptrs[s]),
                numels[s], ts[s], eps, dot_threshold, 1);
    }
  });
}

}  // namespace mkf::MKF_ISA_NS

#if MKF_ISA_PRIMARY
namespace mkf {

void slerp_cpu(int dtype, const void* a, const void* b, void* out, int64_t n, double t, double eps,
               double dot_threshold, int threads) {
  MKF_CPU_DISPATCH(slerp_cpu, dtype, a, b, out, n, t, eps, dot_threshold, threads);
}

int64_t slerp_block_sums_cpu(int dtype, const void* a, const void* b, int64_t n, double* partials,
                             int threads) {
  MKF_CPU_DISPATCH(slerp_block_sums_cpu, dtype, a, b, n, partials, threads);
}

void slerp_lerp_cpu(int dtype, const void* a, const void* b, void* out, int64_t n, double ca, double cb,
                    int threads) {
  MKF_CPU_DISPATCH(slerp_lerp_cpu, dtype, a, b, out, n, ca, cb, threads);
}

void slerp_batched_cpu(int dtype, int64_t count, const uint64_t* a_ptrs, const uint64_t* b_ptrs,
                       const uint64_t* out_ptrs, const int64_t* numels, const double* ts,
                       double eps, double dot_threshold, int threads) {
  MKF_CPU_DISPATCH(slerp_batched_cpu, dtype, count, a_ptrs, b_ptrs, out_ptrs, numels, ts, eps,
                   dot_threshold, threads);
}

}  // namespace mkf
#endif
