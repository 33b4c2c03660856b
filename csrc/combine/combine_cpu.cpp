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
#include <memory>
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
#include "common/philox_lanes.h"

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

// Blocked element loops: each step of the math is one simple loop over a block of kB elements held
// in the arithmetic type (L1/L2-resident scratch), so the compiler vectorises every level's build;
// the order of operations per element is the spec's, whatever the vector width.
constexpr int64_t kB = 4096;  // a multiple of kL1Block's blocks: pass 1's sums align with them

// d = rD(x - base) of elements [j0, j0 + m)
template <typename F>
inline void delta_block(const In<F>& in, const typename F::A* bv, int64_t j0, int64_t m, typename F::A* d) {
  using A = typename F::A;
  const auto* x = in.x + j0;
  for (int64_t t = 0; t < m; ++t) d[t] = F::round(static_cast<A>(F::load(x[t])) - bv[t]);
}

// The Bernoulli keeps of elements [j0, j0 + m) (j0 a multiple of 4: whole Philox blocks, four words
// each), kChunk blocks of common/philox_lanes.h's words at a time.
inline void philox_keep(const PhiloxStream& ps, uint32_t thr, int64_t j0, int64_t m, uint8_t* keep) {
  constexpr int64_t kChunk = 64;
  const uint64_t b0 = static_cast<uint64_t>(j0) >> 2;
  const int64_t nb = (m + 3) >> 2;
  uint32_t w[4 * kChunk];
  for (int64_t q0 = 0; q0 < nb; q0 += kChunk) {
    philox_words(ps, b0 + static_cast<uint64_t>(q0), std::min<int64_t>(kChunk, nb - q0), w);
    const int64_t t0 = 4 * q0, te = std::min<int64_t>(m, t0 + 4 * kChunk);
    for (int64_t t = t0; t < te; ++t) keep[t] = static_cast<uint8_t>(ta_draw_keep(w[t - t0], thr));
  }
}

// bits [j0, j0 + m) of a bitmap as 0/1 flags (j0 a multiple of 64, as kB is: a word per 64 elements)
inline void bitmap_flags(const uint64_t* bm, int64_t j0, int64_t m, uint8_t* flags) {
  bm += j0 >> 6;
  for (int64_t t0 = 0; t0 < m; t0 += 64) {
    const uint64_t word = bm[t0 >> 6];
    const int64_t te = std::min<int64_t>(64, m - t0);
    for (int64_t l = 0; l < te; ++l) flags[t0 + l] = static_cast<uint8_t>((word >> l) & 1u);
  }
}

// keep flags (0/1) of elements [j0, j0 + m) from their deltas
template <typename F>
inline void keep_block(const In<F>& in, const typename F::A* d, int64_t j0, int64_t m, uint8_t* keep) {
  switch (in.mask) {
    case kMaskRule: {
      // ta_key takes the magnitude itself (it clears the sign bit), so |d| is not formed
      const uint32_t lo = in.lo, hi = in.hi, flags = in.flags;
      if (in.bm == nullptr) {
        for (int64_t t = 0; t < m; ++t)
          keep[t] = static_cast<uint8_t>(ta_rule_keep(ta_key(d[t]), lo, hi, flags, false));
      } else {
        bitmap_flags(in.bm, j0, m, keep);  // the tie bits first, then the rule over them
        for (int64_t t = 0; t < m; ++t)
          keep[t] = static_cast<uint8_t>(ta_rule_keep(ta_key(d[t]), lo, hi, flags, keep[t] != 0));
      }
      break;
    }
    case kMaskBitmap:
      bitmap_flags(in.bm, j0, m, keep);
      break;
    case kMaskRandom:
      philox_keep(in.ps, in.thr, j0, m, keep);
      break;
    default:
      for (int64_t t = 0; t < m; ++t) keep[t] = 1;
  }
}

// the sparsified delta in D, in place: s = sparsify(d, keep), by the input's work kind
template <typename F>
inline void apply_block(const In<F>& in, typename F::A* d, const uint8_t* keep, int64_t m) {
  using A = typename F::A;
  if (in.work == kWorkD) {
    for (int64_t t = 0; t < m; ++t) d[t] = keep[t] ? d[t] : d[t] * A(0);
    if (in.has_f) {
      const A f = in.f;
      for (int64_t t = 0; t < m; ++t) d[t] = F::round(d[t] * f);
    }
    return;
  }
  // kWorkC / kWork32: fp32 work (fp16 -> fp32 is exact; fp64 -> fp32 rounds), then back to D
  const float f = static_cast<float>(in.f);
  const bool has_f = in.has_f;
  for (int64_t t = 0; t < m; ++t) {
    float u = static_cast<float>(d[t]);
    u = keep[t] ? u : u * 0.0f;
    if (has_f) u = u * f;
    d[t] = F::round(static_cast<A>(u));
  }
}

// the weighted, sparsified delta v_i of every input for one block
template <typename F>
inline void terms_block(const std::vector<In<F>>& ins, const typename F::A* bv, int64_t j0, int64_t m,
                        typename F::A* v, uint8_t* keep) {
  using A = typename F::A;
  for (size_t i = 0; i < ins.size(); ++i) {
    const In<F>& in = ins[i];
    A* vi = v + i * kB;
    if (in.mask == kMaskZero) {
      for (int64_t t = 0; t < m; ++t) vi[t] = A(0);
    } else {
      delta_block(in, bv, j0, m, vi);
      if (in.mask != kMaskAll) {
        keep_block(in, vi, j0, m, keep);
        apply_block(in, vi, keep, m);
      }
    }
    const A w = in.w;
    for (int64_t t = 0; t < m; ++t) vi[t] = F::round(vi[t] * w);
  }
}

// sign election and sums of one block: K inputs and the consensus kind are constants, so each loop
// over the block is branch-free and vectorises; mixed[t] and div[t] as the spec's (ta_math.h)
template <typename F, int K, int Consensus>
void mix_block(const typename F::A* v, const typename F::A* wts, int64_t m, typename F::A* mixed,
               typename F::A* div) {
  using A = typename F::A;
  for (int64_t t = 0; t < m; ++t) {
    if constexpr (Consensus != kConsensusNone) {
      A vote = A(0);
      if constexpr (Consensus == kConsensusSum) {
        for (int i = 0; i < K; ++i) vote = vote + v[i * kB + t];
      } else {
        for (int i = 0; i < K; ++i) vote = vote + ta_sign(v[i * kB + t]);
      }
      vote = F::round(vote);
      const A maj = vote >= A(0) ? A(1) : A(-1);
      A mx = A(0), dv = A(0);
      for (int i = 0; i < K; ++i) {
        const A vi = v[i * kB + t];
        const bool agree = ta_sign(vi) == maj;
        // both arms computed first: a select, not a branch (the vectoriser does not speculate a
        // multiply, which could trap)
        const A vz = vi * A(0), wz = wts[i] * A(0);
        mx = mx + (agree ? vi : vz);
        dv = dv + (agree ? wts[i] : wz);
      }
      mixed[t] = F::round(mx);
      dv = F::round(dv);
      div[t] = dv == A(0) ? A(1) : dv;
    } else {
      A mx = A(0);
      for (int i = 0; i < K; ++i) mx = mx + v[i * kB + t];
      mixed[t] = F::round(mx);
    }
  }
}

template <typename F, int K>
void mix_dispatch(int count, int consensus, const typename F::A* v, const typename F::A* wts, int64_t m,
                  typename F::A* mixed, typename F::A* div) {
  if constexpr (K < kCombineMaxInputs) {
    if (count != K) return mix_dispatch<F, K + 1>(count, consensus, v, wts, m, mixed, div);
  }
  switch (consensus) {
    case kConsensusSum: return mix_block<F, K, kConsensusSum>(v, wts, m, mixed, div);
    case kConsensusCount: return mix_block<F, K, kConsensusCount>(v, wts, m, mixed, div);
    default: return mix_block<F, K, kConsensusNone>(v, wts, m, mixed, div);
  }
}

// normalisation, lambda and the output of one block (each step one loop); returns the count of
// non-finite outputs
template <typename F>
int64_t finish_block(typename F::A* mixed, const typename F::A* div, bool per_element_div, const typename F::A* bv,
                     typename F::storage* out, int64_t m, bool normalize, bool scale, typename F::A lam,
                     typename F::A wsum_div) {
  using A = typename F::A;
  using S = typename F::storage;
  if (normalize) {
    if (per_element_div) {
      for (int64_t t = 0; t < m; ++t) mixed[t] = F::round(mixed[t] / div[t]);
    } else {
      for (int64_t t = 0; t < m; ++t) mixed[t] = F::round(mixed[t] / wsum_div);
    }
  }
  if (scale)
    for (int64_t t = 0; t < m; ++t) mixed[t] = F::round(mixed[t] * lam);
  int64_t bad = 0;
  for (int64_t t = 0; t < m; ++t) {
    const S r = F::store(bv[t] + mixed[t]);
    out[t] = r;
    const A back = static_cast<A>(F::load(r));
    bad += back - back == A(0) ? 0 : 1;  // NaN for Inf and NaN
  }
  return bad;
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
  const int64_t nblocks = (n + kB - 1) / kB;
  const int nthreads = n >= kParallelMin ? threads : 1;

  // -- pass 1: L1 norms of the work-dtype deltas and of the kept ones; random draws to bitmaps
  std::vector<std::vector<uint64_t>> drawn(static_cast<size_t>(count));
  if (rescale && n > 0) {
    std::vector<int64_t> which;
    for (int64_t i = 0; i < count; ++i)
      if (ins[i].mask != kMaskAll && ins[i].mask != kMaskZero) which.push_back(i);
    const int64_t nl1 = (n + kL1Block - 1) / kL1Block;
    constexpr int64_t kPer = kB / kL1Block;
    std::vector<std::vector<double>> before(which.size()), after(which.size());
    for (size_t q = 0; q < which.size(); ++q) {
      // (constructed, not assign()ed: see select_cpu.cpp's histogram on constant-propagated clones)
      before[q] = std::vector<double>(static_cast<size_t>(nl1));
      after[q] = std::vector<double>(static_cast<size_t>(nl1));
      if (ins[which[q]].mask == kMaskRandom) drawn[which[q]] = std::vector<uint64_t>(static_cast<size_t>((n + 63) / 64));
    }
    parallel_for(nblocks, nthreads, [&](int64_t blo, int64_t bhi) {
      std::unique_ptr<A[]> bv(new A[kB]), d(new A[kB]);
      std::unique_ptr<double[]> mag(new double[kB]);
      std::unique_ptr<uint8_t[]> keep(new uint8_t[kB]);
      for (int64_t blk = blo; blk < bhi; ++blk) {
        const int64_t j0 = blk * kB, m = std::min(kB, n - j0);
        for (int64_t t = 0; t < m; ++t) bv[t] = static_cast<A>(F::load(base[j0 + t]));
        for (size_t q = 0; q < which.size(); ++q) {
          const In<F>& in = ins[which[q]];
          delta_block(in, bv.get(), j0, m, d.get());
          keep_block(in, d.get(), j0, m, keep.get());
          if (!drawn[which[q]].empty()) {
            uint64_t* dr = drawn[which[q]].data() + (j0 >> 6);
            for (int64_t t0 = 0; t0 < m; t0 += 64) {
              uint64_t word = 0;
              for (int64_t t = t0, te = std::min(m, t0 + 64); t < te; ++t)
                word |= static_cast<uint64_t>(keep[t]) << (t - t0);
              dr[t0 >> 6] = word;
            }
          }
          // |work value| in fp64, then fixed 8-lane fp64 sums per kL1Block block (the same order on
          // every level)
          if (in.work == kWorkD) {
            for (int64_t t = 0; t < m; ++t) mag[t] = std::fabs(static_cast<double>(d[t]));
          } else {
            for (int64_t t = 0; t < m; ++t) mag[t] = std::fabs(static_cast<double>(static_cast<float>(d[t])));
          }
          for (int64_t s0 = 0; s0 < m; s0 += kL1Block) {
            const int64_t se = std::min(m, s0 + kL1Block);
            double lb[8] = {}, la[8] = {};
            int64_t t = s0;
            for (; t + 8 <= se; t += 8) {
              for (int l = 0; l < 8; ++l) {
                const double a = mag[t + l];
                lb[l] += a;
                la[l] += a * static_cast<double>(keep[t + l]);  // a * 1 or a * 0, as keep ? a : a * 0
              }
            }
            for (int l = 0; t < se; ++t, ++l) {
              const double a = mag[t];
              lb[l] += a;
              la[l] += a * static_cast<double>(keep[t]);
            }
            double sb = 0, sa = 0;
            for (int l = 0; l < 8; ++l) {
              sb += lb[l];
              sa += la[l];
            }
            before[q][blk * kPer + s0 / kL1Block] = sb;
            after[q][blk * kPer + s0 / kL1Block] = sa;
          }
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
        if (in.work != kWorkD) return static_cast<double>(static_cast<float>(v));
        if constexpr (std::is_same_v<A, double>) return v;
        return static_cast<double>(F::round(static_cast<float>(v)));
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
  A wts[kCombineMaxInputs];
  A wsum_div = A(1);
  {
    A s = A(0);
    for (int64_t i = 0; i < count; ++i) {
      wts[i] = ins[i].w;
      s = s + ins[i].w;
    }
    s = F::round(s);
    wsum_div = std::fabs(static_cast<double>(s)) < kDivisorEps ? A(1) : s;
  }
  const A lam = static_cast<A>(lambda);
  const bool scale = lambda != 1.0;
  std::atomic<int64_t> bad{0};

  // -- pass 2: the merge
  parallel_for(nblocks, nthreads, [&](int64_t blo, int64_t bhi) {
    std::unique_ptr<A[]> bv(new A[kB]), v(new A[kB * count]), mixed(new A[kB]), div(new A[kB]);
    std::unique_ptr<uint8_t[]> keep(new uint8_t[kB]);
    int64_t nb = 0;
    for (int64_t blk = blo; blk < bhi; ++blk) {
      const int64_t j0 = blk * kB, m = std::min(kB, n - j0);
      for (int64_t t = 0; t < m; ++t) bv[t] = static_cast<A>(F::load(base[j0 + t]));
      terms_block(ins, bv.get(), j0, m, v.get(), keep.get());
      mix_dispatch<F, 1>(static_cast<int>(count), consensus, v.get(), wts, m, mixed.get(), div.get());
      nb += finish_block<F>(mixed.get(), div.get(), consensus != kConsensusNone, bv.get(), out + j0, m,
                            normalize != 0, scale, lam, wsum_div);
    }
    bad.fetch_add(nb, std::memory_order_relaxed);
  });
  return bad.load() == 0 ? 1 : 0;
}

// linear over elements [j0, je): K inputs a constant, so the inner loop unrolls and the loop over
// the elements vectorises; returns the count of non-finite outputs
template <typename F, int K>
int64_t linear_block(const typename F::storage* const* x, const typename F::A* w, typename F::A wsum, bool normalize,
                     typename F::storage* out, int64_t j0, int64_t je) {
  using A = typename F::A;
  using S = typename F::storage;
  int64_t bad = 0;
  for (int64_t j = j0; j < je; ++j) {
    A acc = A(0);
    // input by input, as mergekit's addcmul_ loop (which fuses the multiply-add)
    for (int i = 0; i < K; ++i) acc = std::fma(static_cast<A>(F::load(x[i][j])), w[i], acc);
    const A q = acc / wsum;
    const S r = F::store(normalize ? q : acc);
    out[j] = r;
    const A back = static_cast<A>(F::load(r));
    bad += back - back == A(0) ? 0 : 1;  // NaN for Inf and NaN
  }
  return bad;
}

template <typename F, int K>
int64_t linear_dispatch(int count, const typename F::storage* const* x, const typename F::A* w, typename F::A wsum,
                        bool normalize, typename F::storage* out, int64_t j0, int64_t je) {
  if constexpr (K < kCombineMaxInputs) {
    if (count != K) return linear_dispatch<F, K + 1>(count, x, w, wsum, normalize, out, j0, je);
  }
  return linear_block<F, K>(x, w, wsum, normalize, out, j0, je);
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
    const int64_t j0 = blo * kBlock, je = std::min(n, bhi * kBlock);
    if (linear_dispatch<F, 1>(static_cast<int>(count), x, w, wsum, normalize != 0, out, j0, je) != 0)
      finite.store(0, std::memory_order_relaxed);
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
