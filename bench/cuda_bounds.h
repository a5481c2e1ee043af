// The GPU's ceilings, measured in the same run as the figures compared against them.
#pragma once

#include "common/status.h"

namespace epic::bench {

// Device-to-device copy of GIB gibibytes: bytes read plus bytes written per second, in
// GB/s, the best of REPEATS (what a kernel streaming its inputs once can reach).
StatusOr<double> MeasureDeviceBandwidth(double gib, int repeats);

// cuBLAS BF16 GEMM (F32 accumulate) of SIZE x SIZE x SIZE through cuda::MatMul, in
// TFLOP/s, the best of REPEATS.
StatusOr<double> MeasureBf16GemmTflops(int64_t size, int repeats);

}  // namespace epic::bench
