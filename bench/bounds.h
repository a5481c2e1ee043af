// The machine's bounds, measured in the same run as the figure compared against them.
#pragma once

#include <string>

namespace epic::bench {

struct Bandwidth {
  double read_gbs = 0;  // streaming read of a large buffer, all threads
  double copy_gbs = 0;  // memcpy of a large buffer: bytes read plus bytes written, per second
};

// Best of REPEATS passes over a buffer of GIB gibibytes (far larger than the caches).
Bandwidth MeasureBandwidth(double gib, int repeats);

struct GemmRate {
  double gflops = 0;
  std::string how;  // which library and shape
};

// F32 matrix-multiply rate at M x N x K = 512 x 2816 x 2048, all threads: OpenBLAS's
// sgemm where the bench was built with it, else epic's own F32-weight MatMul.
GemmRate MeasureF32GemmRate(int repeats);

}  // namespace epic::bench
