// What the CUDA runtime can see. Compiled only when nvcc is found.
#pragma once

#include <string>

#include "common/status.h"

namespace epic::cuda {

// The number of CUDA devices; FAILED_PRECONDITION with the runtime's own message
// when there is none (no GPU, no driver), as on machines built without one.
StatusOr<int> DeviceCount();

// "NVIDIA H100 80GB HBM3, sm_90, 79.1 GiB" for device INDEX.
StatusOr<std::string> DeviceName(int index);

// The streaming multiprocessors of the current device (how many blocks fill it).
StatusOr<int> MultiprocessorCount();

// Waits for every kernel launched so far and returns the first fault any of them raised.
Status Synchronize();

}  // namespace epic::cuda
