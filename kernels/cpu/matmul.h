// Matrix products with weights read in place from the checkpoint (BF16 or F32),
// F32 activations and F32 accumulation. Multi-threaded with OpenMP; vectorised with
// AVX-512, else AVX2 + FMA, where the processor has them (detected at run time,
// kernels/cpu/cpu_features.h), plain C++ elsewhere.
#pragma once

#include <cstdint>

namespace epic::cpu {

enum class WeightType : uint8_t { kF32, kBF16 };

// A row-major weight matrix as a Hugging Face Linear stores it: [rows = out features,
// cols = in features]. row_stride (in elements) lets a view select a block of
// columns, e.g. one rank's heads of o_proj.
struct WeightMatrix {
  WeightType type = WeightType::kF32;
  const void* data = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t row_stride = 0;

  // Rows [begin, begin + count).
  WeightMatrix Rows(int64_t begin, int64_t count) const;
  // Columns [begin, begin + count).
  WeightMatrix Cols(int64_t begin, int64_t count) const;
  int64_t ElementBytes() const { return type == WeightType::kBF16 ? 2 : 4; }
  // Element (r, c) widened to float: for tests and slow paths only.
  float At(int64_t r, int64_t c) const;
};

// y[i, n] = sum_k x[i, k] * w[n, k]   for i < m, n < w.rows, k < w.cols.
// x is [m, ldx] (ldx >= w.cols), y is [m, ldy] (ldy >= w.rows). With accumulate,
// y += instead of y =. REQUIRES: x and y do not overlap.
void MatMul(const float* x, int64_t m, int64_t ldx, const WeightMatrix& w, float* y,
            int64_t ldy, bool accumulate = false);

// y[i, k] = sum_n x[i, n] * w[n, k]   for i < m, n < w.rows, k < w.cols: the product
// with the weight itself rather than its transpose (MLA's absorbed decode folds
// W_UK into the query this way). x is [m, ldx], y is [m, ldy].
void MatMulNoTrans(const float* x, int64_t m, int64_t ldx, const WeightMatrix& w, float* y,
                   int64_t ldy, bool accumulate = false);

}  // namespace epic::cpu
