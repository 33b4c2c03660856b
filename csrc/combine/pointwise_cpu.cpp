// The pointwise methods on the CPU (combine/combine.h): nearswap, ram and ramplus_tl, one read of
// every input and one write (ramplus_tl: a first pass counts each model's shared and unique changes
// over the tensor), bf16/fp16 converted inside the loop, every step rounded as torch rounds it
// (common/pointwise_math.h), multi-threaded over blocks; no temporaries.
//
// A kernel file (common/cpu_isa.h): compiled once per CPU instruction-set level.
//
// No constant-propagation clones (see gram/apply_cpu.cpp). No trapping math: without it GCC keeps the
// loops' float comparisons (the clamps, |d| > epsilon) as branches, as an ordered comparison with a
// NaN may raise FE_INVALID, and vectorises none of them; the values are the same either way (only
// the floating-point exception flags, which nothing reads, may differ).
#pragma GCC optimize("no-ipa-cp-clone", "no-trapping-math")
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "combine/combine.h"
#include "common/dtype.h"
#include "common/parallel.h"
#include "common/pointwise_math.h"
#include "common/rounding.h"

namespace mkf::MKF_ISA_NS {
namespace {

constexpr int64_t kBlock = 1 << 14;  // elements per parallel task
constexpr int64_t kParallelMin = 1 << 18;
constexpr int64_t kSub = 256;  // elements per inner loop: every loop a plain vectorisable one

template <typename Fn>
void by_format(int dtype, const char* op, Fn&& fn) {
  switch (dtype) {
    case kF32: fn(FmtF32{}); break;
    case kF16: fn(FmtF16{}); break;
    case kBF16: fn(FmtBF16{}); break;
    case kF64: fn(FmtF64{}); break;
    default: throw std::invalid_argument(std::string(op) + ": unsupported dtype tag " + std::to_string(dtype));
  }
}

// Runs body(lo, hi) over [0, n) in blocks, in parallel for large n; body returns how many of its
// outputs are not finite. Returns 1 when every output is finite.
template <typename Body>
int blocks_over(int64_t n, int threads, Body&& body) {
  std::atomic<int> finite{1};
  const int64_t nb = (n + kBlock - 1) / kBlock;
  parallel_for(nb, n >= kParallelMin ? threads : 1, [&](int64_t b0, int64_t b1) {
    int64_t bad = 0;
    for (int64_t lo = b0 * kBlock, end = std::min(n, b1 * kBlock); lo < end; lo += kSub)
      bad += body(lo, std::min(end, lo + kSub));
    if (bad) finite.store(0, std::memory_order_relaxed);
  });
  return finite.load();
}

template <typename F>
int nearswap_impl(int64_t n, const void* base_, const void* x_, void* out_, double t_, int threads) {
  using S = typename F::S;
  using C = typename F::C;
  const S* b = static_cast<const S*>(base_);
  const S* x = static_cast<const S*>(x_);
  S* out = static_cast<S*>(out_);
  const C t = scalar<F>(t_);
  const C lo = F::round(scalar<F>(1e-6));
  return blocks_over(n, threads, [&](int64_t i0, int64_t i1) {
    int64_t bad = 0;
    for (int64_t i = i0; i < i1; ++i) {
      const C r = nearswap_elem<F>(F::load(b[i]), F::load(x[i]), t, lo);
      out[i] = F::store(r);
      bad += !(r - r == C(0));
    }
    return bad;
  });
}

// One sub-block of ram / ramplus_tl: the kept deltas (R(d * changed)) per model and how many models
// change each element.
template <typename F>
struct RamBlock {
  using S = typename F::S;
  using C = typename F::C;
  C kept[kCombineMaxInputs][kSub];
  C changed[kCombineMaxInputs][kSub];  // 1 or 0
  C count[kSub];
  C bval[kSub];

  void load(int m, const S* const* xs, const S* b, int64_t i0, int64_t len, C eps) {
    for (int64_t j = 0; j < len; ++j) {
      bval[j] = F::load(b[i0 + j]);
      count[j] = C(0);
    }
    for (int q = 0; q < m; ++q) {
      const S* x = xs[q] + i0;
      C* k = kept[q];
      C* chg = changed[q];
      for (int64_t j = 0; j < len; ++j) {
        const C d = F::round(F::load(x[j]) - bval[j]);
        const C ch = ram_changed<F>(d, eps) ? C(1) : C(0);
        k[j] = F::round(d * ch);
        chg[j] = ch;
        count[j] += ch;
      }
    }
  }
};

// The base and the m models (1 <= m <= kCombineMaxInputs) of one call, by address.
template <typename F>
struct ModelTable {
  const typename F::S* b;
  const typename F::S* xs[kCombineMaxInputs];
  int m;

  ModelTable(int64_t m_, const void* base, const uint64_t* xs_, const char* op) {
    if (m_ < 1 || m_ > kCombineMaxInputs)
      throw std::invalid_argument(std::string(op) + ": 1 to " + std::to_string(kCombineMaxInputs) +
                                  " models besides the base, got " + std::to_string(m_));
    m = static_cast<int>(m_);
    b = static_cast<const typename F::S*>(base);
    for (int q = 0; q < m; ++q) xs[q] = reinterpret_cast<const typename F::S*>(xs_[q]);
  }
};

// The base and the models of one ram / ramplus_tl call.
template <typename F>
struct RamInputs : ModelTable<F> {
  typename F::C eps;  // epsilon rounded to the dtype (a comparison with a Python scalar)

  RamInputs(int64_t m_, const void* base, const uint64_t* xs_, double epsilon, const char* op)
      : ModelTable<F>(m_, base, xs_, op), eps(F::round(scalar<F>(epsilon))) {}
};

// The output pass. ram (lam null): base + R(sum_i R(R(kept_i * unique) + share_i)), every step in the
// dtype. ramplus_tl: base + sum_i (R(kept_i * unique) * lambda_i + share_i) in the compute type (fp32
// for 16-bit dtypes: lambda is an fp32 tensor), stored once in O. share_i = R(R(kept_i * overlap) /
// max(count, 1)). O: the output's format, F's own or, for 16-bit F, fp32 (the promoted result as is).
template <typename F, typename O>
int ram_apply(int64_t n, const RamInputs<F>& in, const float* lam, void* out_, int threads) {
  using C = typename F::C;
  static_assert(std::is_same_v<typename O::C, C>, "the output holds the compute type's values");
  auto* out = static_cast<typename O::S*>(out_);
  return blocks_over(n, threads, [&](int64_t i0, int64_t i1) {
    RamBlock<F> blk;
    const int64_t len = i1 - i0;
    blk.load(in.m, in.xs, in.b, i0, len, in.eps);
    C acc[kSub];
    for (int64_t j = 0; j < len; ++j) acc[j] = C(0);
    for (int q = 0; q < in.m; ++q) {
      const C* k = blk.kept[q];
      const C l = lam ? static_cast<C>(lam[q]) : C(1);
      for (int64_t j = 0; j < len; ++j) {
        const C c = blk.count[j];
        const C un = c == C(1) ? C(1) : C(0), ov = c > C(1) ? C(1) : C(0);
        const C share = F::round(F::round(k[j] * ov) / (c < C(1) ? C(1) : c));
        const C unique = F::round(k[j] * un);
        acc[j] += lam ? unique * l + share : F::round(unique + share);
      }
    }
    int64_t bad = 0;
    for (int64_t j = 0; j < len; ++j) {
      const C v = lam ? blk.bval[j] + acc[j] : F::round(blk.bval[j] + F::round(acc[j]));
      out[i0 + j] = O::store(v);
      bad += !(v - v == C(0));
    }
    return bad;
  });
}

template <typename F>
int ram_impl(int64_t n, int64_t m, const void* base, const uint64_t* xs, void* out, double eps, int threads) {
  const RamInputs<F> in(m, base, xs, eps, "ram_cpu");
  return ram_apply<F, F>(n, in, nullptr, out, threads);
}

// ramplus_tl: a first pass for each model's lambda, then the output pass.
template <typename F, typename O>
int ramplus_impl(int64_t n, int64_t m_, const void* base, const uint64_t* xs, void* out, double r, double alpha,
                 double eps, int threads) {
  using C = typename F::C;
  const RamInputs<F> in(m_, base, xs, eps, "ramplus_tl_cpu");
  const int m = in.m;
  // per model: the elements it changes that others change too, and those only it changes
  const int64_t nb = (n + kBlock - 1) / kBlock;
  std::vector<int64_t> counts(static_cast<size_t>(nb) * 2 * m, 0);
  parallel_for(nb, n >= kParallelMin ? threads : 1, [&](int64_t b0, int64_t b1) {
    RamBlock<F> blk;
    for (int64_t bi = b0; bi < b1; ++bi) {
      int64_t* cnt = counts.data() + bi * 2 * m;
      for (int64_t i0 = bi * kBlock, end = std::min(n, (bi + 1) * kBlock); i0 < end; i0 += kSub) {
        const int64_t len = std::min(end, i0 + kSub) - i0;
        blk.load(m, in.xs, in.b, i0, len, in.eps);
        for (int q = 0; q < m; ++q) {
          int64_t shared = 0, unique = 0;
          for (int64_t j = 0; j < len; ++j) {
            const bool ch = blk.changed[q][j] != C(0);
            shared += ch && blk.count[j] > C(1);
            unique += ch && blk.count[j] == C(1);
          }
          cnt[2 * q] += shared;
          cnt[2 * q + 1] += unique;
        }
      }
    }
  });
  float lam[kCombineMaxInputs];
  for (int q = 0; q < m; ++q) {
    int64_t shared = 0, unique = 0;
    for (int64_t bi = 0; bi < nb; ++bi) {
      shared += counts[bi * 2 * m + 2 * q];
      unique += counts[bi * 2 * m + 2 * q + 1];
    }
    lam[q] = ramplus_lambda(shared, unique, r, alpha, eps);
  }
  return ram_apply<F, O>(n, in, lam, out, threads);
}

// ---- sce (after the variance selection)

// The base and the models of one sce call, and the selected deltas of a sub-block.
template <typename F>
struct SceInputs : ModelTable<F> {
  using S = typename F::S;
  using C = typename F::C;
  using ModelTable<F>::b;
  using ModelTable<F>::xs;
  using ModelTable<F>::m;
  const uint64_t* keep;

  SceInputs(int64_t m_, const void* base, const uint64_t* xs_, const uint64_t* keep_, const char* op)
      : ModelTable<F>(m_, base, xs_, op), keep(keep_) {}

  // s[q][j] = rD(rD(x_q - b) * keep) for elements [i0, i0 + len); bval[j] = b
  void load(int64_t i0, int64_t len, C (*s)[kSub], C* bval) const {
    for (int64_t j = 0; j < len; ++j) bval[j] = F::load(b[i0 + j]);
    for (int q = 0; q < m; ++q) {
      const S* x = xs[q] + i0;
      for (int64_t j = 0; j < len; ++j) {
        const C d = F::round(F::load(x[j]) - bval[j]);
        if (keep == nullptr) {
          s[q][j] = d;
        } else {
          const int64_t i = i0 + j;
          const C f = ((keep[i >> 6] >> (i & 63)) & 1u) ? C(1) : C(0);
          s[q][j] = F::round(d * f);
        }
      }
    }
  }
};

// rD(s_q^2) into out (when given) and, into sums (when given), each model's fp64 sum of them: per
// block of kBlock elements from 0 in index order, the blocks' partials added in block order (the same
// value for any thread count)
template <typename F>
void sce_squares_impl(int64_t n, const SceInputs<F>& in, void* out_, double* sums, int threads) {
  using C = typename F::C;
  auto* out = static_cast<typename F::S*>(out_);
  const int m = in.m;
  const int64_t nb = (n + kBlock - 1) / kBlock;
  std::vector<double> part(sums ? static_cast<size_t>(nb) * m : 0, 0.0);
  parallel_for(nb, n >= kParallelMin ? threads : 1, [&](int64_t b0, int64_t b1) {
    C s[kCombineMaxInputs][kSub], bval[kSub];
    for (int64_t bi = b0; bi < b1; ++bi) {
      double acc[kCombineMaxInputs] = {};
      for (int64_t i0 = bi * kBlock, end = std::min(n, (bi + 1) * kBlock); i0 < end; i0 += kSub) {
        const int64_t len = std::min(end, i0 + kSub) - i0;
        in.load(i0, len, s, bval);
        for (int q = 0; q < m; ++q) {
          C* sq = s[q];
          for (int64_t j = 0; j < len; ++j) sq[j] = F::round(sq[j] * sq[j]);
          if (out)
            for (int64_t j = 0; j < len; ++j) out[q * n + i0 + j] = F::store(sq[j]);
          if (sums) {
            double a = acc[q];
            for (int64_t j = 0; j < len; ++j) a += static_cast<double>(sq[j]);
            acc[q] = a;
          }
        }
      }
      if (sums)
        for (int q = 0; q < m; ++q) part[static_cast<size_t>(bi) * m + q] = acc[q];
    }
  });
  if (sums)
    for (int q = 0; q < m; ++q) {
      double t = 0.0;
      for (int64_t bi = 0; bi < nb; ++bi) t += part[static_cast<size_t>(bi) * m + q];
      sums[q] = t;
    }
}

// majority = +1 where S(s) >= 0 (NaN: -1); a_q = sign(s_q) == majority; W_q = rD(w_q * a_q);
// out = rD(b + rD(S(rD(s_q W_q)) / clamp(S(W_q), rD(1e-6)))), S(.) a sum from +0 in C, model by model
// (torch's sum over dim 0), rounded once
template <typename F>
int sce_apply_impl(int64_t n, const SceInputs<F>& in, const double* w_, void* out_, int threads) {
  using C = typename F::C;
  auto* out = static_cast<typename F::S*>(out_);
  C w[kCombineMaxInputs];
  for (int q = 0; q < in.m; ++q) w[q] = F::round(static_cast<C>(w_[q]));
  const C lo = F::round(scalar<F>(1e-6));
  return blocks_over(n, threads, [&](int64_t i0, int64_t i1) {
    C s[kCombineMaxInputs][kSub], bval[kSub], maj[kSub], num[kSub], den[kSub];
    const int64_t len = i1 - i0;
    in.load(i0, len, s, bval);
    for (int64_t j = 0; j < len; ++j) {
      maj[j] = C(0);
      num[j] = C(0);
      den[j] = C(0);
    }
    for (int q = 0; q < in.m; ++q)
      for (int64_t j = 0; j < len; ++j) maj[j] += s[q][j];
    for (int64_t j = 0; j < len; ++j) maj[j] = F::round(maj[j]) >= C(0) ? C(1) : C(-1);
    for (int q = 0; q < in.m; ++q) {
      const C wq = w[q];
      for (int64_t j = 0; j < len; ++j) {
        const C sq = s[q][j];
        const C sign = sq > C(0) ? C(1) : (sq < C(0) ? C(-1) : C(0));
        const C W = F::round(wq * (sign == maj[j] ? C(1) : C(0)));
        num[j] += F::round(sq * W);
        den[j] += W;
      }
    }
    int64_t bad = 0;
    for (int64_t j = 0; j < len; ++j) {
      C d = F::round(den[j]);
      d = d < lo ? lo : d;  // clamp(min=1e-6): NaN stays
      const C v = F::round(bval[j] + F::round(F::round(num[j]) / d));
      out[i0 + j] = F::store(v);
      bad += !(v - v == C(0));
    }
    return bad;
  });
}

}  // namespace

int nearswap_cpu(int dtype, int64_t n, const void* base, const void* x, void* out, double t, int threads) {
  threads = default_threads(threads);
  int r = 1;
  by_format(dtype, "nearswap_cpu", [&](auto f) { r = nearswap_impl<decltype(f)>(n, base, x, out, t, threads); });
  return r;
}

int ram_cpu(int dtype, int64_t n, int64_t m, const void* base, const uint64_t* xs, void* out, double epsilon,
            int threads) {
  threads = default_threads(threads);
  int r = 1;
  by_format(dtype, "ram_cpu", [&](auto f) { r = ram_impl<decltype(f)>(n, m, base, xs, out, epsilon, threads); });
  return r;
}

int ramplus_tl_cpu(int dtype, int out_dtype, int64_t n, int64_t m, const void* base, const uint64_t* xs, void* out,
                   double r, double alpha, double epsilon, int threads) {
  threads = default_threads(threads);
  int ok = 1;
  by_format(dtype, "ramplus_tl_cpu", [&](auto f) {
    using F = decltype(f);
    if (out_dtype == dtype) {
      ok = ramplus_impl<F, F>(n, m, base, xs, out, r, alpha, epsilon, threads);
    } else if constexpr (std::is_same_v<typename F::C, float>) {
      if (out_dtype != kF32)
        throw std::invalid_argument("ramplus_tl_cpu: output dtype tag " + std::to_string(out_dtype) +
                                    " for input dtype tag " + std::to_string(dtype));
      ok = ramplus_impl<F, FmtF32>(n, m, base, xs, out, r, alpha, epsilon, threads);
    } else {
      throw std::invalid_argument("ramplus_tl_cpu: output dtype tag " + std::to_string(out_dtype) +
                                  " for input dtype tag " + std::to_string(dtype));
    }
  });
  return ok;
}

void sce_squares_cpu(int dtype, int64_t n, int64_t m, const void* base, const uint64_t* xs, const uint64_t* keep,
                     void* out, double* sums, int threads) {
  threads = default_threads(threads);
  by_format(dtype, "sce_squares_cpu", [&](auto f) {
    using F = decltype(f);
    sce_squares_impl<F>(n, SceInputs<F>(m, base, xs, keep, "sce_squares_cpu"), out, sums, threads);
  });
}

int sce_apply_cpu(int dtype, int64_t n, int64_t m, const void* base, const uint64_t* xs, const uint64_t* keep,
                  const double* w, void* out, int threads) {
  threads = default_threads(threads);
  int r = 1;
  by_format(dtype, "sce_apply_cpu", [&](auto f) {
    using F = decltype(f);
    r = sce_apply_impl<F>(n, SceInputs<F>(m, base, xs, keep, "sce_apply_cpu"), w, out, threads);
  });
  return r;
}

}  // namespace mkf::MKF_ISA_NS

#if MKF_ISA_PRIMARY
namespace mkf {

int nearswap_cpu(int dtype, int64_t n, const void* base, const void* x, void* out, double t, int threads) {
  MKF_CPU_DISPATCH(nearswap_cpu, dtype, n, base, x, out, t, threads);
}

int ram_cpu(int dtype, int64_t n, int64_t m, const void* base, const uint64_t* xs, void* out, double epsilon,
            int threads) {
  MKF_CPU_DISPATCH(ram_cpu, dtype, n, m, base, xs, out, epsilon, threads);
}

int ramplus_tl_cpu(int dtype, int out_dtype, int64_t n, int64_t m, const void* base, const uint64_t* xs, void* out,
                   double r, double alpha, double epsilon, int threads) {
  MKF_CPU_DISPATCH(ramplus_tl_cpu, dtype, out_dtype, n, m, base, xs, out, r, alpha, epsilon, threads);
}

void sce_squares_cpu(int dtype, int64_t n, int64_t m, const void* base, const uint64_t* xs, const uint64_t* keep,
                     void* out, double* sums, int threads) {
  MKF_CPU_DISPATCH(sce_squares_cpu, dtype, n, m, base, xs, keep, out, sums, threads);
}

int sce_apply_cpu(int dtype, int64_t n, int64_t m, const void* base, const uint64_t* xs, const uint64_t* keep,
                  const double* w, void* out, int threads) {
  MKF_CPU_DISPATCH(sce_apply_cpu, dtype, n, m, base, xs, keep, w, out, threads);
}

}  // namespace mkf
#endif
