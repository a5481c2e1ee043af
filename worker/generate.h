// One sequence from prompt to generated tokens: a prefill step over the prompt,
// then one decode step per new token. What epic-run does in a single process.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "common/status.h"
#include "worker/model.h"
#include "worker/sampler.h"

namespace epic {

struct GenerateOptions {
  int64_t max_new_tokens = 0;
  SamplingParams sampling;
  bool stop_at_eos = true;          // stop after an eos_token_id of config.json
  bool prompt_logits = false;       // keep logits at every prompt position
  int64_t block_size = 16;          // latent cache block size, in tokens
};

struct GenerateResult {
  std::vector<int32_t> tokens;      // generated ids
  std::vector<float> prompt_logits; // [prompt, vocab] when asked for
  ExpertCounts expert_counts;       // routed tokens per layer and expert, all steps
  double prefill_seconds = 0.0;
  double decode_seconds = 0.0;
};

// INVALID_ARGUMENT for an empty prompt, ids outside the vocabulary or a length past
// max_position_embeddings.
StatusOr<GenerateResult> Generate(Model& model, std::span<const int32_t> prompt,
                                  const GenerateOptions& options);

}  // namespace epic
