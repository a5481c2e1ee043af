// Scratch for the CPU kernels, kept per thread (thread_local) so that repeated calls do
// not fault in fresh pages: each buffer grows to the largest request seen, 64-byte
// aligned, and is freed with its thread.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <new>

namespace epic::cpu {

class ScratchBuffer {
 public:
  ScratchBuffer() = default;
  ScratchBuffer(const ScratchBuffer&) = delete;
  ScratchBuffer& operator=(const ScratchBuffer&) = delete;
  ~ScratchBuffer() { std::free(data_); }

  // At least BYTES; the contents are not kept when it grows.
  void* Get(int64_t bytes) {
    if (bytes_ < bytes) {
      std::free(data_);
      const int64_t rounded = (bytes + 63) / 64 * 64;
      data_ = std::aligned_alloc(64, static_cast<size_t>(rounded));
      if (data_ == nullptr) throw std::bad_alloc();
      bytes_ = rounded;
    }
    return data_;
  }

 private:
  void* data_ = nullptr;
  int64_t bytes_ = 0;
};

}  // namespace epic::cpu
