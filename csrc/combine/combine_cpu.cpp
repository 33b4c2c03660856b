// The combine op on the CPU (combine/combine.h): at most two passes over the inputs -- the L1
// norms of the sparsified deltas when the method rescales (a first pass, which also records the
// random draws as a bitmap), then one pass that builds every mask, sparsifies, weights, elects
// signs, normalises and writes the output, converting bf16/fp16 inside the loop.
//
// The element math is common/ta_math.h's, the rounding of each step torch's (see there).
// A kernel file (common/cpu_isa.h): compiled once per CPU instruction-set level.
#include "combine/combine.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "common/dtype.h"
#include "common/parallel.h"
#include "common/philox.h"
#include "common/ta_math.h"

namespace mkf::MKF_ISA_NS {
namespace {

#include "common/host_formats.h"

constexpr int64_t kBlock = 1 << 14;  // elements per parallel task
constexpr int64_t kParallelMin = 1 << 18;
constexpr int64_t kL1Block = 4096;  // methods/_task_arithmetic.py L1_BLOCK
constexpr double kRescaleEps = 1e-7;
constexpr double kDivisorEps = 1e-8;

// Python's math.fsum (Shewchuk's exact partials, correctly rounded result; Inf and NaN as Python
// treats them), over the fp64 block sums of an L1 norm.
double fsum(const std::vector<double>& xs) {
  std::vector<double> p;
  double special = 0;
  bool has_special = false;
  for (double x : xs) {
    if (!std::isfinite(x)) {
      special += x;
      has_special = true;
      continue;
    }
    size_t i = 0;
    for (double y : p) {
      if (std::fabs(x) < std::fabs(y)) std::swap(x, y);
      double hi = x + y;
      double lo = y - (hi - x);
      if (lo != 0.0) p[i++] = lo;
      x = hi;
    }
    p.resize(i);
    p.push_back(x);
  }
  if (has_special) return special;
  size_t n = p.size();
  double hi = 0.0;
  if (n > 0) {
    hi = p[--n];
    double lo = 0.0;
    while (n > 0) {
      double x = hi, y = p[--n];
      hi = x + y;
      double yr = hi - x;
      lo = y - yr;
      if (lo != 0.0) break;
    }
    if (n > 0 && ((lo < 0.0 && p[n - 1] < 0.0) || (lo > 0.0 && p[n - 1] > 0.0))) {
      double y = lo * 2.0;
      double x = hi + y;
      double yr = x - hi;
      if (y == yr) hi = x;
    }
  }
  return hi;
}

template <typename F>
struct In {
  using S = typename F::storage;
  using A = typename F::A;
  const S* x;
  uint32_t mask, work, lo, hi, flags, thr;
  const uint64_t* bm;
  PhiloxStream ps;
  A w;
  bool has_f;
  A f;  // the rescale factor, a value of the work dtype
};

// The keep decision of element j of input `in` with delta d (cached: the Philox block of j).
template <typename F>
inline bool keep_of(const In<F>& in, typename F::A d, int64_t j, uint64_t& cb, Philox4& cw) {
  switch (in.mask) {
    case kMaskRule: {
      uint32_t key = ta_key(d < 0 ? -d : d);
      bool tie = in.bm != nullptr && (key == in.lo || key == in.hi) && ta_bit(in.bm, j);
      return ta_rule_keep(key, in.lo, in.hi, in.flags, tie);
    }
    case kMaskBitmap: return ta_bit(in.bm, j);
    case kMaskRandom: {
      uint64_t b = static_cast<uint64_t>(j) >> 2;
      if (b != cb) {
        cw = in.ps.block(b);
        cb = b;
      }
      return ta_draw_keep(cw.v[j & 3], in.thr);
    }
    default: return true;
  }
}

// The work-dtype value of a delta (what the sparsifier masks and the L1 norm sums).
template <typename F>
inline typename F::A work_value(uint32_t work, typename F::A d) {
  using A = typename F::A;
  return work == kWorkD ? d : static_cast<A>(static_cast<float>(d));
}

// The sparsified delta in D.
template <typename F>
inline typename F::A sparsed(const In<F>& in, typename F::A d, bool keep) {
  using A = typename F::A;
  if (in.work == kWorkD) {
    A s = F::round(ta_masked(d, keep));
    if (in.has_f) s = F::round(s * in.f);
    return s;
  }
  // kWorkC / kWork32: fp32 work (fp16 -> fp32 is exact; fp64 -> fp32 rounds), then back to D
  float u = ta_masked(static_cast<float>(d), keep);
  if (in.has_f) u = u * static_cast<float>(in.f);
  return F::round(static_cast<A>(u));
}

template <typename F>
inline typename F::A delta_at(const In<F>& in, typename F::A b, int64_t j) {
  using A = typename F::A;
  return F::round(static_cast<A>(F::load(in.x[j])) - b);
}

template <typename F>
int combine_impl(int64_t n, const void* base_, void* out_, int64_t count, const uint64_t* xs,
                 const uint32_t* masks, const uint32_t* works, const uint32_t* rules,
                 const uint64_t* bitmaps, const uint32_t* thrs, const uint64_t* hashes,
                 const double* weights, uint64_t seed, int consensus, int normalize, int rescale,
                 double lambda, int threads) {
  using S = typename F::storage;
  using A = typename F::A;
  if (count < 1 || count > kCombineMaxInputs)
    throw std::invalid_argument("ta_combine_cpu: 1 to 8 non-base inputs");
  auto base = static_cast<const S*>(base_);
  auto out = static_cast<S*>(out_);
  std::vector<In<F>> ins(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) {
    In<F>& in = ins[i];
    in.x = reinterpret_cast<const S*>(xs[i]);
    in.mask = masks[i];
    in.work = works[i];
    in.lo = rules[3 * i];
    in.hi = rules[3 * i + 1];
    in.flags = rules[3 * i + 2];
    in.bm = reinterpret_cast<const uint64_t*>(bitmaps[i]);
    in.thr = thrs[i];
    in.ps = philox_stream(seed, hashes[i]);
    // torch.tensor(weights, dtype=D): the Python float to fp32, then to D
    in.w = std::is_same_v<A, double> ? static_cast<A>(weights[i])
                                     : F::round(static_cast<A>(static_cast<float>(weights[i])));
    in.has_f = false;
    in.f = A(1);
  }
  int nthreads = n >= kParallelMin ? threads : 1;
  int64_t nblocks = (n + kBlock - 1) / kBlock;

  // -- pass 1: L1 norms of the work-dtype deltas and of the kept ones; random draws to bitmaps
  std::vector<std::vector<uint64_t>> drawn(static_cast<size_t>(count));
  if (rescale && n > 0) {
    std::vector<int64_t> which;
    for (int64_t i = 0; i < count; ++i)
      if (ins[i].mask != kMaskAll && ins[i].mask != kMaskZero) which.push_back(i);
    int64_t nl1 = (n + kL1Block - 1) / kL1Block;
    std::vector<std::vector<double>> before(which.size()), after(which.size());
    for (size_t q = 0; q < which.size(); ++q) {
      before[q].assign(static_cast<size_t>(nl1), 0.0);
      after[q].assign(static_cast<size_t>(nl1), 0.0);
      if (ins[which[q]].mask == kMaskRandom) drawn[which[q]].assign(static_cast<size_t>((n + 63) / 64), 0);
    }
    parallel_for(nl1, nthreads, [&](int64_t blo, int64_t bhi) {
      for (size_t q = 0; q < which.size(); ++q) {
        const In<F>& in = ins[which[q]];
        uint64_t* dr = drawn[which[q]].empty() ? nullptr : drawn[which[q]].data();
        uint64_t cb = ~uint64_t{0};
        Philox4 cw{};
        for (int64_t blk = blo; blk < bhi; ++blk) {
          int64_t s = blk * kL1Block, e = std::min(n, s + kL1Block);
          double sb = 0, sa = 0;
          for (int64_t j = s; j < e; ++j) {
            A bv = static_cast<A>(F::load(base[j]));
            A d = delta_at(in, bv, j);
            bool keep = keep_of(in, d, j, cb, cw);
            if (dr != nullptr && keep) dr[j >> 6] |= uint64_t{1} << (j & 63);
            A t = work_value<F>(in.work, d);
            A m = ta_masked(t, keep);
            sb += std::fabs(static_cast<double>(t));
            sa += std::fabs(static_cast<double>(m));
          }
          before[q][blk] = sb;
          after[q][blk] = sa;
        }
      }
    });
    for (size_t q = 0; q < which.size(); ++q) {
      In<F>& in = ins[which[q]];
      if (!drawn[which[q]].empty()) {
        in.mask = kMaskBitmap;
        in.bm = drawn[which[q]].data();
      }
      double b = fsum(before[q]), a = fsum(after[q]);
      auto round_w = [&](double v) -> double {
        if (in.work == kWorkD) return static_cast<double>(F::round(static_cast<A>(std::is_same_v<A, double> ? v : static_cast<double>(static_cast<float>(v)))));
        return static_cast<double>(static_cast<float>(v));
      };
      double rb = round_w(b), ra = round_w(a), eps = round_w(kRescaleEps);
      if (rb < eps || ra < eps) continue;
      in.has_f = true;
      if (in.work == kWorkD)
        in.f = F::round(static_cast<A>(rb) / static_cast<A>(ra));
      else
        in.f = static_cast<A>(static_cast<float>(rb) / static_cast<float>(ra));
    }
  }

  // the divisor without consensus: the sum of the weights in D, 1 when |sum| < 1e-8
  A wsum_div = A(1);
  {
    A s = A(0);
    for (auto& in : ins) s = s + in.w;
    s = F::round(s);
    wsum_div = std::fabs(static_cast<double>(s)) < kDivisorEps ? A(1) : s;
  }
  const A lam = static_cast<A>(lambda);
  const bool scale = lambda != 1.0;
  std::atomic<int> finite{1};

  // -- pass 2: the merge
  parallel_for(nblocks, nthreads, [&](int64_t blo, int64_t bhi) {
    uint64_t cb[kCombineMaxInputs];
    Philox4 cw[kCombineMaxInputs];
    for (int64_t i = 0; i < count; ++i) cb[i] = ~uint64_t{0};
    bool ok = true;
    A v[kCombineMaxInputs];
    for (int64_t j = blo * kBlock, je = std::min(n, bhi * kBlock); j < je; ++j) {
      A bv = static_cast<A>(F::load(base[j]));
      for (int64_t i = 0; i < count; ++i) {
        const In<F>& in = ins[i];
        A d = delta_at(in, bv, j);
        A s;
        if (in.mask == kMaskAll) {
          s = d;
        } else if (in.mask == kMaskZero) {
          s = A(0);
        } else {
          s = sparsed(in, d, keep_of(in, d, j, cb[i], cw[i]));
        }
        v[i] = F::round(s * in.w);
      }
      A mixed, div;
      if (consensus != kConsensusNone) {
        A vote = A(0);
        if (consensus == kConsensusSum) {
          for (int64_t i = 0; i < count; ++i) vote = vote + v[i];
        } else {
          for (int64_t i = 0; i < count; ++i) vote = vote + ta_sign(v[i]);
        }
        vote = F::round(vote);
        A maj = vote >= A(0) ? A(1) : A(-1);
        mixed = A(0);
        div = A(0);
        for (int64_t i = 0; i < count; ++i) {
          bool agree = ta_sign(v[i]) == maj;
          mixed = mixed + ta_masked(v[i], agree);
          div = div + ta_masked(ins[i].w, agree);
        }
        mixed = F::round(mixed);
        div = F::round(div);
        if (div == A(0)) div = A(1);
      } else {
        mixed = A(0);
        for (int64_t i = 0; i < count; ++i) mixed = mixed + v[i];
        mixed = F::round(mixed);
        div = wsum_div;
      }
      if (normalize) mixed = F::round(mixed / div);
      if (scale) mixed = F::round(mixed * lam);
      S r = F::store(bv + mixed);
      out[j] = r;
      ok = ok && std::isfinite(static_cast<double>(F::load(r)));
    }
    if (!ok) finite.store(0, std::memory_order_relaxed);
  });
  return finite.load();
}

template <typename F>
int linear_impl(int64_t n, int64_t count, const uint64_t* xs, void* out_, const double* weights,
                int normalize, int threads) {
  using S = typename F::storage;
  using A = typename F::A;
  if (count < 1 || count > kCombineMaxInputs) throw std::invalid_argument("linear_cpu: 1 to 8 inputs");
  auto out = static_cast<S*>(out_);
  const S* x[kCombineMaxInputs];
  A w[kCombineMaxInputs];
  A wsum = A(0);
  for (int64_t i = 0; i < count; ++i) {
    x[i] = reinterpret_cast<const S*>(xs[i]);
    w[i] = static_cast<A>(static_cast<float>(weights[i]));  // torch.tensor(..., float32).to(A)
    wsum = wsum + w[i];
  }
  std::atomic<int> finite{1};
  int64_t nblocks = (n + kBlock - 1) / kBlock;
  parallel_for(nblocks, n >= kParallelMin ? threads : 1, [&](int64_t blo, int64_t bhi) {
    bool ok = true;
    for (int64_t j = blo * kBlock, je = std::min(n, bhi * kBlock); j < je; ++j) {
      A acc = A(0);
      // torch's addcmul_ fuses the multiply-add
      for (int64_t i = 0; i < count; ++i) acc = std::fma(static_cast<A>(F::load(x[i][j])), w[i], acc);
      if (normalize) acc = acc / wsum;
      S r = F::store(acc);
      out[j] = r;
      ok = ok && std::isfinite(static_cast<double>(F::load(r)));
    }
    if (!ok) finite.store(0, std::memory_order_relaxed);
  });
  return finite.load();
}

}  // namespace

int ta_combine_cpu(int dtype, int64_t n, const void* base, void* out, int64_t count,
                   const uint64_t* xs, const uint32_t* masks, const uint32_t* works,
                   const uint32_t* rules, const uint64_t* bitmaps, const uint32_t* thrs,
                   const uint64_t* hashes, const double* weights, uint64_t seed, int consensus,
                   int normalize, int rescale, double lambda, int threads) {
  threads = default_threads(threads);
  int r = 1;
  host_by_dtype(dtype, "ta_combine_cpu", [&](auto f) {
    r = combine_impl<decltype(f)>(n, base, out, count, xs, masks, works, rules, bitmaps, thrs,
                                  hashes, weights, seed, consensus, normalize, rescale, lambda,
                                  threads);
  });
  return r;
}

int linear_cpu(int dtype, int64_t n, int64_t count, const uint64_t* xs, void* out,
               const double* weights, int normalize, int threads) {
  threads = default_threads(threads);
  int r = 1;
  host_by_dtype(dtype, "linear_cpu", [&](auto f) {
    r = linear_impl<decltype(f)>(n, count, xs, out, weights, normalize, threads);
  });
  return r;
}

}  // namespace mkf::MKF_ISA_NS

#if MKF_ISA_PRIMARY
namespace mkf {

int ta_combine_cpu(int dtype, int64_t n, const void* base, void* out, int64_t count,
                   const uint64_t* xs, const uint32_t* masks, const uint32_t* works,
                   const uint32_t* rules, const uint64_t* bitmaps, const uint32_t* thrs,
                   const uint64_t* hashes, const double* weights, uint64_t seed, int consensus,
                   int normalize, int rescale, double lambda, int threads) {
  MKF_CPU_DISPATCH(ta_combine_cpu, dtype, n, base, out, count, xs, masks, works, rules, bitmaps,
                   thrs, hashes, weights, seed, consensus, normalize, rescale, lambda, threads);
}

int linear_cpu(int dtype, int64_t n, int64_t count, const uint64_t* xs, void* out,
               const double* weights, int normalize, int threads) {
  MKF_CPU_DISPATCH(linear_cpu, dtype, n, count, xs, out, weights, normalize, threads);
}

}  // namespace mkf
#endif
