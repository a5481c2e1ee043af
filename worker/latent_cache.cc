#include "worker/latent_cache.h"

#include <cstring>
#include <new>
#include <string>

#include "kernels/cpu/matmul_fast.h"

namespace epic {

LatentCache::LatentCache(int64_t num_layers, int64_t row_width, int64_t block_size,
                         int64_t num_blocks, bool host_rows, bool bf16_rows)
    : num_layers_(num_layers), row_width_(row_width), block_size_(block_size),
      num_blocks_(num_blocks), bf16_rows_(bf16_rows),
      pool_(nullptr) {
  const int64_t bytes = num_layers * num_blocks * block_size * row_bytes();
  if (host_rows && bytes > 0) {
    // One chunk of exactly the pool, in huge pages from 2 MiB: a batch's rows span
    // thousands of 4 KiB pages (64 sequences of 128 tokens on small experts, 10k a step),
    // more than the TLB holds (batched decode 5% faster on v2-small-experts).
    arena_.set_chunk_bytes(bytes);
    pool_ = static_cast<std::byte*>(arena_.Allocate(bytes));
    if (pool_ == nullptr) throw std::bad_alloc();
  }
  free_.reserve(static_cast<size_t>(num_blocks));
  // Hand out low block numbers first.
  for (int64_t b = num_blocks - 1; b >= 0; --b) free_.push_back(static_cast<int32_t>(b));
}

Status LatentCache::Reserve(BlockTable* table, int64_t num_tokens) {
  const int64_t need = BlocksFor(num_tokens) - static_cast<int64_t>(table->blocks.size());
  if (need > free_blocks()) {
    return ResourceExhaustedError("latent cache: " + std::to_string(num_tokens) + " tokens need " +
                                  std::to_string(need) + " more blocks of " +
                                  std::to_string(block_size_) + " but " +
                                  std::to_string(free_blocks()) + " of " +
                                  std::to_string(num_blocks_) + " are free");
  }
  for (int64_t i = 0; i < need; ++i) {
    table->blocks.push_back(free_.back());
    free_.pop_back();
  }
  return OkStatus();
}

void LatentCache::Release(BlockTable* table) {
  for (auto it = table->blocks.rbegin(); it != table->blocks.rend(); ++it) free_.push_back(*it);
  table->blocks.clear();
  table->num_tokens = 0;
}

cpu::LatentRows LatentCache::Rows(int64_t layer, const BlockTable& table) const {
  cpu::LatentRows rows;
  rows.pool = pool_ + layer * num_blocks_ * block_size_ * row_bytes();
  rows.block_table = table.blocks.data();
  rows.block_size = block_size_;
  rows.row_stride = row_width_;
  rows.type = bf16_rows_ ? cpu::WeightType::kBF16 : cpu::WeightType::kF32;
  return rows;
}

void LatentCache::Write(int64_t layer, const BlockTable& table, int64_t t, const float* values) {
  void* row = const_cast<void*>(Rows(layer, table).Row(t));
  if (bf16_rows_) {
    cpu::RoundToBf16(values, row_width_, static_cast<uint16_t*>(row));
  } else {
    std::memcpy(row, values, static_cast<size_t>(row_width_) * sizeof(float));
  }
}

}  // namespace epic
