// The DeepSeek-V2/V3 forward pass in one process on the CPU: a batch of sequences of
// any lengths per step, each reading and extending its rows of the latent cache.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <span>
#include <vector>

#include "common/status.h"
#include "kernels/cpu/gating.h"
#include "worker/checkpoint.h"
#include "worker/latent_cache.h"
#include "worker/rope.h"
#include "worker/weights.h"

namespace epic {

// One sequence's part of a step: TOKENS at positions cache->num_tokens onwards.
struct SequenceStep {
  BlockTable* cache = nullptr;
  std::span<const int32_t> tokens;
  bool all_logits = false;  // logits for every token; otherwise for the last only
};

// Tokens each routed expert processed, per layer ([layer][expert]; empty for dense
// layers). Summed over steps by Forward.
struct ExpertCounts {
  std::vector<std::vector<int64_t>> tokens;
};

// Which form of MLA a step uses; kAuto picks the cheaper per sequence (prefill
// expands K/V through kv_b_proj, decode absorbs it into the query and output).
enum class AttentionForm { kAuto, kExpanded, kAbsorbed };

class Model {
 public:
  // Opens and validates the checkpoint, binds its weights (PROGRESS: optional).
  static StatusOr<std::unique_ptr<Model>> Load(const std::filesystem::path& dir,
                                               const ProgressFn& progress = {},
                                               WeightResidency residency = WeightResidency::kCopy);

  const ModelConfig& config() const { return checkpoint_->config(); }
  const ModelWeights& weights() const { return *weights_; }

  // A cache sized for this model.
  std::unique_ptr<LatentCache> MakeCache(int64_t block_size, int64_t num_blocks) const;

  // For tests and benchmarks: force one form of attention.
  void set_attention_form(AttentionForm form) { attention_form_ = form; }

  // Runs one step. Each sequence's cache must already hold room for its new tokens
  // (LatentCache::Reserve); rows are written and num_tokens advanced. LOGITS receives
  // [rows, vocab], rows in sequence order (all tokens or the last, per all_logits).
  // COUNTS (optional) accumulates routed tokens per expert.
  Status Forward(std::span<SequenceStep> batch, LatentCache* cache, std::vector<float>* logits,
                 ExpertCounts* counts = nullptr);

 private:
  Model() = default;
  void Attention(int64_t layer, std::span<SequenceStep> batch, LatentCache* cache,
                 const std::vector<int64_t>& positions, const float* x, float* out);
  void MoeBlock(int64_t layer, const float* x, int64_t tokens, float* residual,
                ExpertCounts* counts);
  void Mlp(const MlpWeights& w, const float* x, int64_t tokens, float* residual, const float* row_scale,
           const int32_t* rows);

  // Activations reused from step to step. A fresh allocation of this size in every
  // step costs a page clear per 4 KiB, which showed as 15% of decode time.
  struct Workspace {
    std::vector<float> x, normed, attn, q, qa, latent, c_kv, k_pe, kv, q_latent, q_pe, o_latent,
        gate, up, y, router, weights, scales, gathered;
  };
  // V grown to hold at least N values (never shrunk); its data.
  static float* Sized(std::vector<float>& v, int64_t n);

  Workspace ws_;
  std::unique_ptr<Checkpoint> checkpoint_;
  std::unique_ptr<ModelWeights> weights_;
  RopeTable rope_;
  cpu::GateParams gate_;
  AttentionForm attention_form_ = AttentionForm::kAuto;
};

}  // namespace epic
