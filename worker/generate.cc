#include "worker/generate.h"

#include <algorithm>
#include <chrono>
#include <string>

namespace epic {

StatusOr<GenerateResult> Generate(Model& model, std::span<const int32_t> prompt,
                                  const GenerateOptions& options) {
  const ModelConfig& c = model.config();
  if (prompt.empty()) return InvalidArgumentError("the prompt is empty");
  for (size_t i = 0; i < prompt.size(); ++i) {
    if (prompt[i] < 0 || prompt[i] >= c.vocab_size) {
      return InvalidArgumentError("prompt token " + std::to_string(i) + " is " +
                                  std::to_string(prompt[i]) + ", outside the vocabulary [0, " +
                                  std::to_string(c.vocab_size) + ")");
    }
  }
  if (options.max_new_tokens < 0) return InvalidArgumentError("max_new_tokens must be >= 0");
  const int64_t length = static_cast<int64_t>(prompt.size()) + options.max_new_tokens;
  if (length > c.max_position_embeddings) {
    return InvalidArgumentError("prompt plus new tokens is " + std::to_string(length) +
                                " positions, past max_position_embeddings (" +
                                std::to_string(c.max_position_embeddings) + ")");
  }
  if (options.block_size < 1) return InvalidArgumentError("block_size must be >= 1");
  EPIC_RETURN_IF_ERROR(ValidateSamplingParams(options.sampling));

  auto cache = model.MakeCache(options.block_size, (length + options.block_size - 1) / options.block_size);
  BlockTable table;
  EPIC_RETURN_IF_ERROR(cache->Reserve(&table, length));
  Sampler sampler(options.sampling);
  GenerateResult result;
  std::vector<float> logits;
  using Clock = std::chrono::steady_clock;

  const auto t0 = Clock::now();
  SequenceStep step{&table, prompt, options.prompt_logits};
  EPIC_RETURN_IF_ERROR(model.Forward({&step, 1}, cache.get(), &logits, &result.expert_counts));
  result.prefill_seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  if (options.prompt_logits) result.prompt_logits = logits;
  const float* last = logits.data() + logits.size() - static_cast<size_t>(c.vocab_size);

  const auto t1 = Clock::now();
  int32_t token = 0;
  for (int64_t i = 0; i < options.max_new_tokens; ++i) {
    if (i > 0) {
      SequenceStep decode{&table, {&token, 1}, false};
      EPIC_RETURN_IF_ERROR(model.Forward({&decode, 1}, cache.get(), &logits, &result.expert_counts));
      last = logits.data();
    }
    // Rank 0 samples and tells the others: every rank must feed the same token.
    if (model.comm().rank() == 0) token = sampler.Sample(last, c.vocab_size);
    if (model.comm().size() > 1) EPIC_RETURN_IF_ERROR(model.comm().Broadcast(&token, sizeof token, 0));
    result.tokens.push_back(token);
    if (options.stop_at_eos &&
        std::find(c.eos_token_ids.begin(), c.eos_token_ids.end(), token) != c.eos_token_ids.end()) {
      break;
    }
  }
  result.decode_seconds = std::chrono::duration<double>(Clock::now() - t1).count();
  EPIC_RETURN_IF_ERROR(model.ReduceExpertCounts(&result.expert_counts));
  return result;
}

}  // namespace epic
