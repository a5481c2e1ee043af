#include "bench/cuda_bounds.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <memory>
#include <string>

#include "kernels/cuda/buffer.h"
#include "kernels/cuda/gemm.h"

namespace epic::bench {
namespace {

Status Check(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return OkStatus();
  return InternalError(std::string(what) + ": " + cudaGetErrorString(err));
}

// Seconds of the fastest of REPEATS runs of RUN, timed with events on the default stream.
template <typename Run>
StatusOr<double> BestSeconds(int repeats, Run run) {
  cudaEvent_t start, stop;
  EPIC_RETURN_IF_ERROR(Check(cudaEventCreate(&start), "cudaEventCreate"));
  EPIC_RETURN_IF_ERROR(Check(cudaEventCreate(&stop), "cudaEventCreate"));
  std::unique_ptr<CUevent_st, cudaError_t (*)(cudaEvent_t)> own_start(start, cudaEventDestroy);
  std::unique_ptr<CUevent_st, cudaError_t (*)(cudaEvent_t)> own_stop(stop, cudaEventDestroy);
  EPIC_RETURN_IF_ERROR(run());  // warm-up
  double best = 1e30;
  for (int r = 0; r < std::max(repeats, 1); ++r) {
    EPIC_RETURN_IF_ERROR(Check(cudaEventRecord(start), "cudaEventRecord"));
    EPIC_RETURN_IF_ERROR(run());
    EPIC_RETURN_IF_ERROR(Check(cudaEventRecord(stop), "cudaEventRecord"));
    EPIC_RETURN_IF_ERROR(Check(cudaEventSynchronize(stop), "cudaEventSynchronize"));
    float ms = 0;
    EPIC_RETURN_IF_ERROR(Check(cudaEventElapsedTime(&ms, start, stop), "cudaEventElapsedTime"));
    best = std::min(best, ms * 1e-3);
  }
  return best;
}

}  // namespace

StatusOr<double> MeasureDeviceBandwidth(double gib, int repeats) {
  const size_t bytes = static_cast<size_t>(gib * 1073741824.0);
  EPIC_ASSIGN_OR_RETURN(cuda::DeviceMemory src, cuda::DeviceMemory::Allocate(bytes));
  EPIC_ASSIGN_OR_RETURN(cuda::DeviceMemory dst, cuda::DeviceMemory::Allocate(bytes));
  EPIC_RETURN_IF_ERROR(Check(cudaMemset(src.data(), 1, bytes), "cudaMemset"));
  EPIC_ASSIGN_OR_RETURN(const double seconds, BestSeconds(repeats, [&] {
    return Check(cudaMemcpyAsync(dst.data(), src.data(), bytes, cudaMemcpyDeviceToDevice), "cudaMemcpyAsync");
  }));
  return 2.0 * static_cast<double>(bytes) / seconds / 1e9;
}

StatusOr<double> MeasureBf16GemmTflops(int64_t size, int repeats) {
  const size_t elements = static_cast<size_t>(size * size);
  EPIC_ASSIGN_OR_RETURN(auto a, cuda::DeviceBuffer<uint16_t>::Allocate(size * size));
  EPIC_ASSIGN_OR_RETURN(auto b, cuda::DeviceBuffer<uint16_t>::Allocate(size * size));
  EPIC_ASSIGN_OR_RETURN(auto c, cuda::DeviceBuffer<float>::Allocate(size * size));
  // 0x3c00 is BF16 0.0078125: finite products, no denormals.
  EPIC_RETURN_IF_ERROR(Check(cudaMemset(a.data(), 0x3c, elements * 2), "cudaMemset"));
  EPIC_RETURN_IF_ERROR(Check(cudaMemset(b.data(), 0x3c, elements * 2), "cudaMemset"));
  EPIC_ASSIGN_OR_RETURN(std::unique_ptr<cuda::Blas> blas, cuda::Blas::Create());
  const cuda::DeviceMatrix w{cuda::DType::kBF16, b.data(), size, size, size};
  EPIC_ASSIGN_OR_RETURN(const double seconds, BestSeconds(repeats, [&] {
    return cuda::MatMul(*blas, a.data(), size, size, w, c.data(), size);
  }));
  return 2.0 * static_cast<double>(size) * size * size / seconds / 1e12;
}

}  // namespace epic::bench
