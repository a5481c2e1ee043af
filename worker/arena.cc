#include "worker/arena.h"

#include <sys/mman.h>

#include <algorithm>
#include <cstdint>

namespace epic {

Arena::~Arena() {
  for (const Chunk& c : chunks_) ::munmap(c.base, static_cast<size_t>(c.size));
}

void* Arena::Allocate(int64_t bytes) {
  constexpr int64_t kHugePage = 2 << 20;
  constexpr int64_t kPage = 4096;
  bytes = (bytes + 63) / 64 * 64;
  if (bytes > left_) {
    // Small arenas (one small expert) stay in 4 KiB pages: a huge page each would
    // multiply their memory.
    const bool huge = std::max(chunk_bytes_, bytes) >= kHugePage;
    const int64_t align = huge ? kHugePage : kPage;
    const int64_t size = std::max(chunk_bytes_, (bytes + align - 1) / align * align);
    // One huge page more than needed, so the usable part can start on a 2 MiB boundary.
    const int64_t extra = huge ? kHugePage : 0;
    void* base = ::mmap(nullptr, static_cast<size_t>(size + extra), PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (base == MAP_FAILED) return nullptr;
    chunks_.push_back({base, size + extra});
    const auto addr = reinterpret_cast<uintptr_t>(base);
    next_ = reinterpret_cast<char*>((addr + align - 1) / align * align);
    left_ = size;
    if (huge) ::madvise(next_, static_cast<size_t>(size), MADV_HUGEPAGE);  // advice: fine if refused
  }
  void* p = next_;
  next_ += bytes;
  left_ -= bytes;
  return p;
}

}  // namespace epic
