#include "worker/device.h"

#ifdef EPIC_HAVE_CUDA
#include "kernels/cuda/device.h"
#endif

namespace epic {

Status CheckDevice(const std::string& device) {
  if (device == "cpu") return OkStatus();
  if (device != "cuda") return InvalidArgumentError("unknown device '" + device + "' (cpu or cuda)");
#ifdef EPIC_HAVE_CUDA
  StatusOr<int> count = cuda::DeviceCount();
  if (!count.ok()) return FailedPreconditionError("--device cuda: " + count.status().message());
  StatusOr<std::string> name = cuda::DeviceName(0);
  return FailedPreconditionError("--device cuda: found " + std::to_string(*count) + " GPU(s) (" +
                                 (name.ok() ? *name : name.status().message()) +
                                 "), but the CUDA model backend is not built yet; use --device cpu");
#else
  return FailedPreconditionError(
      "--device cuda: this build has no CUDA support (nvcc was not found when it was configured)");
#endif
}

}  // namespace epic
