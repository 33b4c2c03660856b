// The select op on the CPU (select/select.h): radix histograms of the magnitude keys (parallel),
// then, only where equal keys straddle a cut, an introselect that reproduces libstdc++'s
// introsort on torch's (key, index) pairs exactly at the cuts (one 32-bit word per element: Words).
//
// A kernel file (common/cpu_isa.h): compiled once per CPU instruction-set level.
#include "select/select.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
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

constexpr int64_t kParallelMin = 1 << 18;
constexpr int64_t kInsertion = 16;  // libstdc++'s _S_threshold

template <typename F>
inline uint32_t key_at(const typename F::storage* x, const typename F::storage* b, int64_t j) {
  using A = typename F::A;
  A d = F::round(static_cast<A>(F::load(x[j])) - static_cast<A>(F::load(b[j])));
  return ta_key(d < A(0) ? -d : d);
}

// The magnitude keys of elements [j0, j0 + m) into k (a loop the compiler vectorises).
template <typename F>
inline void keys_block(const typename F::storage* x, const typename F::storage* b, int64_t j0, int64_t m,
                       uint32_t* k) {
  for (int64_t t = 0; t < m; ++t) k[t] = key_at<F>(x, b, j0 + t);
}

constexpr int64_t kKeyBlock = 4096;

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
    std::unique_ptr<uint32_t[]> k(new uint32_t[kKeyBlock]);
    for (int64_t c = lo; c < hi; ++c) {
      Hist h = new_hist();
      for (int64_t s = c * step, e = std::min(n, s + step); s < e; s += kKeyBlock) {
        const int64_t m = std::min(kKeyBlock, e - s);
        keys_block<F>(x, b, s, m, k.get());
        if (level == 0) {
          for (int64_t t = 0; t < m; ++t) ++h[k[t] >> 16];
        } else {
          for (int64_t t = 0; t < m; ++t)
            if ((k[t] >> 16) == prefix) ++h[k[t] & 0xffffu];
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

// The bin that holds ascending position r; `below` (the count before the histogram's first bin) grows
// by the counts of the bins before it.
inline uint32_t bin_of(const Hist& h, int64_t r, int64_t& below) {
  uint32_t i = 0;
  for (; i < (1u << 16); ++i) {
    if (below + h[i] > r) break;
    below += h[i];
  }
  return i;
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
  const uint32_t hi = bin_of(hist0, r, below);
  if (low_bits_zero) return Rank{hi << 16, below, below + hist0[hi]};
  Hist h1 = histogram<F>(x, b, n, 1, hi, threads);
  const uint32_t lo = bin_of(h1, r, below);
  return Rank{(hi << 16) | lo, below, below + h1[lo]};
}

// The sort's elements as one 32-bit word each. Keys never have bit 31 set (kNanKey is the largest),
// so a word below 2^31 is an element's key, and only the elements whose key equals one of the two
// cut keys (the tie groups) carry who they are: 2^31 | o, o an ordinal into a table of their indices
// (ordinals [0, nlo) have key klo, the rest khi). The sort looks at the keys only, so it moves these
// words exactly as it would move (key, index) pairs, at half the memory.
struct Words {
  uint32_t klo, khi, nlo;
  MKF_HD uint32_t key(uint32_t w) const {
    const uint32_t tie = (w & 0x7fffffffu) < nlo ? klo : khi;
    return (w >> 31) != 0 ? tie : w;
  }
};

// std::sort's comparator: descending (NaN keys first, as they are the largest) or ascending; the
// index never takes part (torch's comparators look at the value only).
template <bool Desc>
inline bool comp_key(uint32_t a, uint32_t b) {
  return Desc ? a > b : a < b;
}

// The sort below runs on elements of any type T whose key(T) is the 32-bit key: select's Words, or
// della's (key << 32 | index) pairs.
template <bool Desc, typename T, typename Key>
void insertion_sort(const Key& key, T* f, T* e) {  // stable, as libstdc++'s __insertion_sort
  for (T* i = f + 1; i < e; ++i) {
    const T v = *i;
    const uint32_t kv = key(v);
    T* j = i;
    while (j > f && comp_key<Desc>(kv, key(*(j - 1)))) {
      *j = *(j - 1);
      --j;
    }
    *j = v;
  }
}

// libstdc++'s __unguarded_partition(first + 1, last, first) on a[f..e), the pivot at a[f]: the same
// swaps, so the same permutation, as its scalar loop, with the scans done a block at a time without
// data-dependent branches (as BlockQuicksort, Edelkamp and Weiss 2016, does). Hoare's loop swaps the
// i-th element from the left that does not sort before the pivot (a "left stop") with the i-th from
// the right that the pivot does not sort before (a "right stop"), for as long as the left one lies
// before the right one. While the unscanned middle holds a whole block, every left stop found lies
// before every right stop found, so the pairs of the blocks' stops are exactly Hoare's next swaps.
// The last stretch runs the scalar loop from the state Hoare's loop has after the same swaps (stops
// found but not yet paired are unswapped, so the scalar scans find them again). Returns the cut.
template <bool Desc, typename T, typename Key>
int64_t unguarded_partition(const Key& key, T* a, int64_t f, int64_t e) {
  // The block: about a sixteenth of the range, 8 to 256 elements, so that the scalar tail stays a
  // small part of every level (the swaps do not depend on it).
  constexpr int kBMax = 256;
  int kB = 8;
  while (kB < kBMax && 16 * static_cast<int64_t>(kB) < e - f) kB *= 2;
  const uint32_t pk = key(a[f]);
  uint16_t offl[kBMax], offr[kBMax];
  int64_t ls = f + 1, rs = e;  // the unscanned stretch [ls, rs)
  int64_t lbase = 0, rbase = 0;
  int nl = 0, nr = 0, sl = 0, sr = 0;  // stops found in the current blocks, and those used
  int64_t lo = f + 1, hi = e;          // Hoare's state after the swaps done so far
  while (true) {
    if (sl == nl) {
      if (rs - ls < kB) break;
      lbase = ls;
      nl = sl = 0;
      for (int t = 0; t < kB; ++t) {
        offl[nl] = static_cast<uint16_t>(t);
        nl += !comp_key<Desc>(key(a[ls + t]), pk);
      }
      ls += kB;
    }
    if (sr == nr) {
      if (rs - ls < kB) break;
      rbase = rs - 1;
      nr = sr = 0;
      for (int t = 0; t < kB; ++t) {
        offr[nr] = static_cast<uint16_t>(t);
        nr += !comp_key<Desc>(pk, key(a[rbase - t]));
      }
      rs -= kB;
    }
    const int q = std::min(nl - sl, nr - sr);
    for (int u = 0; u < q; ++u) std::swap(a[lbase + offl[sl + u]], a[rbase - offr[sr + u]]);
    if (q > 0) {
      lo = lbase + offl[sl + q - 1] + 1;
      hi = rbase - offr[sr + q - 1];
    }
    sl += q;
    sr += q;
  }
  // the scalar loop (the pivot at a[f] and the median-of-three bound both scans, as in libstdc++)
  while (true) {
    while (comp_key<Desc>(key(a[lo]), pk)) ++lo;
    --hi;
    while (comp_key<Desc>(pk, key(a[hi]))) --hi;
    if (!(lo < hi)) return lo;
    std::swap(a[lo], a[hi]);
    ++lo;
  }
}

// libstdc++'s __unguarded_partition_pivot on a[f..e): the median of a[f + 1], the middle and a[e - 1]
// moved to a[f] (__move_median_to_first), then the partition around it. Returns the cut.
template <bool Desc, typename T, typename Key>
int64_t partition_pivot(const Key& key, T* a, int64_t f, int64_t e) {
  auto comp = [&key](T x, T y) { return comp_key<Desc>(key(x), key(y)); };
  T* pa = a + f + 1;
  T* pb = a + f + (e - f) / 2;
  T* pc = a + e - 1;
  T* m;
  if (comp(*pa, *pb)) {
    m = comp(*pb, *pc) ? pb : (comp(*pa, *pc) ? pc : pa);
  } else if (comp(*pa, *pc)) {
    m = pa;
  } else if (comp(*pb, *pc)) {
    m = pc;
  } else {
    m = pb;
  }
  std::swap(a[f], *m);
  return unguarded_partition<Desc>(key, a, f, e);
}

// libstdc++'s std::sort (introsort loop, then insertion sort), followed only into the ranges where
// inside(f, e) holds. The final insertion sort runs per range of at most kInsertion elements: every
// element of a range sorts after those of the ranges before it and not after those after it, so this
// is libstdc++'s single insertion pass over the whole array, range by range.
template <bool Desc, typename T, typename Key, typename Inside>
void introsort_ranges(const Key& key, T* a, int64_t n, const Inside& inside) {
  auto comp = [&key](T x, T y) { return comp_key<Desc>(key(x), key(y)); };
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
        insertion_sort<Desc>(key, a + f, a + e);
        break;
      }
      if (depth == 0) {  // std::__partial_sort(first, last, last): heapsort, as introsort does
        std::partial_sort(a + f, a + e, a + e, comp);
        break;
      }
      --depth;
      int64_t cut = partition_pivot<Desc>(key, a, f, e);
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

// The introsort, followed only into the ranges that hold a cut strictly inside.
template <bool Desc>
void introselect(const Words& W, uint32_t* a, int64_t n, const std::vector<int64_t>& cuts) {
  introsort_ranges<Desc>([&W](uint32_t w) { return W.key(w); }, a, n, [&cuts](int64_t f, int64_t e) {
    for (int64_t c : cuts)
      if (f < c && c < e) return true;
    return false;
  });
}

// libstdc++'s std::nth_element(a, a + nth, a + n) (__introselect: the introsort's partitions, into
// the range holding nth while it has more than 3 elements, then an insertion sort; heap selection
// where the depth limit runs out), or, with `partial`, std::partial_sort(a, a + nth + 1, a + n)
// (heap selection). The elements of a[0 .. nth] are then those torch.topk's CPU kernel, which calls
// one or the other on (value, index) pairs, leaves there.
template <bool Desc, typename T, typename Key>
void nth_element_like(const Key& key, T* a, int64_t n, int64_t nth, bool partial) {
  auto comp = [&key](T x, T y) { return comp_key<Desc>(key(x), key(y)); };
  if (partial) {
    std::partial_sort(a, a + nth + 1, a + n, comp);
    return;
  }
  int64_t lg = 0;
  while ((int64_t{1} << (lg + 1)) <= n) ++lg;
  int64_t f = 0, e = n, depth = 2 * lg;
  while (e - f > 3) {
    if (depth == 0) {  // __heap_select(first, nth + 1, last): the same set in [first, nth]
      std::partial_sort(a + f, a + nth + 1, a + e, comp);
      return;
    }
    --depth;
    const int64_t cut = partition_pivot<Desc>(key, a, f, e);
    if (cut <= nth)
      f = cut;
    else
      e = cut;
  }
  insertion_sort<Desc>(key, a + f, a + e);
}

// The words of one input (Words), built in parallel: each block counts its tie elements, takes
// ordinals for them from the groups' counters, then writes its words. `idx` gets each ordinal's
// element index.
template <typename F>
void build_words(const typename F::storage* x, const typename F::storage* b, int64_t n, const Words& W,
                 uint32_t* a, uint32_t* idx, int threads) {
  std::atomic<uint32_t> next_lo{0}, next_hi{W.nlo};
  const int64_t nb = (n + kKeyBlock - 1) / kKeyBlock;
  parallel_for(nb, n >= kParallelMin ? threads : 1, [&](int64_t blo, int64_t bhi) {
    for (int64_t blk = blo; blk < bhi; ++blk) {
      const int64_t j0 = blk * kKeyBlock, m = std::min(kKeyBlock, n - j0);
      uint32_t* k = a + j0;
      keys_block<F>(x, b, j0, m, k);
      uint32_t clo = 0, chi = 0;
      for (int64_t t = 0; t < m; ++t) {
        clo += k[t] == W.klo;
        chi += k[t] == W.khi && W.khi != W.klo;
      }
      if (clo + chi == 0) continue;
      uint32_t olo = clo ? next_lo.fetch_add(clo, std::memory_order_relaxed) : 0;
      uint32_t ohi = chi ? next_hi.fetch_add(chi, std::memory_order_relaxed) : 0;
      for (int64_t t = 0; t < m; ++t) {
        if (k[t] == W.klo) {
          idx[olo] = static_cast<uint32_t>(j0 + t);
          k[t] = 0x80000000u | olo++;
        } else if (k[t] == W.khi) {
          idx[ohi] = static_cast<uint32_t>(j0 + t);
          k[t] = 0x80000000u | ohi++;
        }
      }
    }
  });
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
  std::vector<Words> groups(static_cast<size_t>(count));
  std::vector<uint32_t> nties(static_cast<size_t>(count));
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
    // the tie groups: every key equal to lo or hi is decided by the bitmap (rule flags 0)
    const uint32_t nlo = static_cast<uint32_t>(lo.le - lo.lt);
    const uint32_t nhi = (top || hi.key == lo.key) ? 0u : static_cast<uint32_t>(hi.le - hi.lt);
    groups[i] = Words{lo.key, hi.key, nlo};
    nties[i] = nlo + nhi;
    need.push_back(i);
    used |= int64_t{1} << i;
  }
  if (need.empty()) return used;
  // one thread per straddled input (each holds n words), the words built in parallel
  int64_t conc = std::max<int64_t>(1, std::min<int64_t>(threads, static_cast<int64_t>(need.size())));
  for (size_t g = 0; g < need.size(); g += static_cast<size_t>(conc)) {
    size_t ge = std::min(need.size(), g + static_cast<size_t>(conc));
    std::vector<std::unique_ptr<uint32_t[]>> arr(ge - g), idx(ge - g);
    for (size_t q = g; q < ge; ++q) {
      int64_t i = need[q];
      const Words& W = groups[i];
      arr[q - g].reset(new uint32_t[static_cast<size_t>(n)]);
      idx[q - g].reset(new uint32_t[std::max<size_t>(1, nties[i])]);
      build_words<F>(reinterpret_cast<const S*>(xs[i]), base, n, W, arr[q - g].get(), idx[q - g].get(), threads);
    }
    parallel_for(static_cast<int64_t>(ge - g), static_cast<int>(ge - g), [&](int64_t lo, int64_t hi) {
      for (int64_t q = lo; q < hi; ++q) {
        int64_t i = need[g + q];
        const Words& W = groups[i];
        uint32_t* p = arr[q].get();
        bool top = modes[i] == kSelectTop;
        if (top)
          introselect<true>(W, p, n, cuts[i]);
        else
          introselect<false>(W, p, n, cuts[i]);
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
        const uint32_t* ix = idx[q].get();
        for (int64_t s = a; s < e; ++s) {
          const uint32_t w = p[s];
          if ((w >> 31) != 0) {
            const uint32_t j = ix[w & 0x7fffffffu];
            bm[j >> 6] |= uint64_t{1} << (j & 63);
          }
        }
        arr[q].reset();
        idx[q].reset();
      }
    });
  }
  return used;
}

// ---- sce: the positions of the top-k variances across the models

// The keys of |var| at elements [j0, j0 + len), var the variance over the models of the deltas
// rD(x_i - base) as torch.var(dim=0, unbiased=False) computes it for every float dtype but fp64's:
// Welford's update in fp64 from (0, 0), model by model, m2 / count, then stored to the dtype (fp64 ->
// fp32 -> D, as c10 converts). A division by a power of two is the multiplication by its inverse (the
// same real value, so the same rounding), which the compiler vectorises better.
template <typename F>
inline void sce_var_keys(const typename F::storage* b, const typename F::storage* const* xs, int64_t count,
                         int64_t j0, int64_t len, double* mean, double* m2, uint32_t* k) {
  using A = typename F::A;
  for (int64_t t = 0; t < len; ++t) mean[t] = m2[t] = 0.0;
  for (int64_t q = 0; q < count; ++q) {
    const typename F::storage* x = xs[q] + j0;
    const typename F::storage* bb = b + j0;
    const int64_t c = q + 1;
    const double dc = static_cast<double>(c), r = 1.0 / dc;
    if ((c & (c - 1)) == 0) {
      for (int64_t t = 0; t < len; ++t) {
        const double v = static_cast<double>(F::round(static_cast<A>(F::load(x[t])) - static_cast<A>(F::load(bb[t]))));
        const double delta = v - mean[t];
        mean[t] = mean[t] + delta * r;
        m2[t] = m2[t] + delta * (v - mean[t]);
      }
    } else {
      for (int64_t t = 0; t < len; ++t) {
        const double v = static_cast<double>(F::round(static_cast<A>(F::load(x[t])) - static_cast<A>(F::load(bb[t]))));
        const double delta = v - mean[t];
        mean[t] = mean[t] + delta / dc;
        m2[t] = m2[t] + delta * (v - mean[t]);
      }
    }
  }
  const double dc = static_cast<double>(count), r = 1.0 / dc;
  if ((count & (count - 1)) == 0) {
    for (int64_t t = 0; t < len; ++t) k[t] = ta_key(F::round(static_cast<float>(m2[t] * r)));
  } else {
    for (int64_t t = 0; t < len; ++t) k[t] = ta_key(F::round(static_cast<float>(m2[t] / dc)));
  }
}

template <typename F>
int64_t sce_select_impl(int64_t n, int64_t count, const void* base_, const uint64_t* xs_, double density,
                        uint64_t* bitmap, int threads) {
  using S = typename F::storage;
  const int64_t words = (n + 63) / 64;
  for (int64_t w = 0; w < words; ++w) bitmap[w] = 0;
  if (n == 0 || density <= 0) return 0;  // mergekit: a zero mask
  if (n >= (int64_t{1} << 31)) return -1;
  const S* base = static_cast<const S*>(base_);
  std::vector<const S*> xs(static_cast<size_t>(count));
  for (int64_t q = 0; q < count; ++q) xs[q] = reinterpret_cast<const S*>(xs_[q]);
  // the keys of |var| (torch.topk's comparator: NaN above everything), their histogram, the zeros
  std::unique_ptr<uint32_t[]> K(new uint32_t[static_cast<size_t>(n)]);
  const int64_t nb = (n + kKeyBlock - 1) / kKeyBlock;
  std::vector<Hist> parts(static_cast<size_t>(nb));
  std::vector<int64_t> zeros(static_cast<size_t>(nb), 0);
  parallel_for(nb, n >= kParallelMin ? threads : 1, [&](int64_t blo, int64_t bhi) {
    Hist h = new_hist();
    std::unique_ptr<double[]> mean(new double[kKeyBlock]), m2(new double[kKeyBlock]);
    for (int64_t blk = blo; blk < bhi; ++blk) {
      const int64_t j0 = blk * kKeyBlock, len = std::min(kKeyBlock, n - j0);
      uint32_t* k = K.get() + j0;
      sce_var_keys<F>(base, xs.data(), count, j0, len, mean.get(), m2.get(), k);
      int64_t z = 0;
      for (int64_t t = 0; t < len; ++t) {
        ++h[k[t] >> 16];
        z += k[t] == 0;  // var == 0 (the keys of +-0)
      }
      zeros[blk] = z;
    }
    parts[blo] = std::move(h);
  });
  Hist h0 = new_hist();
  int64_t nonzero = n;
  for (int64_t blk = 0; blk < nb; ++blk) {
    nonzero -= zeros[blk];
    if (parts[blk])
      for (int64_t i = 0; i < kBins; ++i) h0[i] += parts[blk][i];
  }
  // k = int(count_nonzero(var) * density): an int64 tensor times a Python float, an fp32 product
  const float kf = static_cast<float>(nonzero) * static_cast<float>(density);
  const int64_t k = std::min<int64_t>(n, static_cast<int64_t>(kf));
  if (k <= 0) return 0;
  // the key at ascending position n - k: the smallest kept
  const int64_t r = n - k;
  int64_t below = 0;
  const uint32_t hi = bin_of(h0, r, below);
  uint32_t thr = hi << 16;
  int64_t lt = below, le = below + h0[hi];
  if (!std::is_same_v<F, HostBF16>) {  // the low 16 bits, among the keys of that bin
    Hist h1 = new_hist();
    for (int64_t j = 0; j < n; ++j)
      if ((K[j] >> 16) == hi) ++h1[K[j] & 0xffffu];
    const uint32_t lo = bin_of(h1, r, below);
    thr |= lo;
    lt = below;
    le = below + h1[lo];
  }
  // every key above thr is kept; of the keys equal to it, all when none is left out (lt == r), else
  // those torch's selection leaves among the first k
  const bool straddle = lt != r;
  const int64_t ties = le - lt;
  std::unique_ptr<uint32_t[]> idx(new uint32_t[straddle ? static_cast<size_t>(ties) : 1]);
  std::atomic<uint32_t> next{0};
  const int64_t nw = words;
  parallel_for((nw + 63) / 64, n >= kParallelMin ? threads : 1, [&](int64_t lo, int64_t hi2) {
    for (int64_t w = lo * 64; w < std::min(nw, hi2 * 64); ++w) {
      uint64_t bits = 0;
      uint32_t tie = 0;
      const int64_t j0 = w * 64, m = std::min<int64_t>(64, n - j0);
      for (int64_t t = 0; t < m; ++t) {
        const uint32_t key = K[j0 + t];
        bits |= static_cast<uint64_t>(key > thr || (!straddle && key == thr)) << t;
        tie += key == thr;
      }
      bitmap[w] = bits;
      if (straddle && tie != 0) {  // the tie group's words: 2^31 | ordinal (Words)
        uint32_t o = next.fetch_add(tie, std::memory_order_relaxed);
        for (int64_t t = 0; t < m; ++t)
          if (K[j0 + t] == thr) {
            idx[o] = static_cast<uint32_t>(j0 + t);
            K[j0 + t] = 0x80000000u | o++;
          }
      }
    }
  });
  if (!straddle) return k;
  const Words W{thr, thr, static_cast<uint32_t>(ties)};
  uint32_t* p = K.get();
  nth_element_like<true>([&W](uint32_t w) { return W.key(w); }, p, n, k - 1, k * 64 <= n);
  for (int64_t s = 0; s < k; ++s) {
    const uint32_t w = p[s];
    if ((w >> 31) != 0) {
      const uint32_t j = idx[w & 0x7fffffffu];
      bitmap[j >> 6] |= uint64_t{1} << (j & 63);
    }
  }
  return k;
}

// ---- DELLA: per-row ranks, keep probabilities, draws

template <typename F>
int64_t della_impl(int64_t n, int64_t cols, const void* base_, const void* x_, double density,
                   double epsilon, uint64_t seed, uint64_t hash, uint64_t* bitmap, int threads) {
  using S = typename F::storage;
  if (cols < 1 || n % cols != 0) throw std::invalid_argument("della_keep_cpu: n must be a multiple of cols");
  if (cols >= (int64_t{1} << 31)) throw std::invalid_argument("della_keep_cpu: rows of 2^31 elements or more");
  const S* base = static_cast<const S*>(base_);
  const S* x = static_cast<const S*>(x_);
  const int64_t words = (n + 63) / 64;
  for (int64_t w = 0; w < words; ++w) bitmap[w] = 0;
  if (n == 0) return 0;
  // The threshold of each rank: every row holds the ranks 0 .. cols - 1, so p depends on the rank
  // alone. The Python scalars as torch takes them: density - epsilon (computed in fp64), the scalar
  // of an add, converted to the work dtype (through fp32); epsilon, the scalar of a mul, to fp32.
  constexpr bool kBf16Work = std::is_same_v<F, HostBF16>;
  auto rw = [](float v) { return kBf16Work ? HostBF16::round(v) : v; };
  const float dme = rw(static_cast<float>(density - epsilon)), eps = static_cast<float>(epsilon);
  std::unique_ptr<uint32_t[]> thr(new uint32_t[cols]);
  for (int64_t r = 0; r < cols; ++r) {
    const float p = della_prob<float>(r, cols, dme, eps, rw);
    // u = (word >> 8) * 2^-24 < p  <=>  (word >> 8) < ceil(p * 2^24)
    const double t = std::ceil(static_cast<double>(p) * 16777216.0);
    thr[r] = t <= 0 ? 0u : (t >= 16777216.0 ? 16777216u : static_cast<uint32_t>(t));
  }
  const PhiloxStream ps = philox_stream(seed, hash);
  const int64_t rows = n / cols;
  std::atomic<int64_t> kept{0};
  parallel_for(rows, n >= kParallelMin ? threads : 1, [&](int64_t lo, int64_t hi) {
    std::unique_ptr<uint64_t[]> pairs(new uint64_t[cols]);
    // the row's Philox words: its whole blocks, from the block of its first element
    std::unique_ptr<uint32_t[]> word(new uint32_t[cols + 8]);
    std::unique_ptr<uint64_t[]> bits(new uint64_t[cols / 64 + 2]);
    int64_t mine = 0;
    for (int64_t row = lo; row < hi; ++row) {
      const int64_t j0 = row * cols;
      // (key, index) pairs in index order, as torch's sort starts, compared by the key alone: the
      // introsort (libstdc++'s std::sort, block-partitioned) then makes the moves of torch's sort,
      // hence its permutation, ties included
      for (int64_t t = 0; t < cols; ++t)
        pairs[t] = (static_cast<uint64_t>(key_at<F>(x, base, j0 + t)) << 32) | static_cast<uint64_t>(t);
      introsort_ranges<false>([](uint64_t p) { return static_cast<uint32_t>(p >> 32); }, pairs.get(), cols,
                              [](int64_t, int64_t) { return true; });
      const int64_t b0 = j0 >> 2, nb = ((j0 + cols - 1) >> 2) - b0 + 1;
      philox_words(ps, static_cast<uint64_t>(b0), nb, word.get());
      const uint32_t* wj = word.get() + (j0 & 3);  // wj[t]: word j0 + t
      // the row's bits, then OR-ed into the bitmap word by word (a row's first and last words may be
      // shared with rows of other threads)
      const int64_t w0 = j0 >> 6, w1 = (j0 + cols - 1) >> 6;
      for (int64_t w = 0; w <= w1 - w0; ++w) bits[w] = 0;
      for (int64_t s = 0; s < cols; ++s) {
        const int64_t t = static_cast<int64_t>(pairs[s] & 0xffffffffu);
        if (ta_draw_keep(wj[t], thr[s])) {
          const int64_t j = j0 + t;
          bits[(j >> 6) - w0] |= uint64_t{1} << (j & 63);
          ++mine;
        }
      }
      for (int64_t w = 0; w <= w1 - w0; ++w)
        if (bits[w] != 0) __atomic_fetch_or(&bitmap[w0 + w], bits[w], __ATOMIC_RELAXED);
    }
    kept.fetch_add(mine, std::memory_order_relaxed);
  });
  return kept.load();
}

}  // namespace

int64_t della_keep_cpu(int dtype, int64_t n, int64_t cols, const void* base, const void* x, double density,
                       double epsilon, uint64_t seed, uint64_t hash, uint64_t* bitmap, int threads) {
  threads = default_threads(threads);
  int64_t r = 0;
  host_by_dtype(dtype, "della_keep_cpu", [&](auto f) {
    if constexpr (std::is_same_v<decltype(f), HostF64>)
      throw std::invalid_argument("della_keep_cpu: fp64 is not supported (its ranks sort fp64 magnitudes)");
    else
      r = della_impl<decltype(f)>(n, cols, base, x, density, epsilon, seed, hash, bitmap, threads);
  });
  return r;
}

int64_t sce_select_cpu(int dtype, int64_t n, const void* base, int64_t count, const uint64_t* xs, double density,
                       uint64_t* bitmap, int threads) {
  if (count < 1) throw std::invalid_argument("sce_select_cpu: at least one model besides the base");
  threads = default_threads(threads);
  int64_t r = 0;
  host_by_dtype(dtype, "sce_select_cpu", [&](auto f) {
    if constexpr (std::is_same_v<decltype(f), HostF64>)
      throw std::invalid_argument("sce_select_cpu: fp64 is not supported (torch.topk compares fp64 values)");
    else
      r = sce_select_impl<decltype(f)>(n, count, base, xs, density, bitmap, threads);
  });
  return r;
}

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

int64_t sce_select_cpu(int dtype, int64_t n, const void* base, int64_t count, const uint64_t* xs, double density,
                       uint64_t* bitmap, int threads) {
  MKF_CPU_DISPATCH(sce_select_cpu, dtype, n, base, count, xs, density, bitmap, threads);
}

int64_t della_keep_cpu(int dtype, int64_t n, int64_t cols, const void* base, const void* x, double density,
                       double epsilon, uint64_t seed, uint64_t hash, uint64_t* bitmap, int threads) {
  MKF_CPU_DISPATCH(della_keep_cpu, dtype, n, cols, base, x, density, epsilon, seed, hash, bitmap, threads);
}

}  // namespace mkf
#endif
