// Matrix products with weights read in place from the checkpoint (BF16 or F32),
// F32 activations and F32 accumulation; or, for the fast precision, with weights
// quantized to int8 (kernels/cpu/matmul_int8.h). Multi-threaded with OpenMP; vectorised with
// AVX-512, else AVX2 + FMA, where the processor has them (detected at run time,
// kernels/cpu/cpu_features.h), plain C++ elsewhere.
#pragma once

#include <cstdint>

namespace epic::cpu {

enum class WeightType : uint8_t {
  kF32,
  kBF16,
  // Int8 with a scale per row, packed in panels (QuantizeInt8): row_stride is the
  // padded number of columns, `scales` the rows' scales.
  kI8,
};

// A row-major weight matrix as a Hugging Face Linear stores it: [rows = out features,
// cols = in features]. row_stride (in elements) lets a view select a block of
// columns, e.g. one rank's heads of o_proj.
struct WeightMatrix {
  WeightType type = WeightType::kF32;
  const void* data = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t row_stride = 0;
  const float* scales = nullptr;  // kI8 only

  // Rows [begin, begin + count); for kI8 BEGIN must be a multiple of 16 (a panel).
  WeightMatrix Rows(int64_t begin, int64_t count) const;
  // Columns [begin, begin + count); not for kI8.
  WeightMatrix Cols(int64_t begin, int64_t count) const;
  int64_t ElementBytes() const { return type == WeightType::kF32 ? 4 : type == WeightType::kBF16 ? 2 : 1; }
  // The memory the matrix's values span (for kI8 its panels and scales, QuantizedBytes).
  int64_t Bytes() const;
  // Element (r, c) widened to float: for tests and slow paths only.
  float At(int64_t r, int64_t c) const;
};

// y[i, n] = sum_k x[i, k] * w[n, k]   for i < m, n < w.rows, k < w.cols.
// x is [m, ldx] (ldx >= w.cols), y is [m, ldy] (ldy >= w.rows). With accumulate,
// y += instead of y =. With kI8 weights each row of x is quantized to int8 first
// (MatMulInt8). REQUIRES: x and y do not overlap.
void MatMul(const float* x, int64_t m, int64_t ldx, const WeightMatrix& w, float* y,
            int64_t ldy, bool accumulate = false);

// y[i, k] = sum_n x[i, n] * w[n, k]   for i < m, n < w.rows, k < w.cols: the product
// with the weight itself rather than its transpose (MLA's absorbed decode folds
// W_UK into the query this way). x is [m, ldx], y is [m, ldy]. Not for kI8.
void MatMulNoTrans(const float* x, int64_t m, int64_t ldx, const WeightMatrix& w, float* y,
                   int64_t ldy, bool accumulate = false);

// F32 weights packed once into the packed GEMM's panels, for products over prefixes of
// their rows or columns: attention's keys and values, part of which every chunk of
// queries reads, were packed again for each chunk. The layout is the running
// instruction set's (plain: the rows as they are).
int64_t PackedF32Floats(int64_t rows, int64_t cols);
// W [rows x cols] (row stride STRIDE) into PACKED (PackedF32Floats floats).
void PackF32(const float* w, int64_t rows, int64_t cols, int64_t stride, float* packed);
// y[i, n] = sum_{k < k_used} x[i, k] * w[n, k]   for i < m, n < n_used, with W packed
// by PackF32 as ROWS x COLS (n_used <= rows, k_used <= cols). On the calling thread.
void MatMulPackedF32(const float* x, int64_t m, int64_t ldx, const float* packed, int64_t rows, int64_t cols,
                     int64_t n_used, int64_t k_used, float* y, int64_t ldy);

}  // namespace epic::cpu
