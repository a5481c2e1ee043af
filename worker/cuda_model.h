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
#include "parallel/communicator.h"
#include "parallel/dispatch.h"
#include "parallel/expert_placement.h"
#include "worker/checkpoint.h"
#include "worker/device_step.h"
#include "worker/latent_cache.h"
#include "worker/model_config.h"
#include "worker/rope.h"
#include "worker/weights.h"

namespace epic {

using CudaShard = DeviceShard;

class CudaForward final : public DeviceStep {
 public:
  // Copies WEIGHTS (this rank's part: its heads, its share of the dense MLPs, the
  // experts of its slots in the order EXPERT_SLOTS gives per layer) to the device,
  // reporting bytes with PROGRESS. RESOURCE_EXHAUSTED when the GPU cannot hold them.
  // With several ranks the step follows Model::Forward's split: heads, token blocks,
  // expert slots and vocabulary rows, exchanging device buffers over SHARD.comm.
  static StatusOr<std::unique_ptr<CudaForward>> Create(const ModelConfig& config, const ModelWeights& weights,
                                                       const std::vector<std::vector<int32_t>>& expert_slots,
                                                       const RopeTable& rope, const cpu::GateParams& gate,
                                                       const CudaShard& shard, const ProgressFn& progress);
  ~CudaForward() override;

  // One step, with Model::Forward's contract; TOKENS is the batch flattened and checked.
  // The cache's rows are allocated on the device at its first step. FORM: kAuto expands
  // K/V (the expanded MLA form) when that costs fewer multiply-adds for every sequence
  // of the step, as a prefill does, and otherwise absorbs.
  Status Forward(std::span<SequenceStep> batch, const StepTokens& tokens, LatentCache* cache,
                 std::vector<float>* logits, ExpertCounts* counts, AttentionForm form) override;

  // The experts of this rank's slots change (Model::ApplyPlacement, every rank together)
  // to NEXT's. Per layer and new slot: KEPT is the old slot whose expert it keeps (-1 for
  // a new one) and WEIGHTS the new one's host weights. New experts are copied to the
  // device before anything changes, so a failure leaves the step as it was; the memory
  // of dropped experts is freed. Then set_placement must name the model's copy of NEXT.
  Status ChangeExperts(const parallel::ExpertPlacement& next, const std::vector<std::vector<int>>& kept,
                       const std::vector<std::vector<MlpWeights>>& weights) override;
  void set_placement(const parallel::ExpertPlacement* placement) override;

  // Device bytes of the weights.
  int64_t weight_bytes() const;
  // The MoE exchanges' bytes and seconds since load (several ranks).
  const parallel::ExchangeStats& exchange_stats() const override;

 private:
  struct Impl;
  explicit CudaForward(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace epic
