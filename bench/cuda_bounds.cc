#include "bench/cuda_bounds.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "bench/timing.h"
#include "common/half.h"
#include "kernels/cuda/device.h"
#include "kernels/cuda/gemm.h"

namespace epic::bench {
namespace {

Status Check(cudaError_t err, const std::string& what) {
  if (err == cudaSuccess) return OkStatus();
  return InternalError(what + ": " + cudaGetErrorString(err));
}

// CUDA events, destroyed with the object.
class Events {
 public:
  Events() = default;
  ~Events() {
    for (cudaEvent_t e : events_) cudaEventDestroy(e);
  }
  Events(const Events&) = delete;
  Events& operator=(const Events&) = delete;

  StatusOr<cudaEvent_t> Add() {
    cudaEvent_t e = nullptr;
    EPIC_RETURN_IF_ERROR(Check(cudaEventCreate(&e), "cudaEventCreate"));
    events_.push_back(e);
    return e;
  }

 private:
  std::vector<cudaEvent_t> events_;
};

}  // namespace

StatusOr<double> MedianMs(int reps, const std::function<Status()>& call) {
  for (int i = 0; i < kCudaWarmup; ++i) EPIC_RETURN_IF_ERROR(call());
  EPIC_RETURN_IF_ERROR(cuda::Synchronize());
  Events events;
  std::vector<std::pair<cudaEvent_t, cudaEvent_t>> marks;
  for (int r = 0; r < std::max(reps, 1); ++r) {
    EPIC_ASSIGN_OR_RETURN(cudaEvent_t start, events.Add());
    EPIC_ASSIGN_OR_RETURN(cudaEvent_t stop, events.Add());
    marks.emplace_back(start, stop);
  }
  for (const auto& [start, stop] : marks) {
    EPIC_RETURN_IF_ERROR(Check(cudaEventRecord(start, nullptr), "cudaEventRecord"));
    EPIC_RETURN_IF_ERROR(call());
    EPIC_RETURN_IF_ERROR(Check(cudaEventRecord(stop, nullptr), "cudaEventRecord"));
  }
  EPIC_RETURN_IF_ERROR(cuda::Synchronize());
  std::vector<double> ms;
  for (const auto& [start, stop] : marks) {
    float t = 0;
    EPIC_RETURN_IF_ERROR(Check(cudaEventElapsedTime(&t, start, stop), "cudaEventElapsedTime"));
    ms.push_back(t);
  }
  return Median(std::move(ms));
}

StatusOr<RandomBf16> RandomBf16::Create(uint64_t seed) {
  std::vector<uint16_t> values(size_t{16} << 20);
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  for (uint16_t& v : values) v = FloatToBf16(uniform(rng));
  EPIC_ASSIGN_OR_RETURN(cuda::DeviceMemory pattern, cuda::DeviceMemory::Allocate(values.size() * sizeof(uint16_t)));
  EPIC_RETURN_IF_ERROR(pattern.CopyFromHost(values.data(), pattern.bytes()));
  return RandomBf16(std::move(pattern));
}

Status RandomBf16::Fill(void* dst, size_t bytes) const {
  for (size_t done = 0; done < bytes; done += pattern_.bytes()) {
    EPIC_RETURN_IF_ERROR(Check(cudaMemcpyAsync(static_cast<char*>(dst) + done, pattern_.data(),
                                               std::min(pattern_.bytes(), bytes - done), cudaMemcpyDeviceToDevice,
                                               nullptr),
                               "random fill of " + std::to_string(bytes) + " device bytes"));
  }
  return OkStatus();
}

StatusOr<double> MeasureDeviceBandwidth(double gib, int reps) {
  const size_t bytes = static_cast<size_t>(gib * 1073741824.0) / 256 * 256;
  EPIC_ASSIGN_OR_RETURN(cuda::DeviceMemory src, cuda::DeviceMemory::Allocate(bytes));
  EPIC_ASSIGN_OR_RETURN(cuda::DeviceMemory dst, cuda::DeviceMemory::Allocate(bytes));
  EPIC_RETURN_IF_ERROR(Check(cudaMemset(src.data(), 0x3c, bytes), "cudaMemset"));
  EPIC_RETURN_IF_ERROR(Check(cudaMemset(dst.data(), 0, bytes), "cudaMemset"));
  EPIC_ASSIGN_OR_RETURN(const double ms, MedianMs(reps, [&] {
    return Check(cudaMemcpyAsync(dst.data(), src.data(), bytes, cudaMemcpyDeviceToDevice, nullptr),
                 "device-to-device cudaMemcpyAsync");
  }));
  return 2.0 * static_cast<double>(bytes) / (ms * 1e-3) / 1e9;
}

StatusOr<double> MeasureBf16GemmTflops(const RandomBf16& random, int reps) {
  constexpr int64_t kSize = 8192;
  EPIC_ASSIGN_OR_RETURN(cuda::DeviceMemory x, cuda::DeviceMemory::Allocate(kSize * kSize * 2));  // [m, k]
  EPIC_ASSIGN_OR_RETURN(cuda::DeviceMemory w, cuda::DeviceMemory::Allocate(kSize * kSize * 2));  // [n, k]
  EPIC_ASSIGN_OR_RETURN(auto y, cuda::DeviceBuffer<float>::Allocate(kSize * kSize));            // [m, n]
  EPIC_RETURN_IF_ERROR(random.Fill(x.data(), x.bytes()));
  EPIC_RETURN_IF_ERROR(random.Fill(w.data(), w.bytes()));
  EPIC_ASSIGN_OR_RETURN(std::unique_ptr<cuda::Blas> blas, cuda::Blas::Create(nullptr));
  const cuda::DeviceMatrix weights{cuda::DType::kBF16, w.data(), kSize, kSize, kSize};
  EPIC_ASSIGN_OR_RETURN(const double ms, MedianMs(reps, [&] {
    return cuda::MatMul(*blas, x.data(), kSize, kSize, weights, y.data(), kSize);
  }));
  std::vector<float> row(static_cast<size_t>(kSize));
  EPIC_RETURN_IF_ERROR(y.CopyToHost(row.data(), kSize));
  for (float v : row) {
    if (!std::isfinite(v)) return InternalError("the 8192^3 GEMM gave a non-finite value");
  }
  return 2.0 * kSize * kSize * kSize / (ms * 1e-3) / 1e12;
}

}  // namespace epic::bench
