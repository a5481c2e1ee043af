#include "kernels/cuda/buffer.h"

#include <cuda_runtime.h>

#include "kernels/cuda/check.h"

namespace epic::cuda {

DeviceMemory::~DeviceMemory() {
  // A failed free has nowhere to report; the process is then past recovery anyway.
  if (data_ != nullptr) cudaFree(data_);
}

DeviceMemory& DeviceMemory::operator=(DeviceMemory&& other) noexcept {
  if (this != &other) {
    if (data_ != nullptr) cudaFree(data_);
    data_ = std::exchange(other.data_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
  }
  return *this;
}

StatusOr<DeviceMemory> DeviceMemory::Allocate(size_t bytes) {
  if (bytes == 0) return DeviceMemory();
  void* data = nullptr;
  EPIC_CUDA_RETURN_IF_ERROR(cudaMalloc(&data, bytes), "cudaMalloc of " + std::to_string(bytes) + " bytes");
  return DeviceMemory(data, bytes);
}

namespace {

Status CheckRange(size_t bytes, size_t offset, size_t size, const char* direction) {
  if (offset > size || bytes > size - offset) {
    return InvalidArgumentError(std::string("copy of ") + std::to_string(bytes) + " bytes at offset " +
                                std::to_string(offset) + " " + direction + " a device buffer of " +
                                std::to_string(size) + " bytes");
  }
  return OkStatus();
}

}  // namespace

Status CopyOnDevice(void* dst, const void* src, size_t bytes) {
  if (bytes == 0) return OkStatus();
  EPIC_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, nullptr),
                            "device copy of " + std::to_string(bytes) + " bytes");
  return OkStatus();
}

Status ZeroOnDevice(void* dst, size_t bytes) {
  if (bytes == 0) return OkStatus();
  EPIC_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(dst, 0, bytes, nullptr), "zeroing " + std::to_string(bytes) + " device bytes");
  return OkStatus();
}

Status CopyToHost(void* dst, const void* src, size_t bytes) {
  if (bytes == 0) return OkStatus();
  EPIC_CUDA_RETURN_IF_ERROR(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost),
                            "copy of " + std::to_string(bytes) + " bytes from the device");
  return OkStatus();
}

Status DeviceMemory::CopyFromHost(const void* src, size_t bytes, size_t offset) {
  EPIC_RETURN_IF_ERROR(CheckRange(bytes, offset, bytes_, "into"));
  if (bytes == 0) return OkStatus();
  EPIC_CUDA_RETURN_IF_ERROR(cudaMemcpy(static_cast<char*>(data_) + offset, src, bytes, cudaMemcpyHostToDevice),
                            "copy of " + std::to_string(bytes) + " bytes to the device");
  return OkStatus();
}

Status DeviceMemory::CopyToHost(void* dst, size_t bytes, size_t offset) const {
  EPIC_RETURN_IF_ERROR(CheckRange(bytes, offset, bytes_, "out of"));
  if (bytes == 0) return OkStatus();
  EPIC_CUDA_RETURN_IF_ERROR(cudaMemcpy(dst, static_cast<const char*>(data_) + offset, bytes, cudaMemcpyDeviceToHost),
                            "copy of " + std::to_string(bytes) + " bytes from the device");
  return OkStatus();
}

}  // namespace epic::cuda
