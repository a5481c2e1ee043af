#include "worker/generate.h"

#include <algorithm>
#include <chrono>
#include <string>

namespace epic {
namespace {

Status ValidatePrompt(const ModelConfig& c, std::span<const int32_t> prompt, const GenerateOptions& options) {
  if (prompt.empty()) return InvalidArgumentError("the prompt is empty");
  for (size_t i = 0; i < prompt.size(); ++i) {
    if (prompt[i] < 0 || prompt[i] >= c.vocab_size) {
      return InvalidArgumentError("prompt token " + std::to_string(i) + " is " + std::to_string(prompt[i]) +
                                  ", outside the vocabulary [0, " + std::to_string(c.vocab_size) + ")");
    }
  }
  const int64_t length = static_cast<int64_t>(prompt.size()) + options.max_new_tokens;
  if (length > c.max_position_embeddings) {
    return InvalidArgumentError("prompt plus new tokens is " + std::to_string(length) +
                                " positions, past max_position_embeddings (" +
                                std::to_string(c.max_position_embeddings) + ")");
  }
  return OkStatus();
}

}  // namespace

StatusOr<GenerateResult> Generate(Model& model, std::span<const int32_t> prompt, const GenerateOptions& options) {
  const std::vector<int32_t> one(prompt.begin(), prompt.end());
  EPIC_ASSIGN_OR_RETURN(std::vector<GenerateResult> results, GenerateBatch(model, {&one, 1}, options));
  return std::move(results[0]);
}

StatusOr<std::vector<GenerateResult>> GenerateBatch(Model& model, std::span<const std::vector<int32_t>> prompts,
                                                    const GenerateOptions& options) {
  const ModelConfig& c = model.config();
  const int64_t vocab = c.vocab_size;
  if (prompts.empty()) return InvalidArgumentError("no prompts");
  if (options.max_new_tokens < 0) return InvalidArgumentError("max_new_tokens must be >= 0");
  if (options.block_size < 1) return InvalidArgumentError("block_size must be >= 1");
  for (const std::vector<int32_t>& p : prompts) EPIC_RETURN_IF_ERROR(ValidatePrompt(c, p, options));
  EPIC_RETURN_IF_ERROR(ValidateSamplingParams(options.sampling));

  parallel::Communicator& comm = model.comm();
  const int rank = comm.rank();
  const int ranks = comm.size();
  const bool data_parallel = model.attention() == AttentionMode::kData && ranks > 1;
  const size_t n = prompts.size();
  // Which rank runs (and samples) each sequence; under kTensor every rank runs them all
  // and rank 0 samples.
  std::vector<int> owner(n, 0);
  if (data_parallel) {
    for (size_t i = 0; i < n; ++i) owner[i] = static_cast<int>(i % static_cast<size_t>(ranks));
  }
  std::vector<size_t> mine;  // the sequences this rank runs
  for (size_t i = 0; i < n; ++i) {
    if (!data_parallel || owner[i] == rank) mine.push_back(i);
  }
  auto length = [&](size_t i) { return static_cast<int64_t>(prompts[i].size()) + options.max_new_tokens; };
  int64_t blocks = 0;
  for (size_t i : mine) blocks += (length(i) + options.block_size - 1) / options.block_size;
  auto cache = model.MakeCache(options.block_size, std::max<int64_t>(blocks, 1));
  std::vector<BlockTable> tables(n);
  for (size_t i : mine) EPIC_RETURN_IF_ERROR(cache->Reserve(&tables[i], length(i)));

  std::vector<GenerateResult> results(n);
  std::vector<Sampler> samplers(n, Sampler(options.sampling));
  std::vector<bool> done(n, options.max_new_tokens == 0);
  std::vector<int32_t> next(n, 0);
  std::vector<float> logits;
  std::vector<SequenceStep> batch;
  using Clock = std::chrono::steady_clock;
  const auto t0 = Clock::now();
  for (int64_t step = 0;; ++step) {
    const bool prefill = step == 0;
    batch.clear();
    std::vector<size_t> in_step;
    for (size_t i : mine) {
      if (!prefill && done[i]) continue;
      const std::span<const int32_t> tokens = prefill ? std::span<const int32_t>(prompts[i])
                                                      : std::span<const int32_t>(&next[i], 1);
      batch.push_back(SequenceStep{&tables[i], tokens, prefill && options.prompt_logits});
      in_step.push_back(i);
    }
    EPIC_RETURN_IF_ERROR(model.Forward(batch, cache.get(), &logits, &results[0].expert_counts));
    // Each sequence's last row of logits; with prompt logits, its every row first.
    std::vector<int32_t> sampled(n, -1);
    for (size_t row = 0, k = 0; k < in_step.size(); ++k) {
      const size_t i = in_step[k];
      const size_t rows = batch[k].all_logits ? prompts[i].size() : 1;
      if (batch[k].all_logits) {
        results[i].prompt_logits.assign(logits.begin() + static_cast<ptrdiff_t>(row * vocab),
                                        logits.begin() + static_cast<ptrdiff_t>((row + rows) * vocab));
      }
      row += rows;
      if (!done[i] && owner[i] == rank) {
        sampled[i] = samplers[i].Sample(logits.data() + (row - 1) * vocab, vocab);
      }
    }
    // Every rank learns every sampled token: it must feed the same ones (kTensor) and
    // know when all sequences are done.
    if (ranks > 1) {
      std::vector<int32_t> all(n * static_cast<size_t>(ranks));
      EPIC_RETURN_IF_ERROR(comm.AllGather(sampled.data(), all.data(),
                                          std::vector<int64_t>(ranks, static_cast<int64_t>(n * sizeof(int32_t)))));
      for (size_t i = 0; i < n; ++i) sampled[i] = all[static_cast<size_t>(owner[i]) * n + i];
    }
    if (prefill) results[0].prefill_seconds = std::chrono::duration<double>(Clock::now() - t0).count();
    bool going = false;
    for (size_t i = 0; i < n; ++i) {
      if (done[i]) continue;
      const int32_t token = sampled[i];
      results[i].tokens.push_back(token);
      next[i] = token;
      const bool eos = options.stop_at_eos &&
                       std::find(c.eos_token_ids.begin(), c.eos_token_ids.end(), token) != c.eos_token_ids.end();
      done[i] = eos || static_cast<int64_t>(results[i].tokens.size()) >= options.max_new_tokens;
      going |= !done[i];
    }
    if (!going) break;
  }
  results[0].decode_seconds =
      std::chrono::duration<double>(Clock::now() - t0).count() - results[0].prefill_seconds;
  if (data_parallel && options.prompt_logits) {
    // Each sequence's prompt logits from the rank that ran it.
    std::vector<float> held;
    for (size_t i : mine) held.insert(held.end(), results[i].prompt_logits.begin(), results[i].prompt_logits.end());
    std::vector<int64_t> counts;
    EPIC_ASSIGN_OR_RETURN(const std::vector<float> all, parallel::AllGatherVarying(comm, held, &counts));
    std::vector<int64_t> at(static_cast<size_t>(ranks), 0);
    for (int r = 1; r < ranks; ++r) at[r] = at[r - 1] + counts[r - 1];
    for (size_t i = 0; i < n; ++i) {
      const int64_t values = static_cast<int64_t>(prompts[i].size()) * vocab;
      int64_t& from = at[static_cast<size_t>(owner[i])];
      results[i].prompt_logits.assign(all.begin() + from, all.begin() + from + values);
      from += values;
    }
  }
  EPIC_RETURN_IF_ERROR(model.ReduceExpertCounts(&results[0].expert_counts));
  return results;
}

}  // namespace epic
