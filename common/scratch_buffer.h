// Scratch for the CPU kernels, the CPU backend and the host's MoE exchange, kept (per
// thread, or per owner) so that repeated calls do not fault in fresh pages: each buffer
// grows to the largest request seen, 64-byte aligned, and from 2 MiB in transparent huge
// pages. In 4 KiB pages a step's first touch of its buffers cost 10-20 us a page on a
// virtualized host: the first 512-token prefill of V2-Lite's shape spent 120 ms zeroing
// the dense MLP's 45 MB of scratch, where huge pages take 17 ms (docs/performance.md).
#pragma once

#include <sys/mman.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <utility>

namespace epic {

class ScratchBuffer {
 public:
  ScratchBuffer() = default;
  ScratchBuffer(const ScratchBuffer&) = delete;
  ScratchBuffer& operator=(const ScratchBuffer&) = delete;
  ScratchBuffer(ScratchBuffer&& other) noexcept
      : data_(std::exchange(other.data_, nullptr)), bytes_(std::exchange(other.bytes_, 0)) {}
  ScratchBuffer& operator=(ScratchBuffer&& other) noexcept {
    std::swap(data_, other.data_);
    std::swap(bytes_, other.bytes_);
    return *this;
  }
  ~ScratchBuffer() { std::free(data_); }

  // At least BYTES, holding what it held (a grown buffer's new bytes are unset).
  void* Get(int64_t bytes) {
    if (bytes_ < bytes) {
      constexpr int64_t kHuge = int64_t{2} << 20;
      const int64_t align = bytes >= kHuge ? kHuge : 64;
      const int64_t rounded = (bytes + align - 1) / align * align;
      void* grown = std::aligned_alloc(static_cast<size_t>(align), static_cast<size_t>(rounded));
      if (grown == nullptr) throw std::bad_alloc();
      if (align == kHuge) ::madvise(grown, static_cast<size_t>(rounded), MADV_HUGEPAGE);  // advice: fine if refused
      if (bytes_ > 0) std::memcpy(grown, data_, static_cast<size_t>(bytes_));
      std::free(data_);
      data_ = grown;
      bytes_ = rounded;
    }
    return data_;
  }
  template <typename T>
  T* Get(int64_t count) {
    return static_cast<T*>(Get(count * static_cast<int64_t>(sizeof(T))));
  }

 private:
  void* data_ = nullptr;
  int64_t bytes_ = 0;
};

}  // namespace epic
