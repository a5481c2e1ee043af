// Loops over work items: those that call the matrix products themselves, and rows of
// plain work.
#pragma once

#include <omp.h>

#include <cstdint>

namespace epic::cpu {

// BODY(i) for i in [0, N): spread over the threads (dynamic, one at a time) when PARALLEL
// and not already inside a parallel region; else in order on this thread and outside any
// region, so that the products inside spread over the threads themselves. (A loop under
// `omp parallel for if (false)` is an inactive region: a product inside it started a
// nested team of fresh threads every call, decode of one sequence on a rank with 8 heads
// ran 8x slower.)
template <typename Body>
void ParallelFor(int64_t n, bool parallel, Body&& body) {
  if (parallel && n > 1 && omp_get_level() == 0) {
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t i = 0; i < n; ++i) body(i);
    return;
  }
  for (int64_t i = 0; i < n; ++i) body(i);
}

// BODY(i) for i in [0, N) in one contiguous share a thread when PARALLEL and not already
// inside a parallel region; else in order on this thread with no region at all (an
// inactive one, `omp parallel for if (false)`, still costs a team's setup, which
// decode's small loops paid dozens of times a token). For rows of equal cost that call
// no products.
template <typename Body>
void ParallelRows(int64_t n, bool parallel, Body&& body) {
  if (parallel && n > 1 && omp_get_level() == 0) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) body(i);
    return;
  }
  for (int64_t i = 0; i < n; ++i) body(i);
}

// BODY(thread, threads) on a team of THREADS; with one, BODY(0, 1) on this thread and no
// region at all: an inactive region (`omp parallel if (false)`, or any inside another)
// still sets up a team, ~0.4-0.6 us, which the small products of a decode step paid
// hundreds of times a token. BODY must not use OpenMP worksharing, which would bind to
// an enclosing team.
template <typename Body>
void OnTeam(int threads, Body&& body) {
  if (threads <= 1) {
    body(0, 1);
    return;
  }
#pragma omp parallel num_threads(threads)
  body(omp_get_thread_num(), omp_get_num_threads());
}

}  // namespace epic::cpu
