// DeepSeek's rotary embedding frequencies, with linear or YaRN scaling.
#pragma once

#include <vector>

#include "worker/model_config.h"

namespace epic {

struct RopeTable {
  std::vector<double> inv_freq;  // qk_rope_head_dim / 2 frequencies
  double mscale = 1.0;           // multiplies cos and sin (YaRN)
};

// YaRN (DeepseekV2YarnRotaryEmbedding): blends interpolated and original frequencies
// with a linear ramp between the correction dims of beta_fast and beta_slow.
RopeTable MakeRopeTable(const ModelConfig& config);

}  // namespace epic
