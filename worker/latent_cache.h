// The latent cache: per layer, per token, one row [c_kv | k_pe] (kv_lora_rank +
// qk_rope_head_dim values; F32, or BF16 under the fast precision), kept in fixed-size
// blocks so that a budget can be counted in blocks and sequences of any length share
// one pool.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "common/status.h"
#include "kernels/cpu/mla_attention.h"
#include "worker/arena.h"

namespace epic {

// A sequence's blocks, in order; row t lives in blocks[t / block_size].
struct BlockTable {
  std::vector<int32_t> blocks;
  int64_t num_tokens = 0;  // rows written so far
};

class LatentCache {
 public:
  // Without HOST_ROWS only the blocks are counted here: the rows live elsewhere (in the
  // GPU's memory, for the CUDA step), and Row/Rows must not be called. BF16_ROWS: rows
  // rounded to BF16 as they are written (half the memory; the fast precision's).
  LatentCache(int64_t num_layers, int64_t row_width, int64_t block_size, int64_t num_blocks,
              bool host_rows = true, bool bf16_rows = false);

  int64_t block_size() const { return block_size_; }
  int64_t num_blocks() const { return num_blocks_; }
  int64_t free_blocks() const { return static_cast<int64_t>(free_.size()); }
  int64_t row_width() const { return row_width_; }
  // Bytes of one token's row in one layer.
  int64_t row_bytes() const { return row_width_ * (bf16_rows_ ? 2 : 4); }
  int64_t num_layers() const { return num_layers_; }
  // Blocks needed to hold NUM_TOKENS rows.
  int64_t BlocksFor(int64_t num_tokens) const { return (num_tokens + block_size_ - 1) / block_size_; }

  // Grows TABLE to hold NUM_TOKENS rows. RESOURCE_EXHAUSTED (TABLE unchanged) when
  // the free blocks do not suffice.
  Status Reserve(BlockTable* table, int64_t num_tokens);
  // Returns TABLE's blocks to the pool and empties it.
  void Release(BlockTable* table);

  // Row T of TABLE's sequence in LAYER = VALUES [row_width] (rounded to BF16 in a BF16 cache).
  void Write(int64_t layer, const BlockTable& table, int64_t t, const float* values);
  cpu::LatentRows Rows(int64_t layer, const BlockTable& table) const;

  // Rows kept by a device instead (the CUDA step's BF16 pool), owned with the cache so
  // that they live and die with its block tables; empty until the step first needs them.
  std::shared_ptr<void>& device_rows() { return device_rows_; }

 private:
  int64_t num_layers_;
  int64_t row_width_;
  int64_t block_size_;
  int64_t num_blocks_;
  bool bf16_rows_;
  Arena arena_;
  std::byte* pool_;  // in arena_: [layers, blocks, block_size, row_width] F32 or BF16
  std::vector<int32_t> free_;
  std::shared_ptr<void> device_rows_;
};

}  // namespace epic
