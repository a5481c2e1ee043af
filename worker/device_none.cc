// Devices in a build without CUDA: only the CPU.
#include "worker/device_step.h"

namespace epic {

bool DeviceBuilt(ComputeDevice device) { return device == ComputeDevice::kCpu; }

Status DeviceAvailable(ComputeDevice device) {
  if (device == ComputeDevice::kCpu) return OkStatus();
  return FailedPreconditionError("this build has no CUDA support (nvcc was not found when it was configured)");
}

StatusOr<std::unique_ptr<DeviceStep>> MakeDeviceStep(ComputeDevice, const ModelConfig&, const ModelWeights&,
                                                     const std::vector<std::vector<int32_t>>&, const RopeTable&,
                                                     const cpu::GateParams&, const DeviceShard&, const ProgressFn&) {
  return FailedPreconditionError("this build has no CUDA support");
}

}  // namespace epic
