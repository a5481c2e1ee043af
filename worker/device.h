// Choosing the compute device at start-up: the one place that knows whether this
// build has CUDA.
#pragma once

#include <string>

#include "common/status.h"

namespace epic {

enum class ComputeDevice { kCpu, kCuda };

// "cpu", or "cuda" when this build has CUDA and the machine a GPU; otherwise
// FAILED_PRECONDITION saying why cuda cannot run here (no CUDA in this build, no GPU
// visible). INVALID_ARGUMENT for any other name.
StatusOr<ComputeDevice> ResolveDevice(const std::string& device);

}  // namespace epic
