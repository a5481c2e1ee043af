#include "worker/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>
#include <vector>

namespace epic {

Status ValidateSamplingParams(const SamplingParams& p) {
  if (!(p.temperature >= 0.0) || !std::isfinite(p.temperature)) {
    return InvalidArgumentError("temperature must be a finite number >= 0");
  }
  if (p.top_k < 0) return InvalidArgumentError("top_k must be >= 0 (0: no limit)");
  if (!(p.top_p > 0.0 && p.top_p <= 1.0)) return InvalidArgumentError("top_p must be in (0, 1]");
  return OkStatus();
}

int32_t ArgMax(const float* values, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 1; i < n; ++i) {
    if (values[i] > values[best]) best = i;
  }
  return static_cast<int32_t>(best);
}

namespace {

uint64_t SplitMix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

}  // namespace

float LogProbability(const float* logits, int64_t vocab, int32_t token) {
  double max = logits[0];
  for (int64_t i = 1; i < vocab; ++i) max = std::max<double>(max, logits[i]);
  double sum = 0.0;
  for (int64_t i = 0; i < vocab; ++i) sum += std::exp(logits[i] - max);
  return static_cast<float>(logits[token] - max - std::log(sum));
}

int32_t Sampler::Sample(const float* logits, int64_t vocab) {
  const uint64_t draw = draw_++;
  if (params_.temperature == 0.0) return ArgMax(logits, vocab);
  std::mt19937_64 rng(SplitMix64(params_.seed ^ SplitMix64(draw)));
  std::vector<int32_t> order(static_cast<size_t>(vocab));
  std::iota(order.begin(), order.end(), 0);
  const int64_t k = params_.top_k > 0 ? std::min(params_.top_k, vocab) : vocab;
  auto higher = [logits](int32_t a, int32_t b) {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  };
  std::partial_sort(order.begin(), order.begin() + k, order.end(), higher);
  order.resize(static_cast<size_t>(k));

  std::vector<double> probs(order.size());
  const double max = logits[order[0]];
  double sum = 0.0;
  for (size_t i = 0; i < order.size(); ++i) {
    probs[i] = std::exp((logits[order[i]] - max) / params_.temperature);
    sum += probs[i];
  }
  // Nucleus: the smallest prefix whose mass reaches top_p.
  size_t keep = order.size();
  if (params_.top_p < 1.0) {
    double mass = 0.0;
    for (size_t i = 0; i < order.size(); ++i) {
      mass += probs[i] / sum;
      if (mass >= params_.top_p) {
        keep = i + 1;
        break;
      }
    }
  }
  double kept = 0.0;
  for (size_t i = 0; i < keep; ++i) kept += probs[i];
  const double u = std::uniform_real_distribution<double>(0.0, kept)(rng);
  double acc = 0.0;
  for (size_t i = 0; i < keep; ++i) {
    acc += probs[i];
    if (u < acc) return order[i];
  }
  return order[keep - 1];
}

}  // namespace epic
