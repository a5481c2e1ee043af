// The worker job's latent-cache blocks as the coordinator hands them out, with prefix
// caching: a full block is keyed by its tokens and every token before it (a chained
// hash; a match is checked against the tokens and the block before it, so a collision
// can never share rows). Blocks in use are reference-counted; cached blocks that no
// request uses stay, least recently used first out, until their room is wanted. Not
// thread-safe: the scheduler guards it.
#pragma once

#include <cstdint>
#include <list>
#include <span>
#include <unordered_map>
#include <vector>

namespace epic::coordinator {

class BlockPool {
 public:
  // CACHING off: blocks are only handed out and given back.
  BlockPool(int64_t num_blocks, int64_t block_size, bool caching);

  // Every block free and nothing cached (a new worker job: its cache is empty).
  void Reset();

  int64_t num_blocks() const { return static_cast<int64_t>(ref_.size()); }
  // Blocks a request could be given now: free ones and cached ones nobody uses.
  int64_t available() const { return static_cast<int64_t>(free_.size() + unused_.size()); }
  int64_t cached_blocks() const { return static_cast<int64_t>(by_hash_.size()); }

  // The cached blocks holding the longest run of TOKENS' full blocks from the start, at
  // most MAX_BLOCKS of them; nothing changes.
  std::vector<int32_t> FindPrefix(std::span<const int32_t> tokens, int64_t max_blocks) const;
  // Of BLOCKS (cached), those nobody uses now: taking them lowers available().
  int64_t Unused(std::span<const int32_t> blocks) const;
  // Each of BLOCKS (cached) used once more.
  void Take(std::span<const int32_t> blocks);
  // FindPrefix, then Take.
  std::vector<int32_t> TakePrefix(std::span<const int32_t> tokens, int64_t max_blocks);
  // N blocks for new rows: free ones first, then cached ones nobody uses, least recently
  // used first (evicted). REQUIRES: available() >= n.
  std::vector<int32_t> Allocate(int64_t n);
  // Gives BLOCKS back (each used once less); a cached one nobody uses stays cached.
  void Release(std::span<const int32_t> blocks);
  // A sequence's BLOCKS hold the rows of TOKENS (all it has so far): its full blocks from
  // the FROM-th on are cached (unless the same prefix already is). Returns how many of
  // its blocks are now full, for the next call's FROM.
  int64_t Publish(std::span<const int32_t> blocks, std::span<const int32_t> tokens, int64_t from);

  // A request admitted with QUERIED prompt tokens looked up, HITS of them found.
  void Count(int64_t queried, int64_t hits) {
    queried_ += queried;
    hits_ += hits;
  }
  // Prompt tokens looked up and found in the cache, and cached blocks evicted, since
  // construction (vLLM's prefix_cache_queries and _hits).
  int64_t queried_tokens() const { return queried_; }
  int64_t hit_tokens() const { return hits_; }
  int64_t evictions() const { return evictions_; }

 private:
  static constexpr uint64_t kNoHash = 0;
  // The key of the block holding TOKENS after the prefix keyed PARENT.
  static uint64_t Chain(uint64_t parent, std::span<const int32_t> tokens);
  void Uncache(int32_t block);

  int64_t block_size_;
  bool caching_;
  std::vector<int32_t> free_;  // blocks never cached, nobody's; handed out from the back
  std::vector<int32_t> ref_;   // [block] requests using it
  // Per cached block: its key, the block before it in its prefix (-1: the first), tokens.
  std::vector<uint64_t> hash_;
  std::vector<int32_t> parent_;
  std::vector<std::vector<int32_t>> tokens_;
  std::unordered_map<uint64_t, int32_t> by_hash_;
  std::list<int32_t> unused_;  // cached blocks nobody uses, least recently used first
  std::vector<std::list<int32_t>::iterator> unused_at_;
  int64_t queried_ = 0, hits_ = 0, evictions_ = 0;
};

}  // namespace epic::coordinator
