// Devices in a build without CUDA: only the CPU.
#include "worker/compute.h"

namespace epic {

bool DeviceBuilt(ComputeDevice device) { return device == ComputeDevice::kCpu; }

Status DeviceAvailable(ComputeDevice device) {
  if (device == ComputeDevice::kCpu) return OkStatus();
  return FailedPreconditionError("this build has no CUDA support (nvcc was not found when it was configured)");
}

StatusOr<std::unique_ptr<ComputeBackend>> MakeDeviceBackend(ComputeDevice, const ModelConfig&, const ModelWeights&,
                                                            const RopeTable&, const cpu::GateParams&,
                                                            const ComputeShard&, const ProgressFn&) {
  return FailedPreconditionError("this build has no CUDA support");
}

}  // namespace epic
