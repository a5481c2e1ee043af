// The forward step on one GPU: the model's weights resident on the device in BF16
// (the router in F32), the latent cache as a paged BF16 pool there, and every layer
// run with kernels/cuda. Model::Forward hands its steps here when the model was
// loaded with ComputeDevice::kCuda; the CPU step is the reference it is tested against.
// A plain C++ header, compiled only in builds with CUDA.
#pragma once

#include <memory>
#include <span>
#include <vector>

#include "common/status.h"
#include "kernels/cpu/gating.h"
#include "worker/checkpoint.h"
#include "worker/latent_cache.h"
#include "worker/model_config.h"
#include "worker/rope.h"
#include "worker/weights.h"

namespace epic {

struct SequenceStep;
struct StepTokens;
struct ExpertCounts;

class CudaForward {
 public:
  // Copies WEIGHTS (one rank's whole model: every head, every expert, in the slot order
  // EXPERT_SLOTS gives per layer) to the device, reporting bytes with PROGRESS.
  // RESOURCE_EXHAUSTED when the GPU cannot hold them.
  static StatusOr<std::unique_ptr<CudaForward>> Create(const ModelConfig& config, const ModelWeights& weights,
                                                       const std::vector<std::vector<int32_t>>& expert_slots,
                                                       const RopeTable& rope, const cpu::GateParams& gate,
                                                       const ProgressFn& progress);
  ~CudaForward();

  // One step, with Model::Forward's contract; TOKENS is the batch flattened and checked.
  // The cache's rows are allocated on the device at its first step.
  Status Forward(std::span<SequenceStep> batch, const StepTokens& tokens, LatentCache* cache,
                 std::vector<float>* logits, ExpertCounts* counts);

  // Device bytes of the weights.
  int64_t weight_bytes() const;

 private:
  struct Impl;
  explicit CudaForward(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace epic
