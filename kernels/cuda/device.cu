#include "kernels/cuda/device.h"

#include <cuda_runtime.h>

#include <cstdio>

#include "kernels/cuda/check.h"

namespace epic::cuda {

StatusOr<int> DeviceCount() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    return FailedPreconditionError(std::string("no usable CUDA device: ") + cudaGetErrorName(err) + ": " +
                                   cudaGetErrorString(err));
  }
  if (count == 0) return FailedPreconditionError("no CUDA device found");
  return count;
}

StatusOr<std::string> DeviceName(int index) {
  cudaDeviceProp prop{};
  const cudaError_t err = cudaGetDeviceProperties(&prop, index);
  if (err != cudaSuccess) {
    return FailedPreconditionError("CUDA device " + std::to_string(index) + ": " + cudaGetErrorString(err));
  }
  char text[512];
  std::snprintf(text, sizeof text, "%s, sm_%d%d, %.1f GiB", prop.name, prop.major, prop.minor,
                prop.totalGlobalMem / 1073741824.0);
  return std::string(text);
}

StatusOr<int> MultiprocessorCount() {
  int device = 0, count = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) {
    return FailedPreconditionError(std::string("CUDA multiprocessor count: ") + cudaGetErrorString(err));
  }
  return count;
}

Status Synchronize() {
  EPIC_CUDA_RETURN_IF_ERROR(cudaDeviceSynchronize(), "a kernel of the step");
  return OkStatus();
}

}  // namespace epic::cuda
