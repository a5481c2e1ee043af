#include "kernels/cuda/ops.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <initializer_list>
#include <string>

#include "kernels/cuda/check.h"
#include "kernels/cuda/common.cuh"

namespace epic::cuda {
namespace {

using detail::BlockSum;
using detail::CheckPointers;
using detail::kFullMask;
using detail::kThreads;
using detail::kWarps;
using detail::Str;
using detail::StrideBlocks;

// Rows of width N at stride LD, one block each.
Status CheckRows(const char* op, int64_t rows, int64_t n, int64_t ld, const char* ld_name) {
  if (rows < 0 || n < 0) return InvalidArgumentError(std::string(op) + ": " + Str(rows) + " rows of width " + Str(n));
  if (ld < n) return InvalidArgumentError(std::string(op) + ": " + ld_name + " " + Str(ld) + " < width " + Str(n));
  if (rows > INT_MAX) return InvalidArgumentError(std::string(op) + ": " + Str(rows) + " rows exceed one grid");
  return OkStatus();
}


__global__ void RmsNormKernel(const float* x, int64_t n, int64_t ldx, const float* weight, float eps, float* out,
                              int64_t ldo) {
  __shared__ double partial[kWarps];
  const float* xr = x + static_cast<int64_t>(blockIdx.x) * ldx;
  float* o = out + static_cast<int64_t>(blockIdx.x) * ldo;
  // Squares of F32 values are exact in double, so only the order of the sum differs
  // from the CPU's.
  double sum = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const double v = xr[i];
    sum += v * v;
  }
  sum = BlockSum(sum, partial);
  const float inv = static_cast<float>(1.0 / sqrt(sum / static_cast<double>(n) + eps));
  // Every read of this row is done (BlockSum synchronised), so writing in place is safe.
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) o[i] = weight[i] * (xr[i] * inv);
}

__global__ void RopeKernel(RopeRows rows, const int64_t* positions, const double* inv_freq, int64_t pairs,
                           double mscale) {
  const int64_t total = rows.tokens * rows.slices * pairs;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < total; k += step) {
    const int64_t i = k % pairs;
    const int64_t slice = (k / pairs) % rows.slices;
    const int64_t t = k / (pairs * rows.slices);
    float* p = rows.x + t * rows.ld + rows.offset + slice * rows.slice_stride + 2 * i;
    // Double precision, as on the CPU, so that long positions keep their phase.
    double sin_angle, cos_angle;
    sincos(static_cast<double>(positions[t]) * inv_freq[i], &sin_angle, &cos_angle);
    const double c = cos_angle * mscale;
    const double s = sin_angle * mscale;
    const double a = p[0];
    const double b = p[1];
    // Explicit roundings keep nvcc from fusing into FMAs the CPU does not use.
    p[0] = static_cast<float>(__dsub_rn(__dmul_rn(a, c), __dmul_rn(b, s)));
    p[1] = static_cast<float>(__dadd_rn(__dmul_rn(b, c), __dmul_rn(a, s)));
  }
}

__global__ void SiluMulKernel(const float* gate, const float* up, int64_t rows, int64_t n, int64_t ld, float* out,
                              int64_t ldo) {
  const int64_t total = rows * n;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < total; k += step) {
    const int64_t r = k / n;
    const int64_t i = k % n;
    const float g = gate[r * ld + i];
    out[r * ldo + i] = g / (1.0f + expf(-g)) * up[r * ld + i];
  }
}

__device__ float ToFloat(float v) { return v; }
__device__ float ToFloat(uint16_t bf16) { return __uint_as_float(static_cast<uint32_t>(bf16) << 16); }

template <typename T>
__global__ void GatherKernel(const int32_t* token_ids, const T* table, int64_t vocab, int64_t n, float* out,
                             int64_t ldo) {
  const int64_t id = token_ids[blockIdx.x];
  float* o = out + static_cast<int64_t>(blockIdx.x) * ldo;
  if (id < 0 || id >= vocab) {
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) o[i] = __int_as_float(0x7fc00000);  // NaN
    return;
  }
  const T* row = table + id * n;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) o[i] = ToFloat(row[i]);
}

struct Best {
  float value;
  int index;  // -1: nothing seen yet
};

// The lower index wins ties, whichever side it comes from, so the tree reduction
// gives the sequential scan's answer.
__device__ Best Better(Best a, Best b) {
  if (a.index < 0) return b;
  if (b.index < 0) return a;
  if (b.value > a.value || (b.value == a.value && b.index < a.index)) return b;
  return a;
}

__device__ Best WarpBest(Best best) {
  for (int o = 16; o > 0; o >>= 1) {
    const Best other{__shfl_down_sync(kFullMask, best.value, o), __shfl_down_sync(kFullMask, best.index, o)};
    best = Better(best, other);
  }
  return best;
}

__global__ void ArgMaxKernel(const float* x, int64_t n, int64_t ld, int32_t* out) {
  __shared__ Best warp_best[kWarps];
  const float* row = x + static_cast<int64_t>(blockIdx.x) * ld;
  // The sequential scan compares against index 0 first and nothing beats a NaN there;
  // elsewhere a NaN never compares greater, so it is skipped.
  if (isnan(row[0])) {
    if (threadIdx.x == 0) out[blockIdx.x] = 0;
    return;  // the whole block leaves together
  }
  Best best{0.0f, -1};
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const float v = row[i];
    if (!isnan(v)) best = Better(best, Best{v, static_cast<int>(i)});
  }
  best = WarpBest(best);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (lane == 0) warp_best[warp] = best;
  __syncthreads();
  if (warp == 0) {
    best = WarpBest(lane < kWarps ? warp_best[lane] : Best{0.0f, -1});
    if (lane == 0) out[blockIdx.x] = best.index;
  }
}

}  // namespace

Status RmsNorm(const float* x, int64_t rows, int64_t n, int64_t ldx, const float* weight, float eps, float* out,
               int64_t ldo, cudaStream_t stream) {
  EPIC_RETURN_IF_ERROR(CheckRows("RmsNorm", rows, n, ldx, "ldx"));
  EPIC_RETURN_IF_ERROR(CheckRows("RmsNorm", rows, n, ldo, "ldo"));
  if (x == out && ldx != ldo) {
    return InvalidArgumentError("RmsNorm: in place with ldx " + Str(ldx) + " != ldo " + Str(ldo));
  }
  if (rows == 0 || n == 0) return OkStatus();
  EPIC_RETURN_IF_ERROR(CheckPointers("RmsNorm", {x, weight, out}));
  RmsNormKernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(x, n, ldx, weight, eps, out, ldo);
  EPIC_CUDA_RETURN_IF_LAUNCH_FAILED("RmsNormKernel");
  return OkStatus();
}

StatusOr<RopeFrequencies> RopeFrequencies::FromHost(const std::vector<double>& inv_freq, double mscale) {
  RopeFrequencies freq;
  EPIC_ASSIGN_OR_RETURN(freq.inv_freq, DeviceBuffer<double>::FromHost(inv_freq));
  freq.mscale = mscale;
  return StatusOr<RopeFrequencies>(std::move(freq));
}

Status ApplyRope(const RopeRows& rows, const int64_t* positions, const RopeFrequencies& freq, cudaStream_t stream) {
  const int64_t pairs = freq.pairs();
  const int64_t width = 2 * pairs;
  if (rows.tokens < 0 || rows.slices < 0 || rows.offset < 0 || rows.slice_stride < 0) {
    return InvalidArgumentError("ApplyRope: negative size (tokens " + Str(rows.tokens) + ", slices " +
                                Str(rows.slices) + ", offset " + Str(rows.offset) + ", slice_stride " +
                                Str(rows.slice_stride) + ")");
  }
  if (rows.slices > 1 && rows.slice_stride < width) {
    return InvalidArgumentError("ApplyRope: slice_stride " + Str(rows.slice_stride) + " < rope width " + Str(width));
  }
  if (rows.tokens == 0 || rows.slices == 0 || pairs == 0) return OkStatus();
  const int64_t row_end = rows.offset + (rows.slices - 1) * rows.slice_stride + width;
  if (row_end > rows.ld) {
    return InvalidArgumentError("ApplyRope: the last slice ends at " + Str(row_end) + " past ld " + Str(rows.ld));
  }
  EPIC_RETURN_IF_ERROR(CheckPointers("ApplyRope", {rows.x, positions}));
  RopeKernel<<<StrideBlocks(rows.tokens * rows.slices * pairs), kThreads, 0, stream>>>(
      rows, positions, freq.inv_freq.data(), pairs, freq.mscale);
  EPIC_CUDA_RETURN_IF_LAUNCH_FAILED("RopeKernel");
  return OkStatus();
}

namespace {

// One block per gathered row; T is the width of each copy.
template <typename T>
__global__ void GatherRowBytesKernel(const char* x, int64_t row_bytes, const int32_t* rows, char* out) {
  const int64_t i = blockIdx.x;
  const T* src = reinterpret_cast<const T*>(x + static_cast<int64_t>(rows[i]) * row_bytes);
  T* dst = reinterpret_cast<T*>(out + i * row_bytes);
  const int64_t words = row_bytes / static_cast<int64_t>(sizeof(T));
  for (int64_t w = threadIdx.x; w < words; w += blockDim.x) dst[w] = src[w];
}

__global__ void AddKernel(float* y, const float* x, int64_t n) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) y[i] += x[i];
}

}  // namespace

Status GatherRowBytes(const void* x, int64_t row_bytes, const int32_t* rows, int64_t n, void* out,
                      cudaStream_t stream) {
  if (row_bytes < 0 || n < 0 || n > INT_MAX) {
    return InvalidArgumentError("GatherRowBytes: " + Str(n) + " rows of " + Str(row_bytes) + " bytes");
  }
  if (n == 0 || row_bytes == 0) return OkStatus();
  EPIC_RETURN_IF_ERROR(CheckPointers("GatherRowBytes", {x, rows, out}));
  const auto aligned = [&](uintptr_t a) {
    return row_bytes % static_cast<int64_t>(a) == 0 && reinterpret_cast<uintptr_t>(x) % a == 0 &&
           reinterpret_cast<uintptr_t>(out) % a == 0;
  };
  const auto* src = static_cast<const char*>(x);
  auto* dst = static_cast<char*>(out);
  const unsigned blocks = static_cast<unsigned>(n);
  if (aligned(16)) {
    GatherRowBytesKernel<uint4><<<blocks, kThreads, 0, stream>>>(src, row_bytes, rows, dst);
  } else if (aligned(4)) {
    GatherRowBytesKernel<uint32_t><<<blocks, kThreads, 0, stream>>>(src, row_bytes, rows, dst);
  } else {
    GatherRowBytesKernel<char><<<blocks, kThreads, 0, stream>>>(src, row_bytes, rows, dst);
  }
  EPIC_CUDA_RETURN_IF_LAUNCH_FAILED("GatherRowBytesKernel");
  return OkStatus();
}

Status AddInPlace(float* y, const float* x, int64_t n, cudaStream_t stream) {
  if (n < 0) return InvalidArgumentError("AddInPlace: " + Str(n) + " values");
  if (n == 0) return OkStatus();
  EPIC_RETURN_IF_ERROR(CheckPointers("AddInPlace", {y, x}));
  AddKernel<<<StrideBlocks(n), kThreads, 0, stream>>>(y, x, n);
  EPIC_CUDA_RETURN_IF_LAUNCH_FAILED("AddKernel");
  return OkStatus();
}

Status SiluMul(const float* gate, const float* up, int64_t rows, int64_t n, int64_t ld, float* out, int64_t ldo,
               cudaStream_t stream) {
  EPIC_RETURN_IF_ERROR(CheckRows("SiluMul", rows, n, ld, "ld"));
  EPIC_RETURN_IF_ERROR(CheckRows("SiluMul", rows, n, ldo, "ldo"));
  if (rows == 0 || n == 0) return OkStatus();
  EPIC_RETURN_IF_ERROR(CheckPointers("SiluMul", {gate, up, out}));
  SiluMulKernel<<<StrideBlocks(rows * n), kThreads, 0, stream>>>(gate, up, rows, n, ld, out, ldo);
  EPIC_CUDA_RETURN_IF_LAUNCH_FAILED("SiluMulKernel");
  return OkStatus();
}

namespace {

template <typename T>
Status Gather(const char* op, const int32_t* token_ids, int64_t tokens, const T* table, int64_t vocab, int64_t n,
              float* out, int64_t ldo, cudaStream_t stream) {
  EPIC_RETURN_IF_ERROR(CheckRows(op, tokens, n, ldo, "ldo"));
  if (vocab < 0) return InvalidArgumentError(std::string(op) + ": vocab " + Str(vocab));
  if (tokens == 0 || n == 0) return OkStatus();
  EPIC_RETURN_IF_ERROR(CheckPointers(op, {token_ids, out}));
  if (vocab > 0) EPIC_RETURN_IF_ERROR(CheckPointers(op, {table}));
  GatherKernel<T><<<static_cast<unsigned>(tokens), kThreads, 0, stream>>>(token_ids, table, vocab, n, out, ldo);
  EPIC_CUDA_RETURN_IF_LAUNCH_FAILED("GatherKernel");
  return OkStatus();
}

}  // namespace

Status GatherRows(const int32_t* token_ids, int64_t tokens, const float* table, int64_t vocab, int64_t n,
                  float* out, int64_t ldo, cudaStream_t stream) {
  return Gather("GatherRows", token_ids, tokens, table, vocab, n, out, ldo, stream);
}

Status GatherRowsBf16(const int32_t* token_ids, int64_t tokens, const uint16_t* table, int64_t vocab, int64_t n,
                      float* out, int64_t ldo, cudaStream_t stream) {
  return Gather("GatherRowsBf16", token_ids, tokens, table, vocab, n, out, ldo, stream);
}

Status ArgMaxRows(const float* x, int64_t rows, int64_t n, int64_t ld, int32_t* out, cudaStream_t stream) {
  EPIC_RETURN_IF_ERROR(CheckRows("ArgMaxRows", rows, n, ld, "ld"));
  if (rows == 0) return OkStatus();
  if (n < 1 || n > INT32_MAX) return InvalidArgumentError("ArgMaxRows: width " + Str(n) + " outside [1, 2^31)");
  EPIC_RETURN_IF_ERROR(CheckPointers("ArgMaxRows", {x, out}));
  ArgMaxKernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(x, n, ld, out);
  EPIC_CUDA_RETURN_IF_LAUNCH_FAILED("ArgMaxKernel");
  return OkStatus();
}

}  // namespace epic::cuda
