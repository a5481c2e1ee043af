// What the CUDA kernel files share: the block shape, block-wide reductions and the
// host-side argument checks. Included by .cu files only.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <string>

#include "common/status.h"

namespace epic::cuda::detail {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;

inline std::string Str(int64_t v) { return std::to_string(v); }

// Blocks for a grid-stride kernel over TOTAL elements: no more than fill any current GPU.
inline int StrideBlocks(int64_t total) {
  constexpr int64_t kMaxStrideBlocks = 65536;
  return static_cast<int>(std::clamp<int64_t>((total + kThreads - 1) / kThreads, 1, kMaxStrideBlocks));
}

inline Status CheckPointers(const char* op, std::initializer_list<const void*> pointers) {
  for (const void* p : pointers) {
    if (p == nullptr) return InvalidArgumentError(std::string(op) + ": null device pointer");
  }
  return OkStatus();
}

// The sum of V over the block, returned to every thread. SHARED: [kWarps].
__device__ inline double BlockSum(double v, double* shared) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(kFullMask, v, o);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? shared[lane] : 0.0;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(kFullMask, v, o);
    if (lane == 0) shared[0] = v;
  }
  __syncthreads();
  const double total = shared[0];
  __syncthreads();  // every thread has read it before a later call writes SHARED again
  return total;
}

}  // namespace epic::cuda::detail
