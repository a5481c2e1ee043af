// Random checkpoints in exactly the Hugging Face DeepSeek layout, for tests and
// benchmarks. Values depend only on (seed, tensor name), so the same model written
// as one file or as shards holds the same weights. Linear weights are uniform with
// variance 1/fan_in, so activations stay O(1) through the layers.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/status.h"
#include "worker/checkpoint.h"
#include "worker/safetensors.h"

namespace epic {

// Names of the presets PresetConfig knows, for --help.
std::vector<std::string> PresetNames();
// The config.json of a preset: tiny, v2-160, v2-lite-shape, v3-tiny.
StatusOr<nlohmann::json> PresetConfig(const std::string& name);

struct RandomCheckpointOptions {
  uint64_t seed = 0;
  DType dtype = DType::kBF16;  // BF16, F16 or F32
  int shards = 1;              // > 1 writes model-0000K-of-0000N.safetensors + an index
  ProgressFn progress;         // optional
};

// Validates CONFIG (as the loader would) and writes config.json and the weights to OUT.
Status WriteRandomCheckpoint(const nlohmann::json& config, const std::filesystem::path& out,
                             const RandomCheckpointOptions& options);

}  // namespace epic
