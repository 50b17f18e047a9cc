// Splitting a kernel's work over XLA's CPU thread pool (the one the jitted program's own ops run on).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <condition_variable>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace ultramem {

// Parts a kernel splits into: one per thread of the pool, at most one per unit of work.
inline int64_t num_parts(xla::ffi::ThreadPool& pool, int64_t work) {
  return std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), work));
}

// f(part, begin, end) over [0, n) in `parts` contiguous ranges. The calling thread and `parts - 1` pool tasks
// claim parts from a shared counter, so a pool thread busy with another of XLA's ops delays nothing: the
// caller then runs the parts itself. It then sleeps (no spinning: other processes may want the cores) until
// the parts others claimed are done. A task that starts after every part is claimed touches only the shared
// state (it may outlive this call), never `f`. Which thread runs a part never changes what the part computes,
// so results are the same run to run (each output element is written by one part, in a fixed order).
template <typename F>
void parallel_for(xla::ffi::ThreadPool& pool, int64_t n, int64_t parts, F f) {
  if (parts <= 1) {
    f(0, 0, n);
    return;
  }
  struct Shared {
    std::atomic<int64_t> next{0};
    int64_t done = 0;  // guarded by mu
    std::mutex mu;
    std::condition_variable all_done;
  };
  auto shared = std::make_shared<Shared>();
  auto run = [shared, parts, n, &f] {
    for (int64_t p; (p = shared->next.fetch_add(1)) < parts;) {
      f(p, n * p / parts, n * (p + 1) / parts);
      std::lock_guard<std::mutex> lock(shared->mu);
      if (++shared->done == parts) shared->all_done.notify_one();
    }
  };
  for (int64_t p = 1; p < parts; ++p) pool.Schedule(decltype(run)(run));  // each task owns a copy
  run();
  std::unique_lock<std::mutex> lock(shared->mu);
  shared->all_done.wait(lock, [&] { return shared->done == parts; });
}

// ids are in range by construction (selected slots, owned rows); clamp as XLA's clip-mode gather does, so a
// bad id reads a wrong row rather than outside the buffer.
inline int64_t clamp_id(int64_t id, int64_t n) { return id < 0 ? 0 : (id >= n ? n - 1 : id); }

}  // namespace ultramem
