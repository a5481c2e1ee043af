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

class Sampler {
 public:
  explicit Sampler(const SamplingParams& params) : params_(params), rng_(params.seed) {}
  // REQUIRES: vocab > 0.
  int32_t Sample(const float* logits, int64_t vocab);

 private:
  SamplingParams params_;
  std::mt19937_64 rng_;
};

// The index of the largest value; the lowest index on ties.
int32_t ArgMax(const float* values, int64_t n);

}  // namespace epic
