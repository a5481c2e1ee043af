// Devices in a build with CUDA: the CPU and the CUDA backend (compute_cuda.cc).
#include "kernels/cuda/device.h"
#include "worker/compute.h"

namespace epic {

StatusOr<std::unique_ptr<ComputeBackend>> MakeCudaBackend(const ModelConfig& config, const ModelWeights& weights,
                                                          const RopeTable& rope, const cpu::GateParams& gate,
                                                          const ComputeShard& shard, const ProgressFn& progress);

bool DeviceBuilt(ComputeDevice) { return true; }

Status DeviceAvailable(ComputeDevice device) {
  if (device == ComputeDevice::kCpu) return OkStatus();
  StatusOr<int> count = cuda::DeviceCount();
  if (!count.ok()) return FailedPreconditionError(count.status().message());
  return OkStatus();
}

StatusOr<std::unique_ptr<ComputeBackend>> MakeDeviceBackend(ComputeDevice device, const ModelConfig& config,
                                                            const ModelWeights& weights, const RopeTable& rope,
                                                            const cpu::GateParams& gate, const ComputeShard& shard,
                                                            const ProgressFn& progress) {
  if (device != ComputeDevice::kCuda) return InvalidArgumentError("the CPU backend is MakeCpuBackend's");
  return MakeCudaBackend(config, weights, rope, gate, shard, progress);
}

}  // namespace epic
