#include "worker/device.h"

#include "worker/compute.h"

namespace epic {

StatusOr<ComputeDevice> ResolveDevice(const std::string& device) {
  if (device == "cpu") return ComputeDevice::kCpu;
  if (device != "cuda") return InvalidArgumentError("unknown device '" + device + "' (cpu or cuda)");
  if (const Status s = DeviceAvailable(ComputeDevice::kCuda); !s.ok()) {
    return FailedPreconditionError("--device cuda: " + s.message());
  }
  return ComputeDevice::kCuda;
}

}  // namespace epic
