// Random test inputs, the same for the same seed on every machine.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

namespace epic::testing {

// N values uniform in [LO, HI).
inline std::vector<float> Random(size_t n, uint64_t seed, float lo = -2.0f, float hi = 2.0f) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = d(rng);
  return v;
}

// N token ids in [0, VOCAB), from a plain LCG so that prompts do not depend on the
// standard library's distributions.
inline std::vector<int32_t> Prompt(int n, int64_t vocab, uint64_t seed) {
  std::vector<int32_t> t;
  uint64_t s = seed * 2654435761u + 7;
  for (int i = 0; i < n; ++i) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    t.push_back(static_cast<int32_t>((s >> 33) % static_cast<uint64_t>(vocab)));
  }
  return t;
}

}  // namespace epic::testing
