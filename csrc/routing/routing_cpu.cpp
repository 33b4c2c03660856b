// MoE top-k routing on the CPU: one token per loop iteration, tokens split over threads.
//
// Per token the row is converted to fp32 once, each expert gets a packed 64-bit rank key
// (common/routing_select.h), the group stage (if any) excludes experts, and the top k keys are
// kept in a small sorted buffer (insertion; a partial sort for large k). The keys are unique, so
// any selection algorithm returns exactly the same experts in the same order. With softmax
// scoring, renormalisation and no bias or top-2-sum group stage, selection reads the logits
// directly and no exponential is computed except for the k chosen experts.
//
// A kernel file (common/cpu_isa.h): compiled once per CPU instruction-set level, each time in
// namespace mkf::MKF_ISA_NS; the baseline compile also defines the mkf:: dispatchers.
#include <algorithm>
#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "common/parallel.h"
#include "common/routing_select.h"
#include "routing/routing.h"

namespace mkf::MKF_ISA_NS {
namespace {

using routing::RouteConfig;

// Rows of fewer than this many elements in total run on one thread.
constexpr int64_t kParallelMinElems = 1 << 15;
// Up to this k the top-k buffer is filled by insertion (after a block-maximum filter when there
// are enough keys); beyond, by std::partial_sort.
constexpr int64_t kInsertionMaxK = 32;

struct LoadF32 {
  using storage = float;
  static inline float load(storage v) { return v; }
};
struct LoadBF16 {
  using storage = uint16_t;
  static inline float load(storage v) { return bf16_to_f32(v); }
};
struct LoadF16 {
#if defined(__FLT16_MAX__) && !defined(MKF_NO_FLOAT16)
  using storage = _Float16;
  static inline float load(storage v) { return static_cast<float>(v); }
#else
  using storage = uint16_t;
  static inline float load(storage v) { return f16_to_f32(v); }
#endif
};

struct Scratch {
  std::vector<float> x;
  std::vector<uint64_t> keys;
  std::vector<uint64_t> group_keys;
  std::vector<uint64_t> top;
  std::vector<uint64_t> tmp;
  std::vector<float> sel_x;
};

// Inserts v into the descending buffer out[0, k) (v > out[k - 1]).
inline void insert_sorted(uint64_t* out, int64_t k, uint64_t v) {
  int64_t j = k - 1;
  while (j > 0 && out[j - 1] < v) {
    out[j] = out[j - 1];
    --j;
  }
  out[j] = v;
}

// Top-k (k <= kInsertionMaxK) by block maxima: the k-th largest maximum of the blocks of B keys
// is a lower bound of the k-th largest key (k keys reach it), so only the blocks whose maximum
// reaches it can hold a winner, and only their keys are tested one by one. The block maxima are
// vectorised. Returns the number of keys handled (whole blocks); the caller finishes the rest.
template <int64_t B>
int64_t select_by_blocks(const uint64_t* keys, int64_t n, int64_t k, uint64_t* out,
                         std::vector<uint64_t>& tmp) {
  const int64_t nb = n / B;
  tmp.resize(static_cast<size_t>(nb));
  for (int64_t b = 0; b < nb; ++b) {
    uint64_t m = 0;
    for (int64_t j = 0; j < B; ++j) m = std::max(m, keys[b * B + j]);
    tmp[b] = m;
  }
  for (int64_t b = 0; b < nb; ++b)
    if (tmp[b] > out[k - 1]) insert_sorted(out, k, tmp[b]);
  const uint64_t bound = out[k - 1];
  std::fill(out, out + k, routing::kTaken);
  for (int64_t b = 0; b < nb; ++b) {
    if (tmp[b] < bound) continue;
    for (int64_t j = b * B; j < (b + 1) * B; ++j) {
      const uint64_t v = keys[j];
      if (v >= bound && v > out[k - 1]) insert_sorted(out, k, v);
    }
  }
  return nb * B;
}

// The k largest of keys[0, n) (unique values), descending, into out[0, k). Keys equal to
// routing::kTaken (0) are never chosen: callers guarantee at least k keys above it.
void select_topk(const uint64_t* keys, int64_t n, int64_t k, uint64_t* out,
                 std::vector<uint64_t>& tmp) {
  if (k <= kInsertionMaxK) {
    std::fill(out, out + k, routing::kTaken);
    const int64_t min_blocks = std::max<int64_t>(2 * k, 4);  // else the filter rarely skips a block
    int64_t i = 0;
    if (n / 16 >= min_blocks) {
      i = select_by_blocks<16>(keys, n, k, out, tmp);
    } else if (n / 8 >= min_blocks) {
      i = select_by_blocks<8>(keys, n, k, out, tmp);
    }
    // The remaining keys (all of them for small n) against the running k-th largest.
    uint64_t thr = out[k - 1];
    for (; i < n; ++i) {
      const uint64_t v = keys[i];
      if (v > thr) {
        insert_sorted(out, k, v);
        thr = out[k - 1];
      }
    }
    return;
  }
  tmp.assign(keys, keys + n);
  std::partial_sort(tmp.begin(), tmp.begin() + k, tmp.end(), std::greater<uint64_t>());
  std::copy(tmp.begin(), tmp.begin() + k, out);
}

template <typename F>
void route_row(const typename F::storage* row, const float* bias, const RouteConfig& c,
               float* w, int32_t* ids, Scratch& s) {
  const int64_t E = c.E, k = c.k;
  float* x = s.x.data();
  for (int64_t i = 0; i < E; ++i) x[i] = F::load(row[i]);

  // Softmax statistics: m = max valid logit, Z from the exact fixed-point sum.
  float m = -routing::f32_inf(), z = 0.0f;
  if (c.need_softmax_stats()) {
    for (int64_t i = 0; i < E; ++i)
      if (x[i] == x[i] && x[i] > m) m = x[i];
    int64_t q = 0;
    for (int64_t i = 0; i < E; ++i) q += routing::to_fixed(routing::softmax_numerator(x[i], m));
    z = routing::from_fixed(q);
  }

  uint64_t* keys = s.keys.data();
  if (c.select_on_logits()) {
    for (int64_t i = 0; i < E; ++i)  // order_key maps NaN to 0 itself
      keys[i] = routing::pack(routing::order_key(x[i]), static_cast<uint32_t>(i));
  } else {
    for (int64_t i = 0; i < E; ++i) {
      float sc = routing::row_score(c, x[i], m, z);
      keys[i] = routing::pack(routing::expert_key(c, x[i], sc, bias ? bias[i] : 0.0f),
                              static_cast<uint32_t>(i));
    }
  }

  if (c.groups_active()) {
    const int64_t ng = c.num_groups, gs = c.group_size();
    uint64_t* gk = s.group_keys.data();
    for (int64_t g = 0; g < ng; ++g) {
      uint64_t best = 0, second = 0;
      for (int64_t i = g * gs; i < (g + 1) * gs; ++i) {
        uint64_t v = keys[i];
        if (v > best) {
          second = best;
          best = v;
        } else if (v > second) {
          second = v;
        }
      }
      gk[g] = routing::pack(routing::order_key(routing::group_value(c, best, second)),
                            static_cast<uint32_t>(g));
    }
    // Keep the topk_groups best groups: a group is dropped when its key is below the
    // topk_groups-th largest group key.
    uint64_t* gtop = s.top.data();  // top has room for max(k, num_groups) keys
    select_topk(gk, ng, c.topk_groups, gtop, s.tmp);
    const uint64_t threshold = gtop[c.topk_groups - 1];
    for (int64_t g = 0; g < ng; ++g) {
      if (gk[g] >= threshold) continue;
      std::fill(keys + g * gs, keys + (g + 1) * gs, routing::kTaken);
    }
  }

  uint64_t* top = s.top.data();
  select_topk(keys, E, k, top, s.tmp);

  float m_sel = -routing::f32_inf();
  float* sx = s.sel_x.data();
  for (int64_t j = 0; j < k; ++j) {
    uint32_t idx = routing::packed_index(top[j]);
    ids[j] = static_cast<int32_t>(idx);
    sx[j] = x[idx];
    if (sx[j] == sx[j] && sx[j] > m_sel) m_sel = sx[j];
  }
  for (int64_t j = 0; j < k; ++j) w[j] = routing::weight_term(c, sx[j], m_sel, m, z);
  if (c.renormalize) {
    float den = 0.0f;
    for (int64_t j = 0; j < k; ++j) den = den + w[j];
    den = den + routing::kRenormEps;
    for (int64_t j = 0; j < k; ++j) w[j] = w[j] / den;
  }
  for (int64_t j = 0; j < k; ++j) w[j] = w[j] * c.scaling;
}

template <typename F>
void route_impl(const void* logits_, const float* bias, float* weights, int32_t* ids,
                int64_t T, const RouteConfig& c, int threads) {
  auto logits = static_cast<const typename F::storage*>(logits_);
  if (T * c.E < kParallelMinElems) threads = 1;
  parallel_for(T, threads, [&](int64_t lo, int64_t hi) {
    Scratch s;
    s.x.resize(c.E);
    s.keys.resize(c.E);
    s.group_keys.resize(c.num_groups > 0 ? c.num_groups : 1);
    s.top.resize(std::max<int64_t>(c.k, c.num_groups));
    s.sel_x.resize(c.k);
    for (int64_t t = lo; t < hi; ++t)
      route_row<F>(logits + t * c.E, bias, c, weights + t * c.k, ids + t * c.k, s);
  });
}

}  // namespace

void topk_routing_cpu(int dtype, const void* logits, const float* bias, float* weights,
                      int32_t* ids, int64_t T, int64_t E, int64_t k, int scoring,
                      bool renormalize, int64_t num_groups, int64_t topk_groups, int group_score,
                      float scaling, int threads) {
  if (E < 1 || k < 1 || k > E)
    throw std::invalid_argument("topk_routing_cpu: need 1 <= k <= E, got k=" + std::to_string(k) +
                                ", E=" + std::to_string(E));
  if (num_groups > 0 && (E % num_groups != 0 || topk_groups < 1 || topk_groups > num_groups ||
                         k > topk_groups * (E / num_groups)))
    throw std::invalid_argument("topk_routing_cpu: invalid group parameters");
  if (T <= 0) return;
  RouteConfig c{E,           k,           scoring, renormalize, bias != nullptr,
                num_groups, topk_groups, group_score, scaling};
  threads = default_threads(threads);
  switch (dtype) {
    case kF32: route_impl<LoadF32>(logits, bias, weights, ids, T, c, threads); break;
    case kF16: route_impl<LoadF16>(logits, bias, weights, ids, T, c, threads); break;
    case kBF16: route_impl<LoadBF16>(logits, bias, weights, ids, T, c, threads); break;
    default:
      throw std::invalid_argument("topk_routing_cpu: unsupported dtype tag " +
                                  std::to_string(dtype));
  }
}

void routing_counts_cpu(const int32_t* ids, int64_t n_slots, int64_t E, int32_t* counts,
                        int32_t* order, int threads) {
  std::fill(counts, counts + E, 0);
  if (n_slots <= 0) return;
  threads = default_threads(threads);
  if (n_slots < (1 << 16)) threads = 1;
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(threads, n_slots));
  const int64_t step = (n_slots + parts - 1) / parts;
  // hist[p * E + e]: slots of part p routed to expert e, then that part's first output position.
  std::vector<int64_t> hist(static_cast<size_t>(parts * E), 0);
  parallel_for(parts, static_cast<int>(parts), [&](int64_t lo, int64_t hi) {
    for (int64_t p = lo; p < hi; ++p) {
      int64_t* h = hist.data() + p * E;
      for (int64_t s = p * step, end = std::min(n_slots, (p + 1) * step); s < end; ++s) ++h[ids[s]];
    }
  });
  // Expert-major, part-minor exclusive scan: expert e's slots of part 0, then part 1, ...
  int64_t running = 0;
  for (int64_t e = 0; e < E; ++e) {
    int64_t start = running;
    for (int64_t p = 0; p < parts; ++p) {
      int64_t h = hist[p * E + e];
      hist[p * E + e] = running;
      running += h;
    }
    counts[e] = static_cast<int32_t>(running - start);
  }
  parallel_for(parts, static_cast<int>(parts), [&](int64_t lo, int64_t hi) {
    for (int64_t p = lo; p < hi; ++p) {
      int64_t* h = hist.data() + p * E;
      for (int64_t s = p * step, end = std::min(n_slots, (p + 1) * step); s < end; ++s)
        order[h[ids[s]]++] = static_cast<int32_t>(s);
    }
  });
}

}  // namespace mkf::MKF_ISA_NS

#if MKF_ISA_PRIMARY
namespace mkf {

void topk_routing_cpu(int dtype, const void* logits, const float* bias, float* weights,
                      int32_t* ids, int64_t T, int64_t E, int64_t k, int scoring,
                      bool renormalize, int64_t num_groups, int64_t topk_groups, int group_score,
                      float scaling, int threads) {
  MKF_CPU_DISPATCH(topk_routing_cpu, dtype, logits, bias, weights, ids, T, E, k, scoring,
                   renormalize, num_groups, topk_groups, group_score, scaling, threads);
}

void routing_counts_cpu(const int32_t* ids, int64_t n_slots, int64_t E, int32_t* counts,
                        int32_t* order, int threads) {
  MKF_CPU_DISPATCH(routing_counts_cpu, ids, n_slots, E, counts, order, threads);
}

}  // namespace mkf
#endif
