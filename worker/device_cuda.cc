// Devices in a build with CUDA: the CPU and the CUDA step (worker/cuda_model.h).
#include "kernels/cuda/device.h"
#include "worker/cuda_model.h"
#include "worker/device_step.h"

namespace epic {

bool DeviceBuilt(ComputeDevice) { return true; }

Status DeviceAvailable(ComputeDevice device) {
  if (device == ComputeDevice::kCpu) return OkStatus();
  StatusOr<int> count = cuda::DeviceCount();
  if (!count.ok()) return FailedPreconditionError(count.status().message());
  return OkStatus();
}

StatusOr<std::unique_ptr<DeviceStep>> MakeDeviceStep(ComputeDevice device, const ModelConfig& config,
                                                     const ModelWeights& weights,
                                                     const std::vector<std::vector<int32_t>>& expert_slots,
                                                     const RopeTable& rope, const cpu::GateParams& gate,
                                                     const DeviceShard& shard, const ProgressFn& progress) {
  if (device != ComputeDevice::kCuda) return InvalidArgumentError("the CPU step is the model's own");
  EPIC_ASSIGN_OR_RETURN(std::unique_ptr<CudaForward> step,
                        CudaForward::Create(config, weights, expert_slots, rope, gate, shard, progress));
  return std::unique_ptr<DeviceStep>(std::move(step));
}

}  // namespace epic
