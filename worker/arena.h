// Anonymous memory advised to use transparent huge pages: the weights' and the latent
// cache's. Decode reads both in long runs every step; in 4 KiB pages the TLB's misses,
// and the hardware prefetchers stopping at every page, cost up to a third of decode.
#pragma once

#include <cstdint>
#include <vector>

namespace epic {

// Memory in large chunks (huge pages from 2 MiB), handed out in pieces.
class Arena {
 public:
  Arena() = default;
  ~Arena();
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;
  // BYTES of 64-byte aligned memory, valid for the arena's life. nullptr when the
  // system refuses the memory.
  void* Allocate(int64_t bytes);
  // Memory is reserved this much at a time (address space only, until touched).
  void set_chunk_bytes(int64_t bytes) { chunk_bytes_ = bytes; }

 private:
  struct Chunk {
    void* base;
    int64_t size;
  };
  int64_t chunk_bytes_ = int64_t{1} << 30;
  std::vector<Chunk> chunks_;
  char* next_ = nullptr;
  int64_t left_ = 0;
};

}  // namespace epic
