// The BF16 tensor-core product that the attention and grouped-GEMM kernels share:
// mma.sync m16n8k16 (sm_80 and later), F32 accumulate. Included by .cu files only.
//
// Fragment layout for lane = 4 * g + c (PTX ISA, "Matrix Fragments for mma.m16n8k16"):
//   A (16 x 16, row-major): a[0] = A[g][2c, 2c+1], a[1] = A[g+8][2c, 2c+1],
//                           a[2] = A[g][2c+8, 2c+9], a[3] = A[g+8][2c+8, 2c+9]
//   B (16 x 8, "col"):      b[0] = B[2c, 2c+1][g], b[1] = B[2c+8, 2c+9][g]
//   C (16 x 8, F32):        c[0], c[1] = C[g][2c, 2c+1], c[2], c[3] = C[g+8][2c, 2c+1]
// Each 32-bit register holds two BF16 values, the lower column (or k) in the low half.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "epic's CUDA kernels need sm_80 or later (BF16 mma.sync): set CMAKE_CUDA_ARCHITECTURES to 80, 90a or newer"
#endif

namespace epic::cuda::detail {

__device__ inline uint32_t PackBf16(__nv_bfloat16 lo, __nv_bfloat16 hi) {
  return static_cast<uint32_t>(__bfloat16_as_ushort(lo)) | (static_cast<uint32_t>(__bfloat16_as_ushort(hi)) << 16);
}

__device__ inline uint32_t PackFloats(float lo, float hi) {
  return PackBf16(__float2bfloat16_rn(lo), __float2bfloat16_rn(hi));
}

// Two consecutive BF16 values at P (4-byte aligned).
__device__ inline uint32_t LoadPair(const __nv_bfloat16* p) { return *reinterpret_cast<const uint32_t*>(p); }

// C += A * B for one 16 x 8 tile over k = 16.
__device__ inline void MmaBf16(float c[4], const uint32_t a[4], const uint32_t b[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// The A fragment of rows [0, 16) and columns [k0, k0 + 16) of a row-major BF16 tile in
// shared memory with row stride LD (even).
__device__ inline void LoadA(uint32_t a[4], const __nv_bfloat16* tile, int ld, int k0) {
  const int lane = threadIdx.x % 32;
  const int g = lane / 4, c = lane % 4;
  a[0] = LoadPair(tile + g * ld + k0 + 2 * c);
  a[1] = LoadPair(tile + (g + 8) * ld + k0 + 2 * c);
  a[2] = LoadPair(tile + g * ld + k0 + 2 * c + 8);
  a[3] = LoadPair(tile + (g + 8) * ld + k0 + 2 * c + 8);
}

// The B fragment for B[k][n] = T[n0 + n][k0 + k]: a tile whose rows are B's columns
// (a weight row, or a cached key row), row stride LD.
__device__ inline void LoadBRows(uint32_t b[2], const __nv_bfloat16* tile, int ld, int n0, int k0) {
  const int lane = threadIdx.x % 32;
  const int g = lane / 4, c = lane % 4;
  b[0] = LoadPair(tile + (n0 + g) * ld + k0 + 2 * c);
  b[1] = LoadPair(tile + (n0 + g) * ld + k0 + 2 * c + 8);
}

// The B fragment for B[k][n] = T[k0 + k][n0 + n]: a tile whose rows are B's rows (a
// cached value row), row stride LD.
__device__ inline void LoadBCols(uint32_t b[2], const __nv_bfloat16* tile, int ld, int n0, int k0) {
  const int lane = threadIdx.x % 32;
  const int g = lane / 4, c = lane % 4;
  const __nv_bfloat16* col = tile + n0 + g;
  b[0] = PackBf16(col[(k0 + 2 * c) * ld], col[(k0 + 2 * c + 1) * ld]);
  b[1] = PackBf16(col[(k0 + 2 * c + 8) * ld], col[(k0 + 2 * c + 9) * ld]);
}

}  // namespace epic::cuda::detail
