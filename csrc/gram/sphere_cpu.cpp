// The hypersphere methods' elementwise passes on the CPU (gram/gram.h): multislerp's and karcher's
// reference ops (mergekit_fast/methods/multislerp.py, karcher.py) between their reductions, op by op
// in the 16-bit input dtype
// (common/rounding.h), multi-threaded over blocks. The reductions (the norms and the dot products)
// stay torch's, on the very tensors these passes write, so the result is mergekit's bit for bit:
// torch sums a long bf16 vector in an order no exact sum reproduces (methods/nuslerp.py).
//
// Tensors are n rows of numel elements ([n, numel], row-major) or single vectors of numel; scalars
// arrive as doubles holding values of the dtype. The sums over the models (`.sum(0)` of a [n, numel]
// 16-bit tensor) add in fp32 from +0, model by model, and round once, as torch does for 16-bit
// tensors (tests/test_methods_pointwise.py measures that order).
//
// A kernel file (common/cpu_isa.h): compiled once per CPU instruction-set level.
#pragma GCC optimize("no-ipa-cp-clone", "no-trapping-math")  // see combine/pointwise_cpu.cpp
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/dtype.h"
#include "common/parallel.h"
#include "common/rounding.h"
#include "gram/gram.h"

namespace mkf::MKF_ISA_NS {
namespace {

constexpr int64_t kBlock = 1 << 14;  // elements per parallel task
constexpr int64_t kParallelMin = 1 << 18;
constexpr int kMaxModels = 16;  // torch's sequential order over dim 0 holds up to 16 rows

template <typename F, typename Body>
void over_blocks(int64_t numel, int threads, Body&& body) {
  const int64_t nb = (numel + kBlock - 1) / kBlock;
  parallel_for(nb, numel >= kParallelMin ? threads : 1, [&](int64_t b0, int64_t b1) {
    body(b0 * kBlock, std::min(numel, b1 * kBlock));
  });
}

// Pass 0: V[i] = R(x_i - base), or the models as they are (no base).
template <typename F>
void deltas(int n, int64_t numel, const uint64_t* p, int threads) {
  using S = typename F::S;
  const S* b = reinterpret_cast<const S*>(p[n]);
  S* v = reinterpret_cast<S*>(p[n + 1]);
  over_blocks<F>(numel, threads, [&](int64_t lo, int64_t hi) {
    for (int q = 0; q < n; ++q) {
      const S* x = reinterpret_cast<const S*>(p[q]);
      S* vq = v + q * numel;
      if (b) {
        for (int64_t j = lo; j < hi; ++j) vq[j] = F::store(F::load(x[j]) - F::load(b[j]));
      } else {
        std::copy(x + lo, x + hi, vq + lo);
      }
    }
  });
}

// out[j] = R(sum_i R(term(i, j) w_i)) for j in [lo, hi): a sum over the models as torch's `.sum(0)`
// of a 16-bit [n, numel] tensor adds it (fp32 from +0, model by model, one rounding).
template <typename F, typename Term>
void weighted_sum(int n, int64_t lo, int64_t hi, const typename F::C* w, typename F::S* out, Term&& term) {
  using C = typename F::C;
  constexpr int64_t kSub = 512;
  C acc[kSub];
  for (int64_t b0 = lo; b0 < hi; b0 += kSub) {
    const int64_t len = std::min(kSub, hi - b0);
    for (int64_t j = 0; j < len; ++j) acc[j] = C(0);
    for (int q = 0; q < n; ++q) {
      const C wq = w[q];
      for (int64_t j = 0; j < len; ++j) acc[j] += F::round(term(q, b0 + j) * wq);
    }
    for (int64_t j = 0; j < len; ++j) out[b0 + j] = F::store(acc[j]);
  }
}

// Pass 1: U[i] = R(V[i] / den_i); M = R(sum_i R(U[i] w_i)).
template <typename F>
void units(int n, int64_t numel, const uint64_t* p, const double* s, int threads) {
  using S = typename F::S;
  using C = typename F::C;
  const S* v = reinterpret_cast<const S*>(p[0]);
  S* u = reinterpret_cast<S*>(p[1]);
  S* m = reinterpret_cast<S*>(p[2]);
  C den[kMaxModels], w[kMaxModels];
  for (int q = 0; q < n; ++q) den[q] = static_cast<C>(s[q]), w[q] = static_cast<C>(s[n + q]);
  over_blocks<F>(numel, threads, [&](int64_t lo, int64_t hi) {
    weighted_sum<F>(n, lo, hi, w, m, [&](int q, int64_t i) {
      const C x = F::round(F::load(v[q * numel + i]) / den[q]);
      u[q * numel + i] = F::store(x);
      return x;
    });
  });
}

// Pass 2: M = R(M / mean_norm) in place; P[i] = R(U[i] M).
template <typename F>
void products(int n, int64_t numel, const uint64_t* p, const double* s, int threads) {
  using S = typename F::S;
  using C = typename F::C;
  const S* u = reinterpret_cast<const S*>(p[0]);
  S* m = reinterpret_cast<S*>(p[1]);
  S* out = reinterpret_cast<S*>(p[2]);
  const C mn = static_cast<C>(s[0]);
  over_blocks<F>(numel, threads, [&](int64_t lo, int64_t hi) {
    for (int64_t j = lo; j < hi; ++j) m[j] = F::store(F::load(m[j]) / mn);
    for (int q = 0; q < n; ++q) {
      const S* uq = u + q * numel;
      S* oq = out + q * numel;
      for (int64_t j = lo; j < hi; ++j) oq[j] = F::store(F::load(uq[j]) * F::load(m[j]));
    }
  });
}

// Pass 3: the step R(sum_i R(R(U[i] - R(dot_i M)) w_i)).
template <typename F>
void step(int n, int64_t numel, const uint64_t* p, const double* s, int threads) {
  using S = typename F::S;
  using C = typename F::C;
  const S* u = reinterpret_cast<const S*>(p[0]);
  const S* m = reinterpret_cast<const S*>(p[1]);
  S* out = reinterpret_cast<S*>(p[2]);
  C dot[kMaxModels], w[kMaxModels];
  for (int q = 0; q < n; ++q) dot[q] = static_cast<C>(s[q]), w[q] = static_cast<C>(s[n + q]);
  over_blocks<F>(numel, threads, [&](int64_t lo, int64_t hi) {
    weighted_sum<F>(n, lo, hi, w, out, [&](int q, int64_t i) {
      return F::round(F::load(u[q * numel + i]) - F::round(dot[q] * F::load(m[i])));
    });
  });
}

// Pass 4: out = R(R(R(R(M c) + R(step k)) scale) + base), the base term only with a base.
// Returns how many outputs are not finite.
template <typename F>
int64_t finish(int64_t numel, const uint64_t* p, const double* s, int threads) {
  using S = typename F::S;
  using C = typename F::C;
  const S* m = reinterpret_cast<const S*>(p[0]);
  const S* st = reinterpret_cast<const S*>(p[1]);
  const S* b = reinterpret_cast<const S*>(p[2]);
  S* out = reinterpret_cast<S*>(p[3]);
  const C c = static_cast<C>(s[0]), k = static_cast<C>(s[1]), scale = static_cast<C>(s[2]);
  std::atomic<int64_t> bad{0};
  over_blocks<F>(numel, threads, [&](int64_t lo, int64_t hi) {
    int64_t local = 0;
    for (int64_t j = lo; j < hi; ++j) {
      C r = F::round(F::round(F::round(F::load(m[j]) * c) + F::round(F::load(st[j]) * k)) * scale);
      if (b) r = F::round(r + F::load(b[j]));
      out[j] = F::store(r);
      local += !(r - r == C(0));
    }
    bad += local;
  });
  return bad.load();
}

template <typename F>
int64_t run(int pass, int n, int64_t numel, const uint64_t* p, const double* s, int threads) {
  switch (pass) {
    case 0: deltas<F>(n, numel, p, threads); return 0;
    case 1: units<F>(n, numel, p, s, threads); return 0;
    case 2: products<F>(n, numel, p, s, threads); return 0;
    case 3: step<F>(n, numel, p, s, threads); return 0;
    case 4: return finish<F>(numel, p, s, threads);
    default: throw std::invalid_argument("multislerp_pass_cpu: no pass " + std::to_string(pass));
  }
}

// karcher (karcher_mean in methods/karcher.py), pass by pass; xs/us are tables of n addresses:
//   0 units: us[i] = R(xs[i] / norm_i), zeros where norm_i is 0 (ptrs xs, us; scalars the norms)
//   1 mean:  out = the sequential R(acc + R(a_i us[i])) from zeros (ptrs us, out; scalars a_i)
//   2 scale: io = R(io / s) in place (ptrs io; scalar s)
//   3 step:  out = the sequential R(acc + R(k_i R(us[i] - R(c_i m)))) from zeros (ptrs us, m, out;
//            scalars k_i, then c_i)
//   4 exp:   m = R(R(R(cs) m) + R(R(sn) R(step / len))) in place (ptrs m, step; scalars cs, sn, len)
//   5 times: out = R(R(s) m) (ptrs m, out; scalar s); returns how many outputs are not finite
// (torch casts a 0-d tensor of another dtype to the tensor's dtype where it is the first operand of
// a product, and takes its own value where it divides: the R(cs), R(sn) and R(s) above.)
template <typename F>
int64_t karcher(int pass, int n, int64_t numel, const uint64_t* p, const double* s, int threads) {
  using S = typename F::S;
  using C = typename F::C;
  auto in = [&](int i) { return reinterpret_cast<const S*>(p[i]); };
  auto io = [&](int i) { return reinterpret_cast<S*>(p[i]); };
  std::atomic<int64_t> bad{0};
  over_blocks<F>(numel, threads, [&](int64_t lo, int64_t hi) {
    if (pass == 0) {
      for (int q = 0; q < n; ++q) {
        const S* x = in(q);
        S* u = io(n + q);
        const C nrm = static_cast<C>(s[q]);
        if (s[q] == 0.0) {
          std::fill(u + lo, u + hi, F::store(C(0)));
        } else {
          for (int64_t j = lo; j < hi; ++j) u[j] = F::store(F::load(x[j]) / nrm);
        }
      }
    } else if (pass == 1 || pass == 3) {
      constexpr int64_t kSub = 512;
      C acc[kSub];
      const S* m = pass == 3 ? in(n) : nullptr;
      S* out = io(pass == 3 ? n + 1 : n);
      for (int64_t b0 = lo; b0 < hi; b0 += kSub) {
        const int64_t len = std::min(kSub, hi - b0);
        for (int64_t j = 0; j < len; ++j) acc[j] = C(0);
        for (int q = 0; q < n; ++q) {
          const S* u = in(q) + b0;
          const C a = static_cast<C>(s[q]);
          if (pass == 1) {
            for (int64_t j = 0; j < len; ++j) acc[j] = F::round(acc[j] + F::round(a * F::load(u[j])));
          } else {
            const C c = static_cast<C>(s[n + q]);
            for (int64_t j = 0; j < len; ++j) {
              const C t = F::round(F::load(u[j]) - F::round(c * F::load(m[b0 + j])));
              acc[j] = F::round(acc[j] + F::round(a * t));
            }
          }
        }
        for (int64_t j = 0; j < len; ++j) out[b0 + j] = F::store(acc[j]);
      }
    } else if (pass == 2) {
      S* x = io(0);
      const C d = static_cast<C>(s[0]);
      for (int64_t j = lo; j < hi; ++j) x[j] = F::store(F::load(x[j]) / d);
    } else if (pass == 4) {
      S* m = io(0);
      const S* st = in(1);
      // a 0-d fp32 tensor as the first operand (`cos(len) * m`) is cast to the dtype first; as the
      // divisor (`step / len`) it enters with its fp32 value
      const C cs = F::round(static_cast<C>(s[0])), sn = F::round(static_cast<C>(s[1]));
      const C len = static_cast<C>(s[2]);
      for (int64_t j = lo; j < hi; ++j)
        m[j] = F::store(F::round(cs * F::load(m[j])) + F::round(sn * F::round(F::load(st[j]) / len)));
    } else {
      const S* m = in(0);
      S* out = io(1);
      const C k = F::round(static_cast<C>(s[0]));  // `scale * m`: the fp32 0-d scale cast to the dtype
      int64_t local = 0;
      for (int64_t j = lo; j < hi; ++j) {
        const C r = F::round(k * F::load(m[j]));
        out[j] = F::store(r);
        local += !(r - r == C(0));
      }
      bad += local;
    }
  });
  return bad.load();
}

}  // namespace

int64_t karcher_pass_cpu(int dtype, int pass, int64_t n, int64_t numel, const uint64_t* ptrs, const double* scalars,
                         int threads) {
  if (pass < 0 || pass > 5) throw std::invalid_argument("karcher_pass_cpu: no pass " + std::to_string(pass));
  if (n < 0 || n > 64) throw std::invalid_argument("karcher_pass_cpu: 0 to 64 tensors, got " + std::to_string(n));
  if (numel <= 0) return 0;
  threads = default_threads(threads);
  const int m = static_cast<int>(n);
  switch (dtype) {
    case kBF16: return karcher<FmtBF16>(pass, m, numel, ptrs, scalars, threads);
    case kF16: return karcher<FmtF16>(pass, m, numel, ptrs, scalars, threads);
    default:
      throw std::invalid_argument("karcher_pass_cpu: bf16 or fp16 only, got dtype tag " + std::to_string(dtype));
  }
}

int64_t multislerp_pass_cpu(int dtype, int pass, int64_t n, int64_t numel, const uint64_t* ptrs,
                            const double* scalars, int threads) {
  if (n < 1 || n > kMaxModels)
    throw std::invalid_argument("multislerp_pass_cpu: 1 to 16 models, got " + std::to_string(n));
  if (numel <= 0) return 0;
  threads = default_threads(threads);
  const int m = static_cast<int>(n);
  switch (dtype) {
    case kBF16: return run<FmtBF16>(pass, m, numel, ptrs, scalars, threads);
    case kF16: return run<FmtF16>(pass, m, numel, ptrs, scalars, threads);
    default:
      throw std::invalid_argument("multislerp_pass_cpu: bf16 or fp16 only, got dtype tag " + std::to_string(dtype));
  }
}

}  // namespace mkf::MKF_ISA_NS

#if MKF_ISA_PRIMARY
namespace mkf {

int64_t karcher_pass_cpu(int dtype, int pass, int64_t n, int64_t numel, const uint64_t* ptrs, const double* scalars,
                         int threads) {
  MKF_CPU_DISPATCH(karcher_pass_cpu, dtype, pass, n, numel, ptrs, scalars, threads);
}

int64_t multislerp_pass_cpu(int dtype, int pass, int64_t n, int64_t numel, const uint64_t* ptrs,
                            const double* scalars, int threads) {
  MKF_CPU_DISPATCH(multislerp_pass_cpu, dtype, pass, n, numel, ptrs, scalars, threads);
}

}  // namespace mkf
#endif
