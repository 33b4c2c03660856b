// The elementwise apply steps of the gram-based methods on the CPU (gram/gram.h): one read of
// every input, one write, in the tensor's dtype op by op as torch computes it (common/rounding.h),
// multi-threaded over chunks; no temporaries.
//
// A kernel file (common/cpu_isa.h): compiled once per CPU instruction-set level, each time in
// namespace mkf::MKF_ISA_NS; the baseline compile also defines the mkf:: dispatchers.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "common/method_math.h"
#include "common/parallel.h"
#include "common/rounding.h"
#include "gram/gram.h"

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
  std::vector<double> G(static_cast<size_t>(rows) * n * n);
  const int64_t rl = rows > 1 ? row_len : 0;
  ::mkf::MKF_ISA_NS::gram_cpu(F::kTag, n, 1, table.data(), &numel, &rl, kGramInput, G.data(), threads);
  std::vector<double> ts(static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r) ts[r] = static_cast<double>(model_stock_t<F>(G.data() + r * n * n, n));
  return stock<F>(n, ptrs, numel, rl, ts.data(), threads);
}

}  // namespace

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

}  // namespace mkf
#endif
