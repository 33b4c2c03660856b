// Minimal fork-join parallel_for for the CPU kernels (no OpenMP: torch ships its own runtime,
// and two OpenMP runtimes in one process oversubscribe the cores).
#pragma once
#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

namespace mkf {

inline int default_threads(int requested) {
  if (requested > 0) return requested;
  unsigned hc = std::thread::hardware_concurrency();
  return hc == 0 ? 1 : static_cast<int>(hc);
}

// Calls fn(begin, end) over [0, n) split into `threads` contiguous ranges; the caller runs one.
template <typename F>
void parallel_for(int64_t n, int threads, F&& fn) {
  if (n <= 0) return;
  threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, n)));
  if (threads == 1) {
    fn(int64_t{0}, n);
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(threads - 1);
  int64_t step = (n + threads - 1) / threads;
  for (int i = 1; i < threads; ++i) {
    int64_t b = i * step, e = std::min(n, b + step);
    if (b >= e) break;
    pool.emplace_back([&fn, b, e] { fn(b, e); });
  }
  fn(int64_t{0}, std::min(n, step));
  for (auto& th : pool) th.join();
}

}  // namespace mkf
