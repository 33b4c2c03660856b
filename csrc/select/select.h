// The select op: exact magnitude selections of the task-arithmetic family (TIES' top-k,
// breadcrumbs' two-sided cut), as a threshold rule plus a tie bitmap (common/ta_math.h), and
// DELLA's per-row magnitude ranks, drawn into a keep bitmap.
//
// The element keys are ta_key(|rD(x - base)|) (the deltas are never stored). The order is the
// one mergekit 0.1.5's CPU torch.sort leaves: libstdc++'s introsort over (key, index) pairs.
// A radix histogram of the keys finds the threshold(s) in two parallel passes; only when equal
// keys straddle a cut does the kernel model introsort (an introselect that follows the
// partitions containing a cut: O(n) expected, the same sets as std::sort), and then the tie
// bitmap says which of the keys equal to a threshold are kept.
#pragma once
#include <cstdint>

#include "common/cpu_isa.h"

namespace mkf {

// select modes (ta_select_cpu's modes[])
enum TaSelectMode : int32_t { kSelectTop = 0, kSelectRange = 1 };

// ---- CPU (csrc/select/select_cpu.cpp) ----
#define MKF_SELECT_CPU_API                                                                        \
  /* For each of `count` inputs xs[i] (same dtype and n as base): mode kSelectTop keeps the */    \
  /* as[i] largest keys (descending order, NaN first); kSelectRange keeps positions */           \
  /* [as[i], bs[i]) of the ascending order. Writes rules[3 i .. 3 i + 2] = lo, hi, flags */      \
  /* (ta_rule_keep's arguments) and, where ties straddle a cut, bits into bitmaps + i * */       \
  /* ((n + 63) / 64) (zeroed here). Returns a bit per input: 1 where the bitmap is used; -1 */    \
  /* when n >= 2^31 (not supported). */                                                          \
  int64_t ta_select_cpu(int dtype, int64_t n, const void* base, int64_t count,                  \
                        const uint64_t* xs, const int32_t* modes, const int64_t* as,             \
                        const int64_t* bs, uint32_t* rules, uint64_t* bitmaps, int threads);     \
  /* DELLA's keep bits of one input x (same dtype and n as base; not fp64): in each row of */     \
  /* `cols` elements (n / cols rows), the ranks of |rD(x - base)| in the order of torch's CPU */  \
  /* argsort along the row (std::sort over (key, index) pairs: libstdc++'s introsort), the */     \
  /* keep probability della_prob of each rank in the work dtype (bf16 for bf16, else fp32), */    \
  /* and the Philox draw (word >> 8) < ceil(p * 2^24) of the stream (seed, hash). Writes */       \
  /* (n + 63) / 64 words of bitmap (bit j: element j kept). Returns the number kept. */          \
  int64_t della_keep_cpu(int dtype, int64_t n, int64_t cols, const void* base, const void* x,    \
                         double density, double epsilon, uint64_t seed, uint64_t hash,            \
                         uint64_t* bitmap, int threads);                                          \
  /* sce's variance selection over `count` models xs (same dtype and n as base; not fp64): the */ \
  /* k = int(fp32(nonzero) * fp32(density)) positions of largest |var| of the deltas across the */ \
  /* models (torch.var(dim=0, unbiased=False) in the dtype; nonzero: positions with var != 0) */ \
  /* that torch.topk keeps on the CPU (std::nth_element, or std::partial_sort when 64 k <= n, on */\
  /* (value, index) pairs: ties go where libstdc++ puts them). Writes (n + 63) / 64 words of */    \
  /* bitmap (bit j: position j kept; none for density <= 0). Returns k; -1 when n >= 2^31. */       \
  int64_t sce_select_cpu(int dtype, int64_t n, const void* base, int64_t count,                  \
                         const uint64_t* xs, double density, uint64_t* bitmap, int threads)
MKF_SELECT_CPU_API;
MKF_DECLARE_PER_ISA(MKF_SELECT_CPU_API)

}  // namespace mkf
