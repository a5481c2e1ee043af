// Sequences from prompt to generated tokens: a prefill step over the prompts, then one
// decode step per new token for those still going. What epic-run does, in one process
// or as a job of ranks (every rank calls it alike).
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

// Several sequences in the same steps (each sampled from options.sampling alike, its
// draws numbered from 0). With data-parallel attention prompt i runs on rank
// i % ranks; every rank gets every sequence's tokens and prompt logits. The expert
// counts and times are the whole batch's, in results[0].
StatusOr<std::vector<GenerateResult>> GenerateBatch(Model& model, std::span<const std::vector<int32_t>> prompts,
                                                    const GenerateOptions& options);

}  // namespace epic
