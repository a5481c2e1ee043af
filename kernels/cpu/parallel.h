// The kernels' threads: one team of persistent threads that spin between products (a
// decode step starts ~90 of them on small experts) and sleep when idle, and the loops
// over it. An OpenMP region started and joined in 2.78 us on the Zen 5 guest, a handoff
// to a spinning thread and back in 0.57 us (`model_bench`'s machine line): 12% of small
// experts' decode step went to starting teams. The thread count is still OpenMP's
// (OMP_NUM_THREADS, omp_set_num_threads: `--threads`).
#pragma once

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <type_traits>

namespace epic::cpu {

// Whether this thread already runs in a team (this file's, or an OpenMP region): work
// started here stays on this thread, the caller having spread it.
bool InTeam();

namespace internal {
// [begin, end) of part INDEX of COUNT near-equal parts of TOTAL units.
inline void SplitRange(int64_t total, int count, int index, int64_t* begin, int64_t* end) {
  *begin = total * index / count;
  *end = total * (index + 1) / count;
}

// Runs CALL(BODY, t, THREADS) on THREADS threads of the team, t = 0 on this one, and
// returns when all have (THREADS >= 2, not InTeam()). Where another thread holds the
// team, CALL(BODY, 0, 1) on this one.
void RunOnTeam(int threads, void (*call)(void*, int, int), void* body);
}  // namespace internal

// BODY(thread, threads) on a team of THREADS; with one, or inside a team already,
// BODY(0, 1) on this thread.
template <typename Body>
void OnTeam(int threads, Body&& body) {
  if (threads <= 1 || InTeam()) {
    body(0, 1);
    return;
  }
  internal::RunOnTeam(
      threads, [](void* b, int t, int n) { (*static_cast<std::remove_reference_t<Body>*>(b))(t, n); },
      const_cast<void*>(static_cast<const void*>(&body)));
}

// BODY(i) for i in [0, N): spread over the threads (dynamic, one at a time) when PARALLEL
// and not in a team already; else in order on this thread, so that the products inside
// spread over the threads themselves.
template <typename Body>
void ParallelFor(int64_t n, bool parallel, Body&& body) {
  if (parallel && n > 1 && !InTeam()) {
    alignas(64) std::atomic<int64_t> next{0};
    OnTeam(omp_get_max_threads(), [&](int, int) {
      for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < n;) body(i);
    });
    return;
  }
  for (int64_t i = 0; i < n; ++i) body(i);
}

// ParallelFor where each thread claims its next item before it runs the one it holds,
// and calls AHEAD(next) first (in order on one thread: AHEAD(i + 1) before BODY(i)): the
// data of a batch's next sequence comes into this core's caches while it computes
// (batched decode's absorbed attention on small experts, medians of alternating steps:
// B=64 0.86-0.93x the time, B=16 0.91x). Dynamic still, at most one item held past the
// others.
template <typename Ahead, typename Body>
void ParallelForAhead(int64_t n, bool parallel, Ahead&& ahead, Body&& body) {
  if (parallel && n > 1 && !InTeam()) {
    alignas(64) std::atomic<int64_t> next{0};
    OnTeam(omp_get_max_threads(), [&](int, int) {
      for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < n;) {
        const int64_t j = next.fetch_add(1, std::memory_order_relaxed);
        if (j < n) ahead(j);
        body(i);
        i = j;
      }
    });
    return;
  }
  for (int64_t i = 0; i < n; ++i) {
    if (i + 1 < n) ahead(i + 1);
    body(i);
  }
}

// BODY(i) for i in [0, N) in one contiguous share a thread when PARALLEL and not in a
// team already; else in order on this thread. For rows of equal cost that call no
// products.
template <typename Body>
void ParallelRows(int64_t n, bool parallel, Body&& body) {
  if (parallel && n > 1 && !InTeam()) {
    OnTeam(static_cast<int>(std::min<int64_t>(n, omp_get_max_threads())), [&](int t, int threads) {
      int64_t begin, end;
      internal::SplitRange(n, threads, t, &begin, &end);
      for (int64_t i = begin; i < end; ++i) body(i);
    });
    return;
  }
  for (int64_t i = 0; i < n; ++i) body(i);
}

}  // namespace epic::cpu
