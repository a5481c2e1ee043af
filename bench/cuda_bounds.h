// The GPU's ceilings, measured in the same run as the figures compared against them,
// and the timing and random data the GPU benchmarks share.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>

#include "common/status.h"
#include "kernels/cuda/buffer.h"

namespace epic::bench {

// Untimed calls before every timed series.
inline constexpr int kCudaWarmup = 3;

// Milliseconds per call of CALL on the default stream: the median of REPS calls, each
// between its own pair of CUDA events, after kCudaWarmup untimed ones. The calls are
// enqueued back to back, so the GPU does not wait for the host between them.
StatusOr<double> MedianMs(int reps, const std::function<Status()>& call);

// Random BF16 values in [-1, 1) over device buffers of any size: a 32 MiB pattern made
// once on the host and copied device-to-device, so that filling gigabytes takes
// milliseconds and launches no kernel of epic's. (Timing on zeros can flatter a GPU.)
class RandomBf16 {
 public:
  static StatusOr<RandomBf16> Create(uint64_t seed);
  // BYTES (even) at DST, on the default stream.
  Status Fill(void* dst, size_t bytes) const;

 private:
  explicit RandomBf16(cuda::DeviceMemory pattern) : pattern_(std::move(pattern)) {}
  cuda::DeviceMemory pattern_;
};

// A device-to-device copy of GIB gibibytes: bytes read plus bytes written per second,
// in GB/s, the median of REPS.
StatusOr<double> MeasureDeviceBandwidth(double gib, int reps);

// cuBLAS BF16 GEMM (F32 accumulate and output) of 8192 x 8192 x 8192 on random data
// through cuda::MatMul, in TFLOP/s, the median of REPS.
StatusOr<double> MeasureBf16GemmTflops(const RandomBf16& random, int reps);

}  // namespace epic::bench
