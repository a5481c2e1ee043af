// Choosing the compute device at start-up: the one place that knows whether this
// build has CUDA.
#pragma once

#include <string>

#include "common/status.h"

namespace epic {

// OK for "cpu". For "cuda": FAILED_PRECONDITION saying why it cannot run here (no
// CUDA in this build, no GPU visible, or the CUDA model backend not built yet).
// INVALID_ARGUMENT for any other name.
Status CheckDevice(const std::string& device);

}  // namespace epic
