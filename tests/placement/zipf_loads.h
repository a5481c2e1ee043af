// Skewed expert loads for the planner and report tests: per layer, the experts in a
// shuffled order carry PEAK / rank^S tokens (rank 1 the hottest).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

namespace epic::placement {

inline std::vector<std::vector<double>> ZipfLoads(int layers, int experts, double s, uint64_t seed,
                                                  double peak = 10000.0, bool whole = false) {
  std::mt19937_64 rng(seed);
  std::vector<std::vector<double>> loads(static_cast<size_t>(layers), std::vector<double>(static_cast<size_t>(experts)));
  for (auto& layer : loads) {
    std::vector<int> order(static_cast<size_t>(experts));
    for (int i = 0; i < experts; ++i) order[static_cast<size_t>(i)] = i;
    std::shuffle(order.begin(), order.end(), rng);
    for (int i = 0; i < experts; ++i) {
      const double v = peak / std::pow(i + 1, s);
      layer[static_cast<size_t>(order[static_cast<size_t>(i)])] = whole ? std::floor(v) : v;
    }
  }
  return loads;
}

}  // namespace epic::placement
