// model.safetensors.index.json from the input, in a directory that holds a real two-shard
// checkpoint (epic-mkmodel's tiny preset), opened as the worker opens a checkpoint.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "fuzz/fuzz_support.h"
#include "worker/checkpoint.h"
#include "worker/random_checkpoint.h"

namespace {

const std::filesystem::path& CheckpointDir() {
  static const std::filesystem::path* dir = [] {
    auto* path = new std::filesystem::path(epic::fuzz::ScratchDir() / "checkpoint");
    auto config = epic::PresetConfig("tiny");
    EPIC_FUZZ_CHECK(config.ok());
    // The tiny preset cut to one dense and one MoE layer of 4 experts: a few dozen tensors.
    (*config)["num_hidden_layers"] = 2;
    (*config)["first_k_dense_replace"] = 1;
    (*config)["n_routed_experts"] = 4;
    (*config)["num_experts_per_tok"] = 2;
    (*config)["n_group"] = 2;
    (*config)["topk_group"] = 1;
    epic::RandomCheckpointOptions options;
    options.shards = 2;
    EPIC_FUZZ_CHECK(epic::WriteRandomCheckpoint(*config, *path, options).ok());
    return path;
  }();
  return *dir;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::filesystem::path& dir = CheckpointDir();
  epic::fuzz::WriteFile(dir / "model.safetensors.index.json",
                        std::string_view(reinterpret_cast<const char*>(data), size));
  auto checkpoint = epic::Checkpoint::Open(dir);
  if (!checkpoint.ok()) return 0;
  // Open checked every tensor the config needs: each is there, inside a mapped file.
  for (const epic::ExpectedTensor& e : epic::ExpectedTensors((*checkpoint)->config())) {
    const epic::TensorView* view = (*checkpoint)->Find(e.name);
    EPIC_FUZZ_CHECK(view != nullptr && view->shape == e.shape);
    if (view->nbytes > 0) {
      volatile std::byte last = view->data[view->nbytes - 1];  // inside the mapping
      (void)last;
    }
  }
  EPIC_FUZZ_CHECK((*checkpoint)->num_files() >= 1);
  return 0;
}
