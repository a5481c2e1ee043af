// CUDA runtime errors as epic::Status. For .cu files only: it includes the CUDA headers.
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "common/status.h"

namespace epic::cuda {

// OK for cudaSuccess; otherwise RESOURCE_EXHAUSTED (out of memory), FAILED_PRECONDITION
// (no usable device or driver) or INTERNAL, saying WHAT failed, where, and the
// runtime's own error name and text.
Status CudaStatus(cudaError_t err, const std::string& what, const char* file, int line);

}  // namespace epic::cuda

// Returns the Status of a failed runtime call.
#define EPIC_CUDA_RETURN_IF_ERROR(call, what) \
  EPIC_RETURN_IF_ERROR(::epic::cuda::CudaStatus((call), (what), __FILE__, __LINE__))

// After a kernel launch: a bad configuration, or an earlier asynchronous fault, shows
// here. Faults in this kernel itself show at the next synchronising call.
#define EPIC_CUDA_RETURN_IF_LAUNCH_FAILED(kernel_name) \
  EPIC_CUDA_RETURN_IF_ERROR(cudaGetLastError(), std::string("launch of ") + (kernel_name))
