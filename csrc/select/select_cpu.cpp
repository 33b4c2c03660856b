// The select op on the CPU (select/select.h): radix histograms of the magnitude keys (parallel),
// then, only where equal keys straddle a cut, an introselect that reproduces libstdc++'s
// introsort on (key, index) pairs exactly at the cuts.
//
// A kernel file (common/cpu_isa.h): compiled once per CPU instruction-set level.
#include "select/select.h"

#include <algorithm>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "common/dtype.h"
#include "common/parallel.h"
#include "common/ta_math.h"

namespace mkf::MKF_ISA_NS {
namespace {

#include "common/host_formats.h"

constexpr int64_t kParallelMin = 1 << 18;
constexpr int64_t kInsertion = 16;  // libstdc++'s _S_threshold

template <typename F>
inline uint32_t key_at(const typename F::storage* x, const typename F::storage* b, int64_t j) {
  using A = typename F::A;
  A d = F::round(static_cast<A>(F::load(x[j])) - static_cast<A>(F::load(b[j])));
  return ta_key(d < A(0) ? -d : d);
}

// Counts of keys by their high 16 bits (level 0), or by their low 16 bits among keys whose high
// bits are `prefix` (level 1). Plain arrays, zeroed here: std::vector's fill members called with a
// constant size get constant-propagated clones that are local to one level's object, which
// tests/test_build.py rightly refuses outside the level namespaces.
constexpr int64_t kBins = 1 << 16;
using Hist = std::unique_ptr<int64_t[]>;

inline Hist new_hist() {
  Hist h(new int64_t[kBins]);
  for (int64_t i = 0; i < kBins; ++i) h[i] = 0;
  return h;
}

template <typename F>
Hist histogram(const typename F::storage* x, const typename F::storage* b, int64_t n, int level,
               uint32_t prefix, int threads) {
  int64_t nchunks = std::max<int64_t>(1, std::min<int64_t>(threads, n / kParallelMin + 1));
  std::unique_ptr<Hist[]> parts(new Hist[nchunks]);
  int64_t step = (n + nchunks - 1) / nchunks;
  parallel_for(nchunks, static_cast<int>(nchunks), [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      Hist h = new_hist();
      int64_t s = c * step, e = std::min(n, s + step);
      if (level == 0) {
        for (int64_t j = s; j < e; ++j) ++h[key_at<F>(x, b, j) >> 16];
      } else {
        for (int64_t j = s; j < e; ++j) {
          uint32_t k = key_at<F>(x, b, j);
          if ((k >> 16) == prefix) ++h[k & 0xffffu];
        }
      }
      parts[c] = std::move(h);
    }
  });
  Hist total = new_hist();
  for (int64_t c = 0; c < nchunks; ++c)
    if (parts[c])
      for (int64_t i = 0; i < kBins; ++i) total[i] += parts[c][i];
  return total;
}

struct Rank {
  uint32_t key;   // the key at ascending position r
  int64_t lt, le;  // keys below it, keys not above it
};

// The key at ascending position r (0 <= r < n).
template <typename F>
Rank rank_key(const typename F::storage* x, const typename F::storage* b, int64_t n, int64_t r,
              const Hist& hist0, bool low_bits_zero, int threads) {
  int64_t below = 0;
  uint32_t hi = 0;
  for (; hi < (1u << 16); ++hi) {
    if (below + hist0[hi] > r) break;
    below += hist0[hi];
  }
  if (low_bits_zero) return Rank{hi << 16, below, below + hist0[hi]};
  Hist h1 = histogram<F>(x, b, n, 1, hi, threads);
  uint32_t lo = 0;
  for (; lo < (1u << 16); ++lo) {
    if (below + h1[lo] > r) break;
    below += h1[lo];
  }
  return Rank{(hi << 16) | lo, below, below + h1[lo]};
}

struct KI {
  uint32_t key;
  uint32_t idx;
};

// std::sort's comparator on the pairs: descending (NaN keys first, as they are the largest) or
// ascending; the index never takes part (torch's comparators look at the value only).
template <bool Desc>
inline bool comp(const KI& a, const KI& b) {
  return Desc ? a.key > b.key : a.key < b.key;
}

template <bool Desc>
void insertion_sort(KI* f, KI* e) {  // stable, as libstdc++'s __insertion_sort
  for (KI* i = f + 1; i < e; ++i) {
    KI v = *i;
    KI* j = i;
    while (j > f && comp<Desc>(v, *(j - 1))) {
      *j = *(j - 1);
      --j;
    }
    *j = v;
  }
}

// libstdc++'s introsort loop, followed only into the ranges that hold a cut strictly inside.
template <bool Desc>
void introselect(KI* a, int64_t n, const std::vector<int64_t>& cuts) {
  auto inside = [&](int64_t f, int64_t e) {
    for (int64_t c : cuts)
      if (f < c && c < e) return true;
    return false;
  };
  if (!inside(0, n)) return;
  int64_t lg = 0;
  while ((int64_t{1} << (lg + 1)) <= n) ++lg;
  struct Work {
    int64_t f, e, depth;
  };
  std::vector<Work> stack{{0, n, 2 * lg}};
  while (!stack.empty()) {
    Work w = stack.back();
    stack.pop_back();
    int64_t f = w.f, e = w.e, depth = w.depth;
    while (true) {
      if (e - f <= kInsertion) {
        insertion_sort<Desc>(a + f, a + e);
        break;
      }
      if (depth == 0) {  // std::__partial_sort(first, last, last): heapsort, as introsort does
        std::partial_sort(a + f, a + e, a + e, comp<Desc>);
        break;
      }
      --depth;
      // __move_median_to_first(first, first + 1, mid, last - 1)
      KI* first = a + f;
      KI* pa = a + f + 1;
      KI* pb = a + f + (e - f) / 2;
      KI* pc = a + e - 1;
      KI* m;
      if (comp<Desc>(*pa, *pb)) {
        m = comp<Desc>(*pb, *pc) ? pb : (comp<Desc>(*pa, *pc) ? pc : pa);
      } else if (comp<Desc>(*pa, *pc)) {
        m = pa;
      } else if (comp<Desc>(*pb, *pc)) {
        m = pc;
      } else {
        m = pb;
      }
      std::swap(*first, *m);
      // __unguarded_partition(first + 1, last, first)
      const KI pivot = *first;
      KI* lo = a + f + 1;
      KI* hi = a + e;
      while (true) {
        while (comp<Desc>(*lo, pivot)) ++lo;
        --hi;
        while (comp<Desc>(pivot, *hi)) --hi;
        if (!(lo < hi)) break;
        std::swap(*lo, *hi);
        ++lo;
      }
      int64_t cut = lo - a;
      bool right = inside(cut, e), left = inside(f, cut);
      if (right && left) {
        stack.push_back({cut, e, depth});
        e = cut;
      } else if (right) {
        f = cut;
      } else if (left) {
        e = cut;
      } else {
        break;
      }
    }
  }
}

template <typename F>
int64_t select_impl(int64_t n, const void* base_, int64_t count, const uint64_t* xs,
                    const int32_t* modes, const int64_t* as, const int64_t* bs, uint32_t* rules,
                    uint64_t* bitmaps, int threads) {
  using S = typename F::storage;
  if (n >= (int64_t{1} << 31)) return -1;
  auto base = static_cast<const S*>(base_);
  const int64_t words = (n + 63) / 64;
  const bool low_zero = std::is_same_v<F, HostBF16>;
  int64_t used = 0;
  std::vector<int64_t> need;  // inputs whose cuts are straddled by ties
  std::vector<std::vector<int64_t>> cuts(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) {
    auto x = reinterpret_cast<const S*>(xs[i]);
    uint32_t* rule = rules + 3 * i;
    bool top = modes[i] == kSelectTop;
    int64_t lo_pos, hi_pos;  // ascending positions of the kept range [lo_pos, hi_pos)
    if (top) {
      int64_t k = std::min(std::max<int64_t>(as[i], 0), n);
      lo_pos = n - k;
      hi_pos = n;
    } else {
      lo_pos = std::max<int64_t>(as[i], 0);
      hi_pos = std::min(bs[i], n);
    }
    if (hi_pos <= lo_pos) {  // nothing kept
      rule[0] = rule[1] = 0xffffffffu;
      rule[2] = 0;
      continue;
    }
    if (lo_pos == 0 && hi_pos == n) {  // everything kept
      rule[0] = 0;
      rule[1] = 0xffffffffu;
      rule[2] = kLoAll | kHiAll;
      continue;
    }
    Hist h0 = histogram<F>(x, base, n, 0, 0, threads);
    Rank lo = rank_key<F>(x, base, n, lo_pos, h0, low_zero, threads);
    Rank hi = top ? Rank{0xffffffffu, n, n} : rank_key<F>(x, base, n, hi_pos - 1, h0, low_zero, threads);
    rule[0] = lo.key;
    rule[1] = hi.key;
    bool lo_clean = lo_pos == 0 || lo.lt == lo_pos;
    bool hi_clean = hi_pos == n || hi.le == hi_pos;
    if (lo_clean && hi_clean) {
      rule[2] = kLoAll | kHiAll;
      continue;
    }
    rule[2] = 0;
    // positions in the sort's own order: descending for the top-k, ascending for the range
    if (top) {
      cuts[i] = {n - lo_pos};
    } else {
      if (lo_pos > 0) cuts[i].push_back(lo_pos);
      if (hi_pos < n) cuts[i].push_back(hi_pos);
    }
    need.push_back(i);
    used |= int64_t{1} << i;
  }
  if (need.empty()) return used;
  // one thread per straddled input (each holds n pairs), the pairs built in parallel
  int64_t conc = std::max<int64_t>(1, std::min<int64_t>(threads, static_cast<int64_t>(need.size())));
  for (size_t g = 0; g < need.size(); g += static_cast<size_t>(conc)) {
    size_t ge = std::min(need.size(), g + static_cast<size_t>(conc));
    std::vector<std::vector<KI>> pairs(ge - g);
    for (size_t q = g; q < ge; ++q) {
      int64_t i = need[q];
      auto x = reinterpret_cast<const S*>(xs[i]);
      auto& p = pairs[q - g];
      p.resize(static_cast<size_t>(n));
      int64_t nb = (n + (1 << 16) - 1) >> 16;
      parallel_for(nb, n >= kParallelMin ? threads : 1, [&](int64_t lo, int64_t hi) {
        for (int64_t j = lo << 16, e = std::min(n, hi << 16); j < e; ++j)
          p[j] = KI{key_at<F>(x, base, j), static_cast<uint32_t>(j)};
      });
    }
    parallel_for(static_cast<int64_t>(ge - g), static_cast<int>(ge - g), [&](int64_t lo, int64_t hi) {
      for (int64_t q = lo; q < hi; ++q) {
        int64_t i = need[g + q];
        auto& p = pairs[q];
        bool top = modes[i] == kSelectTop;
        if (top)
          introselect<true>(p.data(), n, cuts[i]);
        else
          introselect<false>(p.data(), n, cuts[i]);
        int64_t a, e;  // the kept positions, in the sort's order
        if (top) {
          a = 0;
          e = cuts[i][0];
        } else {
          a = std::max<int64_t>(as[i], 0);
          e = std::min(bs[i], n);
        }
        uint64_t* bm = bitmaps + i * words;
        std::fill(bm, bm + words, uint64_t{0});
        uint32_t klo = rules[3 * i], khi = rules[3 * i + 1];
        for (int64_t s = a; s < e; ++s) {
          uint32_t k = p[s].key;
          if (k == klo || k == khi) bm[p[s].idx >> 6] |= uint64_t{1} << (p[s].idx & 63);
        }
        std::vector<KI>().swap(p);
      }
    });
  }
  return used;
}

}  // namespace

int64_t ta_select_cpu(int dtype, int64_t n, const void* base, int64_t count, const uint64_t* xs,
                      const int32_t* modes, const int64_t* as, const int64_t* bs, uint32_t* rules,
                      uint64_t* bitmaps, int threads) {
  if (count > 62) throw std::invalid_argument("ta_select_cpu: at most 62 inputs");
  threads = default_threads(threads);
  int64_t r = 0;
  host_by_dtype(dtype, "ta_select_cpu", [&](auto f) {
    r = select_impl<decltype(f)>(n, base, count, xs, modes, as, bs, rules, bitmaps, threads);
  });
  return r;
}

}  // namespace mkf::MKF_ISA_NS

#if MKF_ISA_PRIMARY
namespace mkf {

int64_t ta_select_cpu(int dtype, int64_t n, const void* base, int64_t count, const uint64_t* xs,
                      const int32_t* modes, const int64_t* as, const int64_t* bs, uint32_t* rules,
                      uint64_t* bitmaps, int threads) {
  MKF_CPU_DISPATCH(ta_select_cpu, dtype, n, base, count, xs, modes, as, bs, rules, bitmaps, threads);
}

}  // namespace mkf
#endif
