// The gram op on the CPU: one read of every input (and the base), bf16/fp16 converted inside the
// loop, fp64 sums in the fixed order of gram_blocks.h (deterministic for any thread count and CPU
// level), multi-threaded over blocks of a large tensor, over rows, or over small tensors.
//
// A kernel file (common/cpu_isa.h): compiled once per CPU instruction-set level, each time in
// namespace mkf::MKF_ISA_NS; the baseline compile also defines the mkf:: dispatchers.
//
// No constant-propagation clones: GCC names a clone of an inline standard-library function (a
// std::vector constructor, say) as the function itself, outside this level's namespace, and compiles
// it with this level's instructions (tests/test_build.py: no wide instructions outside the levels).
#pragma GCC optimize("no-ipa-cp-clone")
#include "gram/gram.h"

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "common/gram_math.h"
#include "common/parallel.h"
#include "common/rounding.h"
#include "gram/gram_blocks.h"

namespace mkf::MKF_ISA_NS {
namespace {

static_assert(blocks::kBlock == kGramBlock, "one block size for the CPU gram sums");

// The terms of one element: the packed upper triangle (i <= j, row by row) of d d^T.
template <typename F, bool kRound, bool kBase, int KT>
struct GramTerms {
  using T = GramTerm<F, kRound>;
  using S = typename F::S;
  static constexpr int KM = KT > 0 ? KT : kGramMaxInputs;
  const S* x[KM];
  const S* b;
  int k;

  // blocks::lane_sums with the lanes innermost (vectorised); the same additions in the same order.
  static constexpr bool kLaneSums = KT > 0;
  inline void lane_sums(int64_t lo, int64_t len, double* out) const {
    constexpr int K = KT > 0 ? KT : 1;
    constexpr int NS = K * (K + 1) / 2;
    constexpr int L = blocks::kLanes;
    double acc[NS][L];
    for (int s = 0; s < NS; ++s)
      for (int l = 0; l < L; ++l) acc[s][l] = 0.0;
    int64_t i = 0;
    for (; i + L <= len; i += L) {
      const int64_t e = lo + i;
      typename T::D d[K][L];
      for (int q = 0; q < K; ++q)
        for (int l = 0; l < L; ++l) d[q][l] = kBase ? T::delta(x[q][e + l], b[e + l]) : T::value(x[q][e + l]);
      int p = 0;
      for (int a = 0; a < K; ++a) {
        for (int l = 0; l < L; ++l) acc[p][l] += T::square(d[a][l]);
        ++p;
        for (int c = a + 1; c < K; ++c, ++p)
          for (int l = 0; l < L; ++l) acc[p][l] += T::product(d[a][l], d[c][l]);
      }
    }
    for (int l = 0; i < len; ++i, ++l) {
      double t[NS];
      (*this)(lo + i, t);
      for (int s = 0; s < NS; ++s) acc[s][l] += t[s];
    }
    for (int s = 0; s < NS; ++s) {
      double v = 0.0;
      for (int l = 0; l < L; ++l) v += acc[s][l];
      out[s] = v;
    }
  }

  inline void operator()(int64_t i, double* t) const {
    const int K = KT > 0 ? KT : k;
    typename T::D d[KM];
    for (int q = 0; q < K; ++q) d[q] = kBase ? T::delta(x[q][i], b[i]) : T::value(x[q][i]);
    int p = 0;
    for (int a = 0; a < K; ++a) {
      t[p++] = T::square(d[a]);
      for (int c = a + 1; c < K; ++c) t[p++] = T::product(d[a], d[c]);
    }
  }
};

// Expands the packed triangle into the full symmetric k x k matrix.
inline void unpack(const double* packed, int k, double* G) {
  int p = 0;
  for (int a = 0; a < k; ++a)
    for (int c = a; c < k; ++c) {
      G[a * k + c] = packed[p];
      G[c * k + a] = packed[p];
      ++p;
    }
}

template <typename F, bool kRound, bool kBase, int KT>
void gram_segment(int k, const uint64_t* ptrs, int64_t offset, int64_t n, int threads, double* G) {
  using S = typename F::S;
  GramTerms<F, kRound, kBase, KT> terms;
  for (int q = 0; q < k; ++q) terms.x[q] = reinterpret_cast<const S*>(ptrs[q]) + offset;
  terms.b = kBase ? reinterpret_cast<const S*>(ptrs[k]) + offset : nullptr;
  terms.k = k;
  const int ns = k * (k + 1) / 2;
  double packed[blocks::kMaxNs];
  blocks::sums<(KT > 0 ? KT * (KT + 1) / 2 : 0)>(n, ns, threads, terms, packed);
  unpack(packed, k, G);
}

template <typename F, bool kRound, bool kBase, int KT>
int64_t gram_partials_seg(int k, const uint64_t* ptrs, int64_t n, int threads, double* out) {
  using S = typename F::S;
  GramTerms<F, kRound, kBase, KT> terms;
  for (int q = 0; q < k; ++q) terms.x[q] = reinterpret_cast<const S*>(ptrs[q]);
  terms.b = kBase ? reinterpret_cast<const S*>(ptrs[k]) : nullptr;
  terms.k = k;
  const int ns = k * (k + 1) / 2;
  const int64_t nb = blocks::count(n);
  blocks::Buffer packed(static_cast<size_t>(nb) * ns);
  blocks::partials<(KT > 0 ? KT * (KT + 1) / 2 : 0)>(n, ns, threads, terms, packed.data());
  for (int64_t b = 0; b < nb; ++b) unpack(packed.data() + b * ns, k, out + b * k * k);
  return nb;
}

// Calls fn.template operator()<F, kRound, kBase, KT>() for the runtime choices.
template <typename Fn>
void dispatch(int dtype, int k, int rounding, bool base, Fn&& fn) {
  if (k < 1 || k > kGramMaxInputs)
    throw std::invalid_argument("gram: k must be in [1, " + std::to_string(kGramMaxInputs) + "], got " +
                                std::to_string(k));
  if (rounding != kGramFp64 && rounding != kGramInput)
    throw std::invalid_argument("gram: unknown rounding " + std::to_string(rounding));
  auto with_k = [&](auto f, auto r, auto bs) {
    using Fm = decltype(f);
    constexpr bool R = decltype(r)::value;
    constexpr bool B = decltype(bs)::value;
    switch (k) {
      case 1: fn.template operator()<Fm, R, B, 1>(); break;
      case 2: fn.template operator()<Fm, R, B, 2>(); break;
      case 3: fn.template operator()<Fm, R, B, 3>(); break;
      case 4: fn.template operator()<Fm, R, B, 4>(); break;
      default: fn.template operator()<Fm, R, B, 0>(); break;
    }
  };
  auto with_rb = [&](auto f) {
    using T = std::true_type;
    using U = std::false_type;
    if (rounding == kGramInput) {
      base ? with_k(f, T{}, T{}) : with_k(f, T{}, U{});
    } else {
      base ? with_k(f, U{}, T{}) : with_k(f, U{}, U{});
    }
  };
  switch (dtype) {
    case kF32: with_rb(FmtF32{}); break;
    case kF16: with_rb(FmtF16{}); break;
    case kBF16: with_rb(FmtBF16{}); break;
    case kF64: with_rb(FmtF64{}); break;
    default: throw std::invalid_argument("gram: unsupported dtype tag " + std::to_string(dtype));
  }
}

// One tensor: whole (row_len 0) or per row; out gets rows x k x k values.
struct OneTensor {
  int k;
  const uint64_t* ptrs;
  int64_t n, row_len;
  double* out;
  int threads;
  template <typename F, bool R, bool B, int KT>
  void operator()() const {
    if (row_len <= 0 || row_len >= n) {
      gram_segment<F, R, B, KT>(k, ptrs, 0, n, threads, out);
      return;
    }
    const int64_t rows = n / row_len;
    const int64_t kk = static_cast<int64_t>(k) * k;
    parallel_for(rows, n >= blocks::kParallelMin ? threads : 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) gram_segment<F, R, B, KT>(k, ptrs, r * row_len, row_len, 1, out + r * kk);
    });
  }
};

struct PartialsJob {
  int k;
  const uint64_t* ptrs;
  int64_t n;
  double* out;
  int threads;
  int64_t* nb;
  template <typename F, bool R, bool B, int KT>
  void operator()() const {
    *nb = gram_partials_seg<F, R, B, KT>(k, ptrs, n, threads, out);
  }
};

int64_t rows_of(int64_t n, int64_t row_len) { return (row_len > 0 && row_len < n) ? n / row_len : 1; }

}  // namespace

void gram_cpu(int dtype, int64_t k, int64_t count, const uint64_t* ptrs, const int64_t* numels,
              const int64_t* row_lens, int rounding, double* out, int threads) {
  threads = default_threads(threads);
  const int ki = static_cast<int>(k);
  std::vector<int64_t> offsets(static_cast<size_t>(count) + 1, 0);
  bool any_base = false, all_base = true;
  for (int64_t s = 0; s < count; ++s) {
    const int64_t rl = row_lens ? row_lens[s] : 0;
    if (rl > 0 && numels[s] % rl != 0)
      throw std::invalid_argument("gram: a row length does not divide its tensor's numel");
    offsets[s + 1] = offsets[s] + rows_of(numels[s], rl) * k * k;
    const bool has = ptrs[s * (k + 1) + k] != 0;
    any_base |= has;
    all_base &= has;
  }
  if (count == 0) return;
  if (any_base != all_base) throw std::invalid_argument("gram: every tensor of one call has a base, or none");
  auto one = [&](int64_t s, int th) {
    const int64_t rl = row_lens ? row_lens[s] : 0;
    OneTensor job{ki, ptrs + s * (k + 1), numels[s], rl, out + offsets[s], th};
    dispatch(dtype, ki, rounding, all_base, job);
  };
  std::vector<int64_t> small;
  for (int64_t s = 0; s < count; ++s) {
    if (numels[s] >= blocks::kParallelMin) {
      one(s, threads);
    } else {
      small.push_back(s);
    }
  }
  // Small tensors: whole tensors per thread.
  parallel_for(static_cast<int64_t>(small.size()), small.size() > 1 ? threads : 1, [&](int64_t lo, int64_t hi) {
    for (int64_t j = lo; j < hi; ++j) one(small[j], 1);
  });
}

int64_t gram_partials_cpu(int dtype, int64_t k, const uint64_t* ptrs, int64_t n, int rounding,
                          double* partials, int threads) {
  threads = default_threads(threads);
  int64_t nb = 0;
  PartialsJob job{static_cast<int>(k), ptrs, n, partials, threads, &nb};
  dispatch(dtype, static_cast<int>(k), rounding, ptrs[k] != 0, job);
  return nb;
}

}  // namespace mkf::MKF_ISA_NS

#if MKF_ISA_PRIMARY
namespace mkf {

void gram_cpu(int dtype, int64_t k, int64_t count, const uint64_t* ptrs, const int64_t* numels,
              const int64_t* row_lens, int rounding, double* out, int threads) {
  MKF_CPU_DISPATCH(gram_cpu, dtype, k, count, ptrs, numels, row_lens, rounding, out, threads);
}

int64_t gram_partials_cpu(int dtype, int64_t k, const uint64_t* ptrs, int64_t n, int rounding,
                          double* partials, int threads) {
  MKF_CPU_DISPATCH(gram_partials_cpu, dtype, k, ptrs, n, rounding, partials, threads);
}

}  // namespace mkf
#endif
