#include "worker/device.h"

#ifdef EPIC_HAVE_CUDA
#include "kernels/cuda/device.h"
#endif

namespace epic {

StatusOr<ComputeDevice> ResolveDevice(const std::string& device) {
  if (device == "cpu") return ComputeDevice::kCpu;
  if (device != "cuda") return InvalidArgumentError("unknown device '" + device + "' (cpu or cuda)");
#ifdef EPIC_HAVE_CUDA
  StatusOr<int> count = cuda::DeviceCount();
  if (!count.ok()) return FailedPreconditionError("--device cuda: " + count.status().message());
  return ComputeDevice::kCuda;
#else
  return FailedPreconditionError(
      "--device cuda: this build has no CUDA support (nvcc was not found when it was configured)");
#endif
}

}  // namespace epic
