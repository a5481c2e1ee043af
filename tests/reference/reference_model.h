// The test oracle: a plain float64 forward pass of a DeepSeek-V2/V3 checkpoint,
// written from the Hugging Face modelling code (modeling_deepseek.py of
// deepseek-ai/DeepSeek-V2 and DeepSeek-V3) and sharing nothing with the engine but
// the checkpoint reader and the parsed ModelConfig. Every weight is widened to double, every sum is a loop, and
// attention runs in the up-projected (non-absorbed) form over the whole causal
// sequence, so that the optimised engine can be checked against it to 1e-5.
//
// Conventions where the HF code leaves a choice:
//   - Top-k ties (experts or groups with equal scores) go to the LOWER index.
//   - Experts outside the kept groups are excluded outright (-infinity), as in
//     DeepSeek's own inference code. HF's modelling code fills them with 0.0 instead;
//     the two differ only when fewer than top_k kept experts have a positive choice
//     score (possible under noaux_tc, whose bias can push a choice below zero).
//   - RoPE rotates the interleaved pairs (x[2i], x[2i+1]) in place. HF first
//     de-interleaves q_pe and k_pe and then uses rotate_half; query and key get the
//     same permutation, so every attention score is the same.
#pragma once

#include <cstdint>
#include <vector>

#include "worker/checkpoint.h"

namespace epic::reference {

struct ReferenceOutput {
  std::vector<std::vector<double>> logits;          // [tokens][vocab_size]
  // [num_hidden_layers][n_routed_experts]: how many of the tokens chose each expert;
  // empty rows for dense layers.
  std::vector<std::vector<int64_t>> expert_counts;
};

// Runs TOKENS through the model at positions 0..T-1 with a causal mask.
// REQUIRES: every token is in [0, vocab_size).
ReferenceOutput Forward(const Checkpoint& checkpoint, const std::vector<int64_t>& tokens);

}  // namespace epic::reference
