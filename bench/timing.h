// What the benchmarks share to time things on the host and summarise repeats.
#pragma once

#include <algorithm>
#include <chrono>
#include <vector>

namespace epic::bench {

using Clock = std::chrono::steady_clock;

inline double Since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

// The median of V (the mean of the middle two for an even count). REQUIRES: V not empty.
inline double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.size() % 2 ? v[v.size() / 2] : 0.5 * (v[v.size() / 2 - 1] + v[v.size() / 2]);
}

}  // namespace epic::bench
