#include "coordinator/block_pool.h"

#include <algorithm>

namespace epic::coordinator {

BlockPool::BlockPool(int64_t num_blocks, int64_t block_size, bool caching)
    : block_size_(block_size), caching_(caching) {
  const size_t n = static_cast<size_t>(std::max<int64_t>(num_blocks, 0));
  ref_.resize(n);
  hash_.resize(n);
  parent_.resize(n);
  tokens_.resize(n);
  unused_at_.resize(n);
  Reset();
}

void BlockPool::Reset() {
  free_.clear();
  // Handed out from the back: block 0 first.
  for (int64_t b = num_blocks() - 1; b >= 0; --b) free_.push_back(static_cast<int32_t>(b));
  std::fill(ref_.begin(), ref_.end(), 0);
  std::fill(hash_.begin(), hash_.end(), kNoHash);
  for (auto& t : tokens_) t.clear();
  by_hash_.clear();
  unused_.clear();
}

uint64_t BlockPool::Chain(uint64_t parent, std::span<const int32_t> tokens) {
  // FNV-1a over the parent's key and the tokens, never kNoHash.
  uint64_t h = 1469598103934665603ull ^ parent;
  for (int32_t t : tokens) {
    for (int i = 0; i < 4; ++i) {
      h ^= static_cast<uint8_t>(static_cast<uint32_t>(t) >> (8 * i));
      h *= 1099511628211ull;
    }
  }
  return h == kNoHash ? 1 : h;
}

std::vector<int32_t> BlockPool::FindPrefix(std::span<const int32_t> tokens, int64_t max_blocks) const {
  std::vector<int32_t> found;
  if (!caching_) return found;
  uint64_t key = kNoHash;
  int32_t parent = -1;
  for (int64_t i = 0; i < max_blocks && (i + 1) * block_size_ <= static_cast<int64_t>(tokens.size()); ++i) {
    const std::span<const int32_t> block = tokens.subspan(static_cast<size_t>(i * block_size_),
                                                          static_cast<size_t>(block_size_));
    key = Chain(key, block);
    const auto it = by_hash_.find(key);
    if (it == by_hash_.end()) break;
    const int32_t b = it->second;
    if (parent_[b] != parent || !std::equal(block.begin(), block.end(), tokens_[b].begin(), tokens_[b].end())) break;
    found.push_back(b);
    parent = b;
  }
  return found;
}

int64_t BlockPool::Unused(std::span<const int32_t> blocks) const {
  return std::count_if(blocks.begin(), blocks.end(), [&](int32_t b) { return ref_[b] == 0; });
}

void BlockPool::Take(std::span<const int32_t> blocks) {
  for (int32_t b : blocks) {
    if (ref_[b]++ == 0) unused_.erase(unused_at_[b]);
  }
}

std::vector<int32_t> BlockPool::TakePrefix(std::span<const int32_t> tokens, int64_t max_blocks) {
  std::vector<int32_t> taken = FindPrefix(tokens, max_blocks);
  Take(taken);
  return taken;
}

void BlockPool::Uncache(int32_t block) {
  const auto it = by_hash_.find(hash_[block]);
  if (it != by_hash_.end() && it->second == block) by_hash_.erase(it);
  hash_[block] = kNoHash;
  tokens_[block].clear();
}

std::vector<int32_t> BlockPool::Allocate(int64_t n) {
  std::vector<int32_t> blocks;
  while (static_cast<int64_t>(blocks.size()) < n) {
    int32_t b;
    if (!free_.empty()) {
      b = free_.back();
      free_.pop_back();
    } else {
      b = unused_.front();
      unused_.pop_front();
      Uncache(b);
      ++evictions_;
    }
    ref_[b] = 1;
    blocks.push_back(b);
  }
  return blocks;
}

void BlockPool::Release(std::span<const int32_t> blocks) {
  for (int32_t b : blocks) {
    if (--ref_[b] > 0) continue;
    if (hash_[b] == kNoHash) {
      free_.push_back(b);
    } else {
      unused_.push_back(b);
      unused_at_[b] = std::prev(unused_.end());
    }
  }
}

int64_t BlockPool::Publish(std::span<const int32_t> blocks, std::span<const int32_t> tokens, int64_t from) {
  const int64_t full = std::min<int64_t>(static_cast<int64_t>(tokens.size()) / block_size_,
                                         static_cast<int64_t>(blocks.size()));
  if (!caching_ || full <= from) return full;
  uint64_t key = kNoHash;
  int32_t parent = -1;
  for (int64_t i = 0; i < full; ++i) {
    const std::span<const int32_t> block = tokens.subspan(static_cast<size_t>(i * block_size_),
                                                          static_cast<size_t>(block_size_));
    key = Chain(key, block);
    const auto it = by_hash_.find(key);
    if (it != by_hash_.end()) {
      parent = it->second;  // this prefix is cached already (by this sequence or another)
      continue;
    }
    if (i < from) break;  // the prefix before is gone (evicted): nothing after it can match
    const int32_t b = blocks[static_cast<size_t>(i)];
    if (hash_[b] != kNoHash) break;
    hash_[b] = key;
    parent_[b] = parent;
    tokens_[b].assign(block.begin(), block.end());
    by_hash_.emplace(key, b);
    parent = b;
  }
  return full;
}

}  // namespace epic::coordinator
