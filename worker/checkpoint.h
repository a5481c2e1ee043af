// A Hugging Face DeepSeek checkpoint directory: config.json plus one safetensors file
// or several shards listed in model.safetensors.index.json. Opening it maps every
// file and checks that each tensor the config requires is present with a float
// dtype epic computes with (BF16, F16, F32) and the shape the config implies.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "common/status.h"
#include "worker/model_config.h"
#include "worker/safetensors.h"

namespace epic {

struct ExpectedTensor {
  std::string name;
  std::vector<int64_t> shape;
};

// Every tensor CONFIG requires, by its Hugging Face name, in layer order. Used by the
// loader to validate and by epic-mkmodel to write.
std::vector<ExpectedTensor> ExpectedTensors(const ModelConfig& config);

// Name helpers: LayerTensor(3, "self_attn.o_proj") = "model.layers.3.self_attn.o_proj.weight".
std::string LayerTensor(int64_t layer, const std::string& module);
std::string ExpertTensor(int64_t layer, int64_t expert, const std::string& proj);

class Checkpoint {
 public:
  // Reads DIR/config.json, maps the safetensors files and validates every tensor.
  static StatusOr<std::unique_ptr<Checkpoint>> Open(const std::filesystem::path& dir);

  const ModelConfig& config() const { return config_; }
  const std::filesystem::path& dir() const { return dir_; }
  // nullptr when absent.
  const TensorView* Find(const std::string& name) const;
  // The named tensor; REQUIRES: it was among ExpectedTensors (so Open checked it).
  const TensorView& Get(const std::string& name) const;
  int64_t total_bytes() const { return total_bytes_; }
  int num_files() const { return static_cast<int>(files_.size()); }
  // See SafetensorsFile::ReleaseResidentPages; views stay valid.
  void ReleaseResidentPages() const;

 private:
  Checkpoint() = default;
  Status Validate() const;

  std::filesystem::path dir_;
  ModelConfig config_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, const TensorView*> tensors_;
  int64_t total_bytes_ = 0;
};

// Progress of long work: done and total in bytes.
using ProgressFn = std::function<void(int64_t done, int64_t total)>;

}  // namespace epic
