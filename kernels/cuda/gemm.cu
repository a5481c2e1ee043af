#include "kernels/cuda/gemm.h"

#include <cub/block/block_scan.cuh>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <string>
#include <utility>

#include "kernels/cuda/check.h"
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/mma.cuh"

namespace epic::cuda {
namespace {

using detail::CheckPointers;
using detail::kThreads;
using detail::Str;
using detail::StrideBlocks;

Status BlasStatus(cublasStatus_t s, const std::string& what) {
  if (s == CUBLAS_STATUS_SUCCESS) return OkStatus();
  const std::string text = what + ": cuBLAS " + cublasGetStatusName(s) + " (" + cublasGetStatusString(s) + ")";
  if (s == CUBLAS_STATUS_ALLOC_FAILED) return ResourceExhaustedError(text);
  if (s == CUBLAS_STATUS_NOT_INITIALIZED || s == CUBLAS_STATUS_ARCH_MISMATCH) return FailedPreconditionError(text);
  return InternalError(text);
}

cublasHandle_t Handle(Blas& blas) { return static_cast<cublasHandle_t>(blas.handle()); }

cudaDataType_t CudaType(DType t) { return t == DType::kBF16 ? CUDA_R_16BF : CUDA_R_32F; }

// BF16 products accumulate in F32 on tensor cores. F32 products stay F32: the pedantic
// compute type rules out TF32 and emulated forms, so the router's scores are the CPU's.
cublasComputeType_t ComputeType(DType t) {
  return t == DType::kBF16 ? CUBLAS_COMPUTE_32F : CUBLAS_COMPUTE_32F_PEDANTIC;
}

bool FitsInt(std::initializer_list<int64_t> values) {
  for (int64_t v : values) {
    if (v < 0 || v > INT_MAX) return false;
  }
  return true;
}

// --- The grouped expert product -------------------------------------------------

constexpr int kTileRows = 64;   // grouped rows per block
constexpr int kTileCols = 64;   // output columns per block
constexpr int kTileK = 32;      // k per shared-memory stage
constexpr int kTileLd = kTileK + 8;  // 80-byte rows: the fragment loads hit distinct banks
constexpr int kGemmThreads = 128;    // 4 warps, each 32 x 32 of the tile

constexpr int kMapThreads = 256;

// scratch[0] = the number of row tiles; then per tile its expert and first row, experts
// in order. One block: each thread counts one expert's tiles, a block scan places them.
__global__ void __launch_bounds__(kMapThreads)
    TileMapKernel(const int32_t* offsets, int num_experts, int capacity, int32_t* scratch) {
  using Scan = cub::BlockScan<int, kMapThreads>;
  __shared__ typename Scan::TempStorage temp;
  __shared__ int base;
  if (threadIdx.x == 0) base = 0;
  __syncthreads();
  for (int e0 = 0; e0 < num_experts; e0 += kMapThreads) {
    const int e = e0 + static_cast<int>(threadIdx.x);
    const int first_row = e < num_experts ? offsets[e] : 0;
    const int rows = e < num_experts ? offsets[e + 1] - first_row : 0;
    const int tiles = (rows + kTileRows - 1) / kTileRows;
    int first = 0, total = 0;
    Scan(temp).ExclusiveSum(tiles, first, total);
    first += base;
    for (int i = 0; i < tiles && first + i < capacity; ++i) {
      scratch[1 + 2 * (first + i)] = e;
      scratch[2 + 2 * (first + i)] = first_row + i * kTileRows;
    }
    __syncthreads();  // every thread has read base, and the scan's storage is free again
    if (threadIdx.x == 0) base += total;
    __syncthreads();
  }
  if (threadIdx.x == 0) scratch[0] = min(base, capacity);
}

// Copies a 64 x 32 tile of BF16 rows [row, row_end) x [k0, k0 + 32) of SRC (stride ld) to
// shared memory, zeros outside.
template <bool kVector>
__device__ void LoadTile(__nv_bfloat16* dst, const uint16_t* src, int64_t ld, int64_t row, int64_t row_end,
                         int64_t k0, int64_t k) {
  for (int v = threadIdx.x; v < kTileRows * (kTileK / 8); v += blockDim.x) {
    const int r = v / (kTileK / 8);
    const int part = v % (kTileK / 8);
    __nv_bfloat16* d = dst + r * kTileLd + part * 8;
    const int64_t col = k0 + part * 8;
    const uint16_t* s = src + (row + r) * ld + col;
    const bool in_rows = row + r < row_end;
    if (kVector && in_rows && col + 8 <= k) {
      *reinterpret_cast<uint4*>(d) = *reinterpret_cast<const uint4*>(s);
    } else {
      for (int i = 0; i < 8; ++i) {
        d[i] = in_rows && col + i < k ? __ushort_as_bfloat16(s[i]) : __float2bfloat16_rn(0.0f);
      }
    }
  }
}

template <bool kVector>
__global__ void __launch_bounds__(kGemmThreads)
    GroupedMatMulKernel(const uint16_t* x, int64_t ldx, const int32_t* offsets, GroupedWeights w, float* y,
                        int64_t ldy, const int32_t* tile_map) {
  __shared__ __align__(16) __nv_bfloat16 a_tile[kTileRows * kTileLd];
  __shared__ __align__(16) __nv_bfloat16 b_tile[kTileCols * kTileLd];
  const int tile = blockIdx.y;
  if (tile >= tile_map[0]) return;
  const int expert = tile_map[1 + 2 * tile];
  const int64_t row0 = tile_map[2 + 2 * tile];
  const int64_t row_end = offsets[expert + 1];
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kTileCols;
  const uint16_t* weights = w.experts[expert];
  const int warp = threadIdx.x / 32;
  const int wm = warp / 2, wn = warp % 2;

  float acc[2][4][4] = {};
  for (int64_t k0 = 0; k0 < w.k; k0 += kTileK) {
    LoadTile<kVector>(a_tile, x, ldx, row0, row_end, k0, w.k);
    LoadTile<kVector>(b_tile, weights, w.ld, n0, w.n, k0, w.k);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTileK; kk += 16) {
      uint32_t a[2][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) detail::LoadA(a[mt], a_tile + (wm * 32 + mt * 16) * kTileLd, kTileLd, kk);
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        uint32_t b[2];
        detail::LoadBRows(b, b_tile, kTileLd, wn * 32 + nt * 8, kk);
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) detail::MmaBf16(acc[mt][nt], a[mt], b);
      }
    }
    __syncthreads();
  }

  const int lane = threadIdx.x % 32;
  const int g = lane / 4, c = lane % 4;
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int64_t row = row0 + wm * 32 + mt * 16 + g + (i / 2) * 8;
        const int64_t col = n0 + wn * 32 + nt * 8 + 2 * c + (i % 2);
        if (row < row_end && col < w.n) y[row * ldy + col] = acc[mt][nt][i];
      }
    }
  }
}

__global__ void ToBf16Kernel(const float* x, int64_t rows, int64_t n, int64_t ldx, uint16_t* out, int64_t ldo) {
  const int64_t total = rows * n;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < total; k += step) {
    const int64_t r = k / n, i = k % n;
    out[r * ldo + i] = __bfloat16_as_ushort(__float2bfloat16_rn(x[r * ldx + i]));
  }
}

// One block per row slot; rows at or past *count are left alone.
__global__ void GatherRowsToBf16Kernel(const float* x, int64_t ldx, int64_t n, const int32_t* rows,
                                       const int32_t* count, uint16_t* out, int64_t ldo) {
  const int64_t r = blockIdx.x;
  if (count != nullptr && r >= *count) return;
  const float* src = x + static_cast<int64_t>(rows[r]) * ldx;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    out[r * ldo + i] = __bfloat16_as_ushort(__float2bfloat16_rn(src[i]));
  }
}


}  // namespace

DeviceMatrix DeviceMatrix::Rows(int64_t begin, int64_t count) const {
  DeviceMatrix m = *this;
  m.data = static_cast<const char*>(data) + begin * ld * ElementBytes();
  m.rows = count;
  return m;
}

StatusOr<std::unique_ptr<Blas>> Blas::Create(cudaStream_t stream) {
  std::unique_ptr<Blas> blas(new Blas());
  cublasHandle_t handle = nullptr;
  EPIC_RETURN_IF_ERROR(BlasStatus(cublasCreate(&handle), "cublasCreate"));
  blas->handle_ = handle;
  blas->stream_ = stream;
  EPIC_RETURN_IF_ERROR(BlasStatus(cublasSetStream(handle, stream), "cublasSetStream"));
  return StatusOr<std::unique_ptr<Blas>>(std::move(blas));
}

Blas::~Blas() {
  if (handle_ != nullptr) cublasDestroy(static_cast<cublasHandle_t>(handle_));
}

Status MatMul(Blas& blas, const void* x, int64_t m, int64_t ldx, const DeviceMatrix& w, float* y, int64_t ldy,
              bool accumulate) {
  constexpr const char* kOp = "MatMul";
  if (m < 0 || ldx < w.cols || ldy < w.rows || w.ld < w.cols || !FitsInt({m, ldx, ldy, w.rows, w.cols, w.ld})) {
    return InvalidArgumentError(std::string(kOp) + ": x [" + Str(m) + ", ld " + Str(ldx) + "], w [" + Str(w.rows) +
                                ", " + Str(w.cols) + ", ld " + Str(w.ld) + "], y ld " + Str(ldy));
  }
  if (m == 0 || w.rows == 0) return OkStatus();
  EPIC_RETURN_IF_ERROR(CheckPointers(kOp, {x, w.data, y}));
  const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
  const cudaDataType_t type = CudaType(w.type);
  return BlasStatus(cublasGemmEx(Handle(blas), CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(w.rows),
                                 static_cast<int>(m), static_cast<int>(w.cols), &alpha, w.data, type,
                                 static_cast<int>(w.ld), x, type, static_cast<int>(ldx), &beta, y, CUDA_R_32F,
                                 static_cast<int>(ldy), ComputeType(w.type), CUBLAS_GEMM_DEFAULT),
                    kOp);
}

Status BatchedMatMul(Blas& blas, const BatchedMatMulArgs& a) {
  constexpr const char* kOp = "BatchedMatMul";
  const DeviceMatrix& w = a.w;
  const int64_t in = a.transpose_w ? w.cols : w.rows;
  const int64_t out = a.transpose_w ? w.rows : w.cols;
  if (w.type != DType::kBF16 || a.m < 0 || a.batches < 0 || a.ldx < in || a.ldy < out || w.ld < w.cols ||
      !FitsInt({a.m, a.ldx, a.ldy, w.rows, w.cols, w.ld, a.batches})) {
    return InvalidArgumentError(std::string(kOp) + ": " + Str(a.batches) + " batches of x [" + Str(a.m) + ", ld " +
                                Str(a.ldx) + "], BF16 w [" + Str(w.rows) + ", " + Str(w.cols) + ", ld " + Str(w.ld) +
                                "], y ld " + Str(a.ldy));
  }
  if (a.m == 0 || a.batches == 0 || out == 0) return OkStatus();
  EPIC_RETURN_IF_ERROR(CheckPointers(kOp, {a.x, w.data, a.y}));
  const float alpha = 1.0f, beta = a.accumulate ? 1.0f : 0.0f;
  // Column-major view: y^T = op(w^T-as-stored) x^T.
  return BlasStatus(
      cublasGemmStridedBatchedEx(Handle(blas), a.transpose_w ? CUBLAS_OP_T : CUBLAS_OP_N, CUBLAS_OP_N,
                                 static_cast<int>(out), static_cast<int>(a.m), static_cast<int>(in), &alpha, w.data,
                                 CUDA_R_16BF, static_cast<int>(w.ld), a.w_stride, a.x, CUDA_R_16BF,
                                 static_cast<int>(a.ldx), a.x_stride, &beta, a.y, CUDA_R_32F, static_cast<int>(a.ldy),
                                 a.y_stride, static_cast<int>(a.batches), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
      kOp);
}

Status FoldQuery(Blas& blas, const MlaHeads& mla, const uint16_t* q, int64_t tokens, int64_t ldq,
                 int64_t q_head_stride, float* q_latent, int64_t ldy) {
  const int64_t lora = mla.kv_b_proj.cols;
  BatchedMatMulArgs a;
  a.x = q;
  a.m = tokens;
  a.ldx = ldq;
  a.x_stride = q_head_stride;
  a.w = mla.kv_b_proj.Rows(0, mla.nope);
  a.w_stride = (mla.nope + mla.v_dim) * mla.kv_b_proj.ld;
  a.transpose_w = false;
  a.y = q_latent;
  a.ldy = ldy;
  a.y_stride = lora;
  a.batches = mla.heads;
  return BatchedMatMul(blas, a);
}

Status UnfoldLatent(Blas& blas, const MlaHeads& mla, const uint16_t* o_latent, int64_t tokens, int64_t ldo,
                    float* out, int64_t ldy) {
  BatchedMatMulArgs a;
  a.x = o_latent;
  a.m = tokens;
  a.ldx = ldo;
  a.x_stride = mla.kv_b_proj.cols;
  a.w = mla.kv_b_proj.Rows(mla.nope, mla.v_dim);
  a.w_stride = (mla.nope + mla.v_dim) * mla.kv_b_proj.ld;
  a.transpose_w = true;
  a.y = out;
  a.ldy = ldy;
  a.y_stride = mla.v_dim;
  a.batches = mla.heads;
  return BatchedMatMul(blas, a);
}

Status ToBf16(const float* x, int64_t rows, int64_t n, int64_t ldx, uint16_t* out, int64_t ldo, cudaStream_t stream) {
  if (rows < 0 || n < 0 || ldx < n || ldo < n) {
    return InvalidArgumentError("ToBf16: " + Str(rows) + " rows of width " + Str(n) + ", strides " + Str(ldx) +
                                " and " + Str(ldo));
  }
  if (rows == 0 || n == 0) return OkStatus();
  EPIC_RETURN_IF_ERROR(CheckPointers("ToBf16", {x, out}));
  ToBf16Kernel<<<StrideBlocks(rows * n), kThreads, 0, stream>>>(x, rows, n, ldx, out, ldo);
  EPIC_CUDA_RETURN_IF_LAUNCH_FAILED("ToBf16Kernel");
  return OkStatus();
}

Status GatherRowsToBf16(const float* x, int64_t ldx, int64_t n, const int32_t* rows, const int32_t* count,
                        int64_t max_rows, uint16_t* out, int64_t ldo, cudaStream_t stream) {
  if (max_rows < 0 || max_rows > INT_MAX || n < 0 || ldx < n || ldo < n) {
    return InvalidArgumentError("GatherRowsToBf16: " + Str(max_rows) + " rows of width " + Str(n) + ", strides " +
                                Str(ldx) + " and " + Str(ldo));
  }
  if (max_rows == 0 || n == 0) return OkStatus();
  EPIC_RETURN_IF_ERROR(CheckPointers("GatherRowsToBf16", {x, rows, out}));
  GatherRowsToBf16Kernel<<<static_cast<unsigned>(max_rows), kThreads, 0, stream>>>(x, ldx, n, rows, count, out, ldo);
  EPIC_CUDA_RETURN_IF_LAUNCH_FAILED("GatherRowsToBf16Kernel");
  return OkStatus();
}

int64_t GroupedScratchCount(int64_t max_rows, int64_t num_experts) {
  // Each expert adds at most one partly filled tile to the full ones.
  return 1 + 2 * (max_rows / kTileRows + num_experts);
}

Status GroupedMatMul(const uint16_t* x, int64_t max_rows, int64_t ldx, const int32_t* offsets,
                     const GroupedWeights& w, float* y, int64_t ldy, int32_t* scratch, int64_t scratch_count,
                     cudaStream_t stream) {
  constexpr const char* kOp = "GroupedMatMul";
  if (max_rows < 0 || w.num_experts < 1 || w.n < 0 || w.k < 0 || ldx < w.k || w.ld < w.k || ldy < w.n) {
    return InvalidArgumentError(std::string(kOp) + ": " + Str(max_rows) + " rows, " + Str(w.num_experts) +
                                " experts of [" + Str(w.n) + ", " + Str(w.k) + ", ld " + Str(w.ld) + "], x ld " +
                                Str(ldx) + ", y ld " + Str(ldy));
  }
  const int64_t needed = GroupedScratchCount(max_rows, w.num_experts);
  if (scratch_count < needed) {
    return InvalidArgumentError(std::string(kOp) + ": scratch of " + Str(scratch_count) + " values, needs " +
                                Str(needed));
  }
  if (max_rows == 0 || w.n == 0) return OkStatus();
  EPIC_RETURN_IF_ERROR(CheckPointers(kOp, {x, offsets, w.experts, y, scratch}));
  const int64_t capacity = (needed - 1) / 2;
  const int64_t col_tiles = (w.n + kTileCols - 1) / kTileCols;
  if (capacity > 65535 || col_tiles > INT_MAX || w.num_experts > INT_MAX) {
    return InvalidArgumentError(std::string(kOp) + ": " + Str(capacity) + " row tiles exceed one grid");
  }
  TileMapKernel<<<1, kMapThreads, 0, stream>>>(offsets, static_cast<int>(w.num_experts), static_cast<int>(capacity),
                                               scratch);
  EPIC_CUDA_RETURN_IF_LAUNCH_FAILED("TileMapKernel");
  const bool vector = w.k % 8 == 0 && ldx % 8 == 0 && w.ld % 8 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;
  const dim3 grid(static_cast<unsigned>(col_tiles), static_cast<unsigned>(capacity));
  if (vector) {
    GroupedMatMulKernel<true><<<grid, kGemmThreads, 0, stream>>>(x, ldx, offsets, w, y, ldy, scratch);
  } else {
    GroupedMatMulKernel<false><<<grid, kGemmThreads, 0, stream>>>(x, ldx, offsets, w, y, ldy, scratch);
  }
  EPIC_CUDA_RETURN_IF_LAUNCH_FAILED("GroupedMatMulKernel");
  return OkStatus();
}

}  // namespace epic::cuda
