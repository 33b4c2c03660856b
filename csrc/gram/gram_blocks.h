// Deterministic fp64 block sums for the CPU kernels of csrc/gram/ (and csrc/rowwise/): included by
// *_cpu.cpp files only, inside their per-level namespace (common/cpu_isa.h), so each CPU level
// compiles its own copy.
//
// Order of additions, fixed whatever the thread count or the CPU level:
//   * a tensor (or a segment of it: a row) is cut into blocks of kBlock elements;
//   * within a block, lane l (0 .. kLanes-1) adds the terms of the elements i = l (mod kLanes) in
//     increasing i, and the lanes are then added in order 0 .. kLanes-1;
//   * the block sums are added in block order.
// A streamed tensor whose chunks start at multiples of kBlock therefore gets the sums of the whole.
#pragma once
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "common/parallel.h"

#ifndef MKF_ISA_NS
#error "gram_blocks.h belongs inside a CPU kernel file (common/cpu_isa.h)"
#endif

namespace mkf::MKF_ISA_NS {
namespace blocks {

constexpr int64_t kBlock = 1 << 14;
constexpr int kLanes = 8;
// Below this many elements a tensor runs on one thread: spawning costs more than it saves.
constexpr int64_t kParallelMin = 1 << 18;

inline int64_t count(int64_t n) { return (n + kBlock - 1) / kBlock; }

// A zeroed fp64 buffer, named in this level's namespace: GCC clones inline std::vector members for
// constant arguments under their std:: names, compiled with this level's instructions
// (tests/test_build.py allows wide instructions only in the levels' namespaces).
struct Buffer {
  explicit Buffer(size_t n) : p(new double[n]()) {}
  ~Buffer() { delete[] p; }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  double* data() { return p; }
  double& operator[](size_t i) { return p[i]; }
  double* p;
};

// A Terms type may bring its own lane_sums(lo, len, out) (same order of additions, written so that
// the compiler vectorises across the lanes); it says so with `static constexpr bool kLaneSums = true`.
template <typename T, typename = void>
struct has_lane_sums : std::false_type {};
template <typename T>
struct has_lane_sums<T, std::void_t<decltype(T::kLaneSums)>> : std::bool_constant<T::kLaneSums> {};

// NS sums over the elements [lo, lo + len) (len <= kBlock, or any length for one segment):
// terms(i, t) writes the NS terms of element i into t[0 .. NS-1].
template <int NS, typename Terms>
inline void lane_sums(int64_t lo, int64_t len, Terms&& terms, double* out) {
  if constexpr (has_lane_sums<std::decay_t<Terms>>::value) {
    terms.lane_sums(lo, len, out);
    return;
  }
  double acc[NS][kLanes];
  for (int s = 0; s < NS; ++s)
    for (int l = 0; l < kLanes; ++l) acc[s][l] = 0.0;
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes) {
    double t[kLanes][NS];
    for (int l = 0; l < kLanes; ++l) terms(lo + i + l, t[l]);
    for (int l = 0; l < kLanes; ++l)
      for (int s = 0; s < NS; ++s) acc[s][l] += t[l][s];
  }
  for (int l = 0; i < len; ++i, ++l) {
    double t[NS];
    terms(lo + i, t);
    for (int s = 0; s < NS; ++s) acc[s][l] += t[s];
  }
  for (int s = 0; s < NS; ++s) {
    double v = 0.0;
    for (int l = 0; l < kLanes; ++l) v += acc[s][l];
    out[s] = v;
  }
}

// Runtime-width variant (ns <= kMaxNs): the same order of additions as lane_sums<NS>.
constexpr int kMaxNs = 136;  // 16 inputs: 16 * 17 / 2 Gram entries
template <typename Terms>
inline void lane_sums_dyn(int ns, int64_t lo, int64_t len, Terms&& terms, double* out) {
  double acc[kMaxNs][kLanes];
  for (int s = 0; s < ns; ++s)
    for (int l = 0; l < kLanes; ++l) acc[s][l] = 0.0;
  double t[kMaxNs];
  for (int64_t i = 0; i < len; ++i) {
    terms(lo + i, t);
    const int l = static_cast<int>(i % kLanes);
    for (int s = 0; s < ns; ++s) acc[s][l] += t[s];
  }
  for (int s = 0; s < ns; ++s) {
    double v = 0.0;
    for (int l = 0; l < kLanes; ++l) v += acc[s][l];
    out[s] = v;
  }
}

// The block partials of [0, n) into partials[blk * ns + s], blocks spread over threads.
template <int NS, typename Terms>
inline void partials(int64_t n, int ns, int threads, Terms&& terms, double* part) {
  const int64_t nb = count(n);
  parallel_for(nb, n >= kParallelMin ? threads : 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t lo = b * kBlock, len = std::min(kBlock, n - lo);
      if constexpr (NS > 0) {
        lane_sums<NS>(lo, len, terms, part + b * NS);
      } else {
        lane_sums_dyn(ns, lo, len, terms, part + b * ns);
      }
    }
  });
}

// The ns sums over [0, n): block partials added in block order.
template <int NS, typename Terms>
inline void sums(int64_t n, int ns, int threads, Terms&& terms, double* out) {
  const int width = NS > 0 ? NS : ns;
  for (int s = 0; s < width; ++s) out[s] = 0.0;
  if (n <= 0) return;
  const int64_t nb = count(n);
  if (nb == 1) {
    if constexpr (NS > 0) {
      lane_sums<NS>(0, n, terms, out);
    } else {
      lane_sums_dyn(ns, 0, n, terms, out);
    }
    return;
  }
  Buffer part(static_cast<size_t>(nb) * width);
  partials<NS>(n, ns, threads, terms, part.data());
  for (int64_t b = 0; b < nb; ++b)
    for (int s = 0; s < width; ++s) out[s] += part[b * width + s];
}

}  // namespace blocks
}  // namespace mkf::MKF_ISA_NS
