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

}  // namespace epic::cpu
