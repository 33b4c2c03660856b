// Minimal fork-join parallel_for for the CPU kernels (no OpenMP: torch ships its own runtime,
// and two OpenMP runtimes in one process oversubscribe the cores).
#pragma once
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <thread>
#include <vector>

namespace mkf {

inline int default_threads(int requested) {
  if (requested > 0) return requested;
  unsigned hc = std::thread::hardware_concurrency();
  return hc == 0 ? 1 : static_cast<int>(hc);
}

// Pieces per thread in parallel_for's dynamic split.
constexpr int64_t kPiecesPerThread = 8;

// Calls fn(begin, end) over disjoint ranges that cover [0, n), on `threads` threads (the caller is
// one). The split is dynamic: [0, n) is cut into about kPiecesPerThread pieces per thread, and each
// thread takes the next free piece when it is done with one, so a thread that stalls (a page fault
// on a mapped input still being read from disk, the machine's other work) does not hold the others
// back as a fixed split does. Callers must not depend on which thread runs which range, nor on how
// many ranges there are: every caller's results are per index (block partials reduced in block
// order), so they are the same for any split.
template <typename F>
void parallel_for(int64_t n, int threads, F&& fn) {
  if (n <= 0) return;
  threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, n)));
  if (threads == 1) {
    fn(int64_t{0}, n);
    return;
  }
  const int64_t piece = std::max<int64_t>(1, n / (threads * kPiecesPerThread));
  std::atomic<int64_t> next{0};
  auto worker = [&fn, &next, n, piece] {
    for (;;) {
      const int64_t b = next.fetch_add(piece, std::memory_order_relaxed);
      if (b >= n) return;
      fn(b, std::min(n, b + piece));
    }
  };
  std::vector<std::thread> pool;
  pool.reserve(threads - 1);
  for (int i = 1; i < threads; ++i) pool.emplace_back(worker);
  worker();
  for (auto& th : pool) th.join();
}

}  // namespace mkf
