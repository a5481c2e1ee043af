// Device memory owned by one object. A plain C++ header: .cc files include it without
// the CUDA headers, so the model can hold device buffers in builds that compile CUDA.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "common/status.h"

// The runtime's own stream handle, declared as cuda_runtime.h declares it; nullptr is
// the default stream.
struct CUstream_st;
typedef struct CUstream_st* cudaStream_t;

namespace epic::cuda {

// Untyped device bytes, freed on destruction. Copies are synchronous (cudaMemcpy on the
// default stream), so they also wait for kernels launched before them on blocking
// streams, and surface any fault those kernels raised.
class DeviceMemory {
 public:
  DeviceMemory() = default;
  ~DeviceMemory();
  DeviceMemory(DeviceMemory&& other) noexcept
      : data_(std::exchange(other.data_, nullptr)), bytes_(std::exchange(other.bytes_, 0)) {}
  DeviceMemory& operator=(DeviceMemory&& other) noexcept;
  DeviceMemory(const DeviceMemory&) = delete;
  DeviceMemory& operator=(const DeviceMemory&) = delete;

  // RESOURCE_EXHAUSTED when the device is out of memory, FAILED_PRECONDITION when there
  // is no usable device; the message names the byte count and the CUDA error. Zero
  // bytes allocate nothing and succeed.
  static StatusOr<DeviceMemory> Allocate(size_t bytes);

  void* data() const { return data_; }
  size_t bytes() const { return bytes_; }

  // REQUIRES: offset + bytes <= this->bytes(), else INVALID_ARGUMENT.
  Status CopyFromHost(const void* src, size_t bytes, size_t offset = 0);
  Status CopyToHost(void* dst, size_t bytes, size_t offset = 0) const;

 private:
  DeviceMemory(void* data, size_t bytes) : data_(data), bytes_(bytes) {}

  void* data_ = nullptr;
  size_t bytes_ = 0;
};

// BYTES from SRC to DST, both device memory, and BYTES of zeros at DST: enqueued on the
// default stream, in order with the kernels around them.
Status CopyOnDevice(void* dst, const void* src, size_t bytes);
Status ZeroOnDevice(void* dst, size_t bytes);
// BYTES from device memory SRC to host memory DST, once the work before it has finished.
Status CopyToHost(void* dst, const void* src, size_t bytes);

// COUNT values of T on the device.
template <typename T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;

  static StatusOr<DeviceBuffer> Allocate(int64_t count) {
    if (count < 0) return InvalidArgumentError("device buffer of " + std::to_string(count) + " values");
    EPIC_ASSIGN_OR_RETURN(DeviceMemory memory, DeviceMemory::Allocate(static_cast<size_t>(count) * sizeof(T)));
    return DeviceBuffer(std::move(memory));
  }
  static StatusOr<DeviceBuffer> FromHost(const std::vector<T>& values) {
    EPIC_ASSIGN_OR_RETURN(DeviceBuffer buffer, Allocate(static_cast<int64_t>(values.size())));
    EPIC_RETURN_IF_ERROR(buffer.CopyFromHost(values.data(), buffer.size()));
    // Spelled out: nvcc's C++17 does not move a named local into StatusOr by itself.
    return StatusOr<DeviceBuffer>(std::move(buffer));
  }

  T* data() { return static_cast<T*>(memory_.data()); }
  const T* data() const { return static_cast<const T*>(memory_.data()); }
  int64_t size() const { return static_cast<int64_t>(memory_.bytes() / sizeof(T)); }

  // The first COUNT values. REQUIRES: 0 <= count <= size(), else INVALID_ARGUMENT.
  Status CopyFromHost(const T* src, int64_t count) {
    if (count < 0) return InvalidArgumentError("copy of " + std::to_string(count) + " values to the device");
    return memory_.CopyFromHost(src, static_cast<size_t>(count) * sizeof(T));
  }
  Status CopyToHost(T* dst, int64_t count) const {
    if (count < 0) return InvalidArgumentError("copy of " + std::to_string(count) + " values from the device");
    return memory_.CopyToHost(dst, static_cast<size_t>(count) * sizeof(T));
  }
  StatusOr<std::vector<T>> ToHost() const {
    std::vector<T> values(static_cast<size_t>(size()));
    EPIC_RETURN_IF_ERROR(CopyToHost(values.data(), size()));
    return values;
  }

 private:
  explicit DeviceBuffer(DeviceMemory memory) : memory_(std::move(memory)) {}

  DeviceMemory memory_;
};

}  // namespace epic::cuda
