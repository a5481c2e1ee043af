// The seam between Model and an accelerator: a step that runs on a device instead of
// the CPU. Model::Forward hands its steps to one when the model was loaded for that
// device, and tells it of placement changes; the CPU step is the reference it is tested
// against. Which devices a build has is decided in one file each (device_cuda.cc when
// nvcc was found, device_none.cc otherwise), so model code holds no #ifdef.
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
#include "worker/device.h"
#include "worker/latent_cache.h"
#include "worker/model_config.h"
#include "worker/rope.h"
#include "worker/weights.h"

namespace epic {

struct SequenceStep;
struct StepTokens;
struct ExpertCounts;
enum class AttentionForm;  // worker/model.h

// This rank's part of a job of several devices, as Model::Load split it.
struct DeviceShard {
  parallel::Communicator* comm = nullptr;  // over device buffers (NCCL); nullptr: a one-rank job
  const parallel::ExpertPlacement* placement = nullptr;  // routes the MoE exchange
  int64_t head_begin = 0, head_end = 0;    // this rank's attention heads
  int64_t vocab_begin = 0, vocab_end = 0;  // this rank's rows of lm_head
};

class DeviceStep {
 public:
  virtual ~DeviceStep() = default;

  // One step, with Model::Forward's contract; TOKENS is the batch flattened and checked.
  virtual Status Forward(std::span<SequenceStep> batch, const StepTokens& tokens, LatentCache* cache,
                         std::vector<float>* logits, ExpertCounts* counts, AttentionForm form) = 0;

  // The experts of this rank's slots change to NEXT's (Model::ApplyPlacement, every rank
  // together). Per layer and new slot: KEPT is the old slot whose expert it keeps (-1 for
  // a new one) and WEIGHTS the new one's host weights. A failure leaves the step as it
  // was. Then set_placement names the model's copy of NEXT.
  virtual Status ChangeExperts(const parallel::ExpertPlacement& next, const std::vector<std::vector<int>>& kept,
                               const std::vector<std::vector<MlpWeights>>& weights) = 0;
  virtual void set_placement(const parallel::ExpertPlacement* placement) = 0;

  // The MoE exchanges' bytes and seconds since load (several ranks).
  virtual const parallel::ExchangeStats& exchange_stats() const = 0;
};

// OK when this build has DEVICE's step and the machine has such a device; else
// FAILED_PRECONDITION saying which is missing. kCpu is always available.
Status DeviceAvailable(ComputeDevice device);
// Whether this build has DEVICE's step at all (a machine may still lack the device).
bool DeviceBuilt(ComputeDevice device);

// DEVICE's step over this rank's WEIGHTS (its heads, its share of the dense MLPs, the
// experts of its slots in the order EXPERT_SLOTS gives per layer), copied to the device
// with PROGRESS. RESOURCE_EXHAUSTED when the device cannot hold them.
StatusOr<std::unique_ptr<DeviceStep>> MakeDeviceStep(ComputeDevice device, const ModelConfig& config,
                                                     const ModelWeights& weights,
                                                     const std::vector<std::vector<int32_t>>& expert_slots,
                                                     const RopeTable& rope, const cpu::GateParams& gate,
                                                     const DeviceShard& shard, const ProgressFn& progress);

}  // namespace epic
