// The machine's bounds, measured in the same run as the figure compared against them.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace epic::bench {

struct Bandwidth {
  // The best read rate over a large buffer, all threads: each thread reading its share
  // as 1, 2, 4, 8 or 16 streams side by side (the GEMV reads several weight rows at
  // once), the best count's rate; the bound decode is held to.
  double read_gbs = 0;
  int read_streams = 1;     // the stream count that gave it
  double one_stream_gbs = 0;  // one stream per thread, as the bound was measured before
  double copy_gbs = 0;  // memcpy of a large buffer: bytes read plus bytes written, per second
};

// Best of REPEATS passes over a buffer of GIB gibibytes (far larger than the caches).
Bandwidth MeasureBandwidth(double gib, int repeats);

// A range of memory a step reads: a matrix's values, its scales.
struct Region {
  const void* data = nullptr;
  int64_t bytes = 0;
};

// The rate, in GB/s, of a plain read of GROUPS of regions (a step's layers' experts),
// one group after another, all threads on each, taking its regions in turn as they come
// free (as the kernels take a layer's experts) and reading each from start to end, as
// one stream or as 4 side by side: what those bytes, in those pieces, allow without the
// arithmetic. The best of REPEATS passes, each after a read of 256 MiB elsewhere, so
// that it starts from memory, not the caches.
double PlainReadGbs(const std::vector<std::vector<Region>>& groups, int repeats);

struct GemmRate {
  double gflops = 0;
  std::string how;  // which library and shape
};

// F32 matrix-multiply rate at M x N x K = 512 x 2816 x 2048, all threads: the better of
// OpenBLAS's sgemm (where the bench was built with it, else epic's own F32-weight MatMul)
// and epic's MatMul on BF16 weights (F32 arithmetic as well; faster on some hosts).
GemmRate MeasureF32GemmRate(int repeats);

// The int8 products' rate (kernels/cpu/matmul_int8.h, --precision fast) at the same
// shape, all threads, counting a multiply-add as 2 operations: epic's own kernel (no peer
// is installed), the compute bound of fast batched decode. 0 without vector int8 (AVX2).
GemmRate MeasureInt8GemmRate(int repeats);

// What starting and joining the threads costs, in microseconds, with an empty body on
// all threads: the kernels' team (kernels/cpu/parallel.h), an OpenMP parallel region
// (how the kernels started each product's threads before), and the least a start and
// join can cost here: the calling thread and one other, spinning, handing a step over
// through one cache line each way.
struct TeamCost {
  double team_us = 0;
  double region_us = 0;
  double handoff_us = 0;
};
TeamCost MeasureTeamCost();

}  // namespace epic::bench
