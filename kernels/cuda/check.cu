#include "kernels/cuda/check.h"

#include <utility>

namespace epic::cuda {

Status CudaStatus(cudaError_t err, const std::string& what, const char* file, int line) {
  if (err == cudaSuccess) return OkStatus();
  // Consume the runtime's record of this error, so that the next launch check does not
  // report it again as its own (sticky errors stay whatever is done).
  cudaGetLastError();
  std::string message = what + ": " + cudaGetErrorName(err) + ": " + cudaGetErrorString(err) + " (" + file +
                        ":" + std::to_string(line) + ")";
  switch (err) {
    case cudaErrorMemoryAllocation:
      return ResourceExhaustedError(std::move(message));
    case cudaErrorNoDevice:
    case cudaErrorInsufficientDriver:
    case cudaErrorInvalidDevice:
    case cudaErrorInitializationError:
      return FailedPreconditionError(std::move(message));
    default:
      return InternalError(std::move(message));
  }
}

}  // namespace epic::cuda
