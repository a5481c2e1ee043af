// Writes NumPy .npy files (format 1.0), so that logits can be read with numpy.load.
#pragma once

#include <cstdint>
#include <filesystem>
#include <vector>

#include "common/status.h"

namespace epic {

// DATA is row-major float32 of SHAPE.
Status WriteNpyFloat32(const std::filesystem::path& path, const std::vector<int64_t>& shape,
                       const float* data);

}  // namespace epic
