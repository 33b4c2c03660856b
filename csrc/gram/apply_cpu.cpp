// The elementwise apply steps of the gram-based methods on the CPU (gram/gram.h): one read of
// every input, one write, in the tensor's dtype op by op as torch computes it (common/rounding.h),
// multi-threaded over chunks; no temporaries.
//
// A kernel file (common/cpu_isa.h): compiled once per CPU instruction-set level, each time in
// namespace mkf::MKF_ISA_NS; the baseline compile also defines the mkf:: dispatchers.
//
// No constant-propagation clones: GCC names a clone of an inline standard-library function (a
// std::vector constructor, say) as the function itself, outside this level's namespace, and compiles
// it with this level's instructions (tests/test_build.py: no wide instructions outside the levels).
#pragma GCC optimize("no-ipa-cp-clone")
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "common/dtype.h"
#include "common/method_math.h"
#include "common/parallel.h"
#include "common/rounding.h"
#include "gram/gram.h"
#include "gram/gram_blocks.h"

namespace mkf::MKF_ISA_NS {
namespace {

constexpr int64_t kChunk = 1 << 16;
constexpr int64_t kParallelMin = 1 << 18;
constexpr int kMaxModels = 64;

// Sub-blocks of kSub elements, one input at a time: every inner loop is a plain vectorisable loop.
constexpr int64_t kSub = 512;

template <typename F>
int64_t stock_range(int n, const typename F::S* const* xs, const typename F::S* base, typename F::S* out,
                    int64_t lo, int64_t hi, typename F::C t) {
  using C = typename F::C;
  const C nn = static_cast<C>(n);
  const C u = F::round(C(1) - t);
  C s[kSub];
  int64_t bad = 0;
  for (int64_t b0 = lo; b0 < hi; b0 += kSub) {
    const int64_t len = std::min(kSub, hi - b0);
    const typename F::S* x0 = xs[0] + b0;
    for (int64_t j = 0; j < len; ++j) s[j] = F::round(C(0) + F::load(x0[j]));
    for (int q = 1; q < n; ++q) {
      const typename F::S* xq = xs[q] + b0;
      for (int64_t j = 0; j < len; ++j) s[j] = F::round(s[j] + F::load(xq[j]));
    }
    const typename F::S* bb = base + b0;
    typename F::S* o = out + b0;
    for (int64_t j = 0; j < len; ++j) {
      const C avg = F::round(s[j] / nn);
      const C v = F::round(t * avg) + F::round(u * F::load(bb[j]));
      o[j] = F::store(v);
      s[j] = v;
    }
    for (int64_t j = 0; j < len; ++j) bad += !(F::round(s[j]) - F::round(s[j]) == C(0));  // NaN or +-Inf
  }
  return bad;
}

template <typename F>
int64_t stock(int n, const uint64_t* ptrs, int64_t numel, int64_t row_len, const double* ts, int threads) {
  using S = typename F::S;
  using C = typename F::C;
  const S* xs[kMaxModels];
  for (int q = 0; q < n; ++q) xs[q] = reinterpret_cast<const S*>(ptrs[q]);
  const S* base = reinterpret_cast<const S*>(ptrs[n]);
  S* out = reinterpret_cast<S*>(ptrs[n + 1]);
  const int64_t nc = (numel + kChunk - 1) / kChunk;
  std::atomic<int64_t> bad{0};
  parallel_for(nc, numel >= kParallelMin ? threads : 1, [&](int64_t c0, int64_t c1) {
    int64_t local = 0;
    for (int64_t c = c0; c < c1; ++c) {
      int64_t lo = c * kChunk;
      const int64_t hi = std::min(numel, lo + kChunk);
      while (lo < hi) {  // one row (one t) at a time
        const int64_t row = row_len > 0 ? lo / row_len : 0;
        const int64_t end = row_len > 0 ? std::min(hi, (row + 1) * row_len) : hi;
        local += stock_range<F>(n, xs, base, out, lo, end, static_cast<C>(ts[row]));
        lo = end;
      }
    }
    bad += local;
  });
  return bad.load();
}

template <typename F>
int64_t stock_all(int n, const uint64_t* ptrs, int64_t numel, int64_t row_len, int threads) {
  if (n > kGramMaxInputs)
    throw std::invalid_argument("model_stock: at most " + std::to_string(kGramMaxInputs) + " models");
  const int64_t rows = (row_len > 0 && row_len < numel) ? numel / row_len : 1;
  std::vector<uint64_t> table(ptrs, ptrs + n + 1);  // the models, then the base
  blocks::Buffer G(static_cast<size_t>(rows) * n * n);
  const int64_t rl = rows > 1 ? row_len : 0;
  ::mkf::MKF_ISA_NS::gram_cpu(F::kTag, n, 1, table.data(), &numel, &rl, kGramInput, G.data(), threads);
  blocks::Buffer ts(static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r) ts[r] = static_cast<double>(model_stock_t<F>(G.data() + r * n * n, n));
  return stock<F>(n, ptrs, numel, rl, ts.data(), threads);
}

// nuslerp's second pass: the terms R(R(v0 / n0) R(v1 / n1)) of one row.
template <typename F, bool kBase>
struct NuslerpDotTerm {
  using S = typename F::S;
  using C = typename F::C;
  const S *x0, *x1, *b;
  C n0, n1;
  inline C v(const S* x, int64_t i) const {
    return kBase ? F::round(F::load(x[i]) - F::load(b[i])) : F::load(x[i]);
  }
  inline void operator()(int64_t i, double* t) const {
    t[0] = static_cast<double>(F::round(F::round(v(x0, i) / n0) * F::round(v(x1, i) / n1)));
  }
};

template <typename F, bool kBase>
int64_t nuslerp_rows(const uint64_t* ptrs, int64_t numel, int64_t row_len, double t, int threads) {
  using S = typename F::S;
  using C = typename F::C;
  const int64_t rows = (row_len > 0 && row_len < numel) ? numel / row_len : 1;
  const int64_t len = rows > 1 ? row_len : numel;
  const S* x0 = reinterpret_cast<const S*>(ptrs[0]);
  const S* x1 = reinterpret_cast<const S*>(ptrs[1]);
  const S* b = reinterpret_cast<const S*>(ptrs[2]);
  S* out = reinterpret_cast<S*>(ptrs[3]);
  // pass 1: the squared norms of the rows
  blocks::Buffer G(static_cast<size_t>(rows) * 4);
  const uint64_t table[3] = {ptrs[0], ptrs[1], kBase ? ptrs[2] : 0};
  const int64_t rl = rows > 1 ? row_len : 0;
  ::mkf::MKF_ISA_NS::gram_cpu(F::kTag, 2, 1, table, &numel, &rl, kGramInput, G.data(), threads);
  std::vector<NuslerpCoeffs<F>> co(static_cast<size_t>(rows));
  // pass 2: the dots of the normalised rows, then the coefficients
  const int inner = rows > 1 ? 1 : threads;
  parallel_for(rows, (rows > 1 && numel >= kParallelMin) ? threads : 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t off = r * len;
      NuslerpDotTerm<F, kBase> term{x0 + off, x1 + off, kBase ? b + off : nullptr,
                                    nuslerp_norm<F>(G[r * 4 + 0]), nuslerp_norm<F>(G[r * 4 + 3])};
      double dot = 0.0;
      blocks::sums<1>(len, 1, inner, term, &dot);
      co[r].n0 = term.n0;
      co[r].n1 = term.n1;
      nuslerp_angle<F>(co[r], dot, t);
    }
  });
  // pass 3: the interpolation, plus the base
  const int64_t nc = (numel + kChunk - 1) / kChunk;
  std::atomic<int64_t> bad{0};
  parallel_for(nc, numel >= kParallelMin ? threads : 1, [&](int64_t c0, int64_t c1) {
    int64_t local = 0;
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t lo = c * kChunk, hi = std::min(numel, lo + kChunk);
      for (int64_t i = lo; i < hi; ++i) {
        const NuslerpCoeffs<F>& k = co[rows > 1 ? i / len : 0];
        C r;
        if constexpr (kBase) {
          const C bv = F::load(b[i]);
          const C v0 = F::round(F::load(x0[i]) - bv), v1 = F::round(F::load(x1[i]) - bv);
          r = F::round(bv + nuslerp_elem<F>(k, v0, v1));
        } else {
          r = nuslerp_elem<F>(k, F::load(x0[i]), F::load(x1[i]));
        }
        out[i] = F::store(r);
        local += !(r - r == C(0));
      }
    }
    bad += local;
  });
  return bad.load();
}

// model_stock's terms for torch's sums (gram/gram.h, model_stock_terms_cpu): one read of the inputs.
template <typename F>
void stock_terms(int n, int64_t numel, const uint64_t* p, int threads) {
  using S = typename F::S;
  using C = typename F::C;
  const S* b = reinterpret_cast<const S*>(p[n]);
  const int64_t nc = (numel + kChunk - 1) / kChunk;
  parallel_for(nc, numel >= kParallelMin ? threads : 1, [&](int64_t c0, int64_t c1) {
    C d[kSub * kGramMaxInputs];  // this sub-block's deltas, model by model
    for (int64_t lo = c0 * kChunk, end = std::min(numel, c1 * kChunk); lo < end; lo += kSub) {
      const int64_t len = std::min(kSub, end - lo);
      for (int q = 0; q < n; ++q) {
        const S* x = reinterpret_cast<const S*>(p[q]) + lo;
        S* out = reinterpret_cast<S*>(p[n + 1 + q]) + lo;
        C* dq = d + q * kSub;
        for (int64_t j = 0; j < len; ++j) {
          dq[j] = F::round(F::load(x[j]) - F::load(b[lo + j]));
          out[j] = F::store(dq[j]);
        }
      }
      int slot = 2 * n + 1;
      for (int q = 0; q < n; ++q) {
        for (int r = q + 1; r < n; ++r, ++slot) {
          S* out = reinterpret_cast<S*>(p[slot]) + lo;
          const C *dq = d + q * kSub, *dr = d + r * kSub;
          for (int64_t j = 0; j < len; ++j) out[j] = F::store(dq[j] * dr[j]);
        }
      }
    }
  });
}

// nuslerp of one long vector pair between torch's reductions (gram/gram.h, nuslerp_pass_cpu).
template <typename F>
int64_t nuslerp_pass(int pass, int64_t numel, const uint64_t* p, const double* s, int threads) {
  using S = typename F::S;
  using C = typename F::C;
  const int64_t nc = (numel + kChunk - 1) / kChunk;
  const int par = numel >= kParallelMin ? threads : 1;
  std::atomic<int64_t> bad{0};
  auto in = [&](int i) { return reinterpret_cast<const S*>(p[i]); };
  auto io = [&](int i) { return reinterpret_cast<S*>(p[i]); };
  parallel_for(nc, par, [&](int64_t c0, int64_t c1) {
    const int64_t lo = c0 * kChunk, hi = std::min(numel, c1 * kChunk);
    if (pass == 0) {  // x_0, x_1, base -> v_0, v_1: R(x_i - base)
      const S *x0 = in(0), *x1 = in(1), *b = in(2);
      S *v0 = io(3), *v1 = io(4);
      for (int64_t i = lo; i < hi; ++i) {
        const C bv = F::load(b[i]);
        v0[i] = F::store(F::load(x0[i]) - bv);
        v1[i] = F::store(F::load(x1[i]) - bv);
      }
    } else if (pass == 1) {  // v_0, v_1 -> R(R(v_0 / n_0) R(v_1 / n_1)), the dot's terms
      const S *v0 = in(0), *v1 = in(1);
      S* out = io(2);
      const C n0 = static_cast<C>(s[0]), n1 = static_cast<C>(s[1]);
      for (int64_t i = lo; i < hi; ++i)
        out[i] = F::store(F::round(F::load(v0[i]) / n0) * F::round(F::load(v1[i]) / n1));
    } else {  // v_0, v_1, base (or 0) -> out: the interpolation from torch's coefficients, plus the base
      const S *v0 = in(0), *v1 = in(1), *b = in(2);
      S* out = io(3);
      NuslerpCoeffs<F> k;  // the terms of nuslerp_elem (common/method_math.h), from torch's values
      k.colinear = s[0] != 0.0;
      k.s0 = static_cast<C>(s[1]), k.s1 = static_cast<C>(s[2]), k.st = static_cast<C>(s[3]);
      k.l0 = static_cast<C>(s[4]), k.l1 = static_cast<C>(s[5]);
      // one loop per (colinear, base) case: each a branch-free loop the compiler vectorises
      auto body = [&](auto colinear, auto with_base) {
        int64_t local = 0;
        for (int64_t i = lo; i < hi; ++i) {
          const C x0 = F::load(v0[i]), x1 = F::load(v1[i]);
          C r = colinear ? F::round(F::round(k.l0 * x0) + F::round(k.l1 * x1))
                         : F::round(F::round(F::round(k.s0 * x0) + F::round(k.s1 * x1)) / k.st);
          if constexpr (decltype(with_base)::value) r = F::round(F::load(b[i]) + r);
          out[i] = F::store(r);
          local += !(r - r == C(0));
        }
        return local;
      };
      using Yes = std::true_type;
      using No = std::false_type;
      bad += k.colinear ? (b ? body(Yes{}, Yes{}) : body(Yes{}, No{})) : (b ? body(No{}, Yes{}) : body(No{}, No{}));
    }
  });
  return bad.load();
}

}  // namespace

void model_stock_terms_cpu(int dtype, int64_t n_models, int64_t numel, const uint64_t* ptrs, int threads) {
  if (n_models < 2 || n_models > kGramMaxInputs)
    throw std::invalid_argument("model_stock_terms: 2 to " + std::to_string(kGramMaxInputs) + " models, got " +
                                std::to_string(n_models));
  if (numel <= 0) return;
  threads = default_threads(threads);
  const int n = static_cast<int>(n_models);
  switch (dtype) {
    case kF32: stock_terms<FmtF32>(n, numel, ptrs, threads); break;
    case kF16: stock_terms<FmtF16>(n, numel, ptrs, threads); break;
    case kBF16: stock_terms<FmtBF16>(n, numel, ptrs, threads); break;
    case kF64: stock_terms<FmtF64>(n, numel, ptrs, threads); break;
    default: throw std::invalid_argument("model_stock_terms: unsupported dtype tag " + std::to_string(dtype));
  }
}

int64_t nuslerp_pass_cpu(int dtype, int pass, int64_t numel, const uint64_t* ptrs, const double* scalars,
                         int threads) {
  if (pass < 0 || pass > 2) throw std::invalid_argument("nuslerp_pass_cpu: no pass " + std::to_string(pass));
  if (numel <= 0) return 0;
  threads = default_threads(threads);
  switch (dtype) {
    case kBF16: return nuslerp_pass<FmtBF16>(pass, numel, ptrs, scalars, threads);
    case kF16: return nuslerp_pass<FmtF16>(pass, numel, ptrs, scalars, threads);
    default: throw std::invalid_argument("nuslerp_pass_cpu: bf16 or fp16 only, got dtype tag " + std::to_string(dtype));
  }
}

int64_t nuslerp_cpu(int dtype, const uint64_t* ptrs, int64_t numel, int64_t row_len, double t, int threads) {
  if (row_len > 0 && numel % row_len != 0)
    throw std::invalid_argument("nuslerp: the row length does not divide the numel");
  if (numel <= 0) return 0;
  threads = default_threads(threads);
  const bool base = ptrs[2] != 0;
  switch (dtype) {
    case kF32: return base ? nuslerp_rows<FmtF32, true>(ptrs, numel, row_len, t, threads)
                           : nuslerp_rows<FmtF32, false>(ptrs, numel, row_len, t, threads);
    case kF16: return base ? nuslerp_rows<FmtF16, true>(ptrs, numel, row_len, t, threads)
                           : nuslerp_rows<FmtF16, false>(ptrs, numel, row_len, t, threads);
    case kBF16: return base ? nuslerp_rows<FmtBF16, true>(ptrs, numel, row_len, t, threads)
                            : nuslerp_rows<FmtBF16, false>(ptrs, numel, row_len, t, threads);
    case kF64: return base ? nuslerp_rows<FmtF64, true>(ptrs, numel, row_len, t, threads)
                           : nuslerp_rows<FmtF64, false>(ptrs, numel, row_len, t, threads);
    default: throw std::invalid_argument("nuslerp: unsupported dtype tag " + std::to_string(dtype));
  }
}

void model_stock_apply_cpu(int dtype, int64_t n_models, const uint64_t* ptrs, int64_t numel, int64_t row_len,
                           const double* ts, int threads) {
  if (n_models < 1 || n_models > kMaxModels)
    throw std::invalid_argument("model_stock_apply: between 1 and 64 models, got " + std::to_string(n_models));
  if (row_len > 0 && numel % row_len != 0)
    throw std::invalid_argument("model_stock_apply: the row length does not divide the numel");
  if (numel <= 0) return;
  threads = default_threads(threads);
  const int n = static_cast<int>(n_models);
  switch (dtype) {
    case kF32: stock<FmtF32>(n, ptrs, numel, row_len, ts, threads); break;
    case kF16: stock<FmtF16>(n, ptrs, numel, row_len, ts, threads); break;
    case kBF16: stock<FmtBF16>(n, ptrs, numel, row_len, ts, threads); break;
    case kF64: stock<FmtF64>(n, ptrs, numel, row_len, ts, threads); break;
    default: throw std::invalid_argument("model_stock_apply: unsupported dtype tag " + std::to_string(dtype));
  }
}

int64_t model_stock_cpu(int dtype, int64_t n_models, const uint64_t* ptrs, int64_t numel, int64_t row_len,
                        int threads) {
  if (n_models < 2)
    throw std::invalid_argument("model_stock: at least 2 models, got " + std::to_string(n_models));
  if (row_len > 0 && numel % row_len != 0)
    throw std::invalid_argument("model_stock: the row length does not divide the numel");
  if (numel <= 0) return 0;
  threads = default_threads(threads);
  const int n = static_cast<int>(n_models);
  switch (dtype) {
    case kF32: return stock_all<FmtF32>(n, ptrs, numel, row_len, threads);
    case kF16: return stock_all<FmtF16>(n, ptrs, numel, row_len, threads);
    case kBF16: return stock_all<FmtBF16>(n, ptrs, numel, row_len, threads);
    case kF64: return stock_all<FmtF64>(n, ptrs, numel, row_len, threads);
    default: throw std::invalid_argument("model_stock: unsupported dtype tag " + std::to_string(dtype));
  }
}

}  // namespace mkf::MKF_ISA_NS

#if MKF_ISA_PRIMARY
namespace mkf {

void model_stock_apply_cpu(int dtype, int64_t n_models, const uint64_t* ptrs, int64_t numel, int64_t row_len,
                           const double* ts, int threads) {
  MKF_CPU_DISPATCH(model_stock_apply_cpu, dtype, n_models, ptrs, numel, row_len, ts, threads);
}

int64_t model_stock_cpu(int dtype, int64_t n_models, const uint64_t* ptrs, int64_t numel, int64_t row_len,
                        int threads) {
  MKF_CPU_DISPATCH(model_stock_cpu, dtype, n_models, ptrs, numel, row_len, threads);
}

int64_t nuslerp_cpu(int dtype, const uint64_t* ptrs, int64_t numel, int64_t row_len, double t, int threads) {
  MKF_CPU_DISPATCH(nuslerp_cpu, dtype, ptrs, numel, row_len, t, threads);
}

void model_stock_terms_cpu(int dtype, int64_t n_models, int64_t numel, const uint64_t* ptrs, int threads) {
  MKF_CPU_DISPATCH(model_stock_terms_cpu, dtype, n_models, numel, ptrs, threads);
}

int64_t nuslerp_pass_cpu(int dtype, int pass, int64_t numel, const uint64_t* ptrs, const double* scalars,
                         int threads) {
  MKF_CPU_DISPATCH(nuslerp_pass_cpu, dtype, pass, numel, ptrs, scalars, threads);
}

}  // namespace mkf
#endif
