#include "worker/rope.h"

#include <algorithm>
#include <cmath>
#include <numbers>

namespace epic {
namespace {

// The dimension index at which NUM_ROTATIONS full turns fit in the original context.
double CorrectionDim(double num_rotations, double dim, double base, double max_positions) {
  return dim * std::log(max_positions / (num_rotations * 2.0 * std::numbers::pi)) / (2.0 * std::log(base));
}

}  // namespace

RopeTable MakeRopeTable(const ModelConfig& c) {
  const int64_t dim = c.qk_rope_head_dim;
  const int64_t half = dim / 2;
  const RopeScaling& rs = c.rope_scaling;
  RopeTable table;
  table.inv_freq.resize(static_cast<size_t>(half));
  for (int64_t i = 0; i < half; ++i) {
    table.inv_freq[i] = 1.0 / std::pow(c.rope_theta, static_cast<double>(2 * i) / static_cast<double>(dim));
  }
  if (rs.type == RopeScaling::Type::kLinear) {
    for (double& f : table.inv_freq) f /= rs.factor;
  } else if (rs.type == RopeScaling::Type::kYarn) {
    const double max_pos = static_cast<double>(rs.original_max_position_embeddings);
    double low = std::floor(CorrectionDim(rs.beta_fast, dim, c.rope_theta, max_pos));
    double high = std::ceil(CorrectionDim(rs.beta_slow, dim, c.rope_theta, max_pos));
    low = std::max(low, 0.0);
    high = std::min(high, static_cast<double>(dim - 1));
    if (low == high) high += 0.001;  // avoid a zero-width ramp
    for (int64_t i = 0; i < half; ++i) {
      const double ramp = std::clamp((static_cast<double>(i) - low) / (high - low), 0.0, 1.0);
      const double extrapolation = 1.0 - ramp;  // weight of the original frequency
      const double original = table.inv_freq[i];
      table.inv_freq[i] = original / rs.factor * (1.0 - extrapolation) + original * extrapolation;
    }
    table.mscale = YarnMscale(rs.factor, rs.mscale) / YarnMscale(rs.factor, rs.mscale_all_dim);
  }
  return table;
}

}  // namespace epic
