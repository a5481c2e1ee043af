// Sampling the next token from logits: greedy, or temperature with top-k and top-p,
// from a seeded generator so that a run can be repeated.
#pragma once

#include <cstdint>
#include <random>

#include "common/status.h"

namespace epic {

struct SamplingParams {
  double temperature = 0.0;  // 0: greedy
  int64_t top_k = 0;         // 0: all tokens
  double top_p = 1.0;        // nucleus mass in (0, 1]
  uint64_t seed = 0;
};

// INVALID_ARGUMENT naming the field when a value is out of range.
Status ValidateSamplingParams(const SamplingParams& params);

// Draw i of a sequence uses a generator seeded from (seed, i) alone, so a sequence
// can be resumed anywhere (a server samples each step afresh) with the same result
// as one uninterrupted run.
class Sampler {
 public:
  explicit Sampler(const SamplingParams& params, uint64_t first_draw = 0)
      : params_(params), draw_(first_draw) {}
  // REQUIRES: vocab > 0.
  int32_t Sample(const float* logits, int64_t vocab);

 private:
  SamplingParams params_;
  uint64_t draw_;
};

// log softmax(LOGITS)[TOKEN], the model's own log-probability (no temperature).
float LogProbability(const float* logits, int64_t vocab, int32_t token);

// The index of the largest value; the lowest index on ties.
int32_t ArgMax(const float* values, int64_t n);

}  // namespace epic
