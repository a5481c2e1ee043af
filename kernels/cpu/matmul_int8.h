// Int8 products: the fast precision. Each weight row is quantized once, at load, to int8
// with its own scale (max |w| / 127, rounded to nearest); each row of activations is
// quantized the same way at every product, but with a scale for each kInt8ScaleBlock
// values: the error is the activations' (heavy-tailed rows, an outlier channel coarsening
// the whole row), not the weights' (docs/performance.md "Against Q8_0"). A scale block's
// products are summed exactly in int32, scaled by its activations' scale into an F32
// sum, and that sum by the weight row's scale. Weights take half the bytes of BF16
// (decode reads half as much), and vpdpbusd (AVX512_VNNI) does 64 multiply-adds an
// instruction against an F32 FMA's 16. Every path (Int8Path) computes the same integers
// and the same F32 operations in the same order, so fast gives the same results on every
// host; the plain C++ one is the tests' reference.
//
// Packed layout: panels of 16 rows; in a panel, for each group of 4 columns, the 16
// rows' 4 values side by side (64 bytes, one vpdpbusd operand), stored unsigned (+128)
// because vpdpbusd multiplies unsigned by signed bytes; the activations' scale blocks'
// sums undo the offset. Columns are padded to a multiple of 4 and rows to a multiple of
// 16, with zeros.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "common/scratch_buffer.h"
#include "kernels/cpu/cpu_features.h"
#include "kernels/cpu/matmul.h"

namespace epic::cpu {

// Activation values that share one int8 scale (the last block of a row may be shorter).
// 256 against a scale a row: V2-Lite's shape's median logit error 5.3% -> 4.0%, top-1
// agreement 86% -> 90%; 128 gained little more (3.8%, 91%) for twice the cost, each
// block's sums converted and scaled in the products' register blocks (compute-bound
// int8 products 0.80-0.93 of a scale a row at 128, 0.89-0.99 at 256; performance.md).
inline constexpr int64_t kInt8ScaleBlock = 256;

// Bytes (64-byte aligned) that QuantizeInt8 writes for a ROWS x COLS matrix.
int64_t QuantizedBytes(int64_t rows, int64_t cols);
// Of those, the panels' (the rows' scales follow them).
int64_t QuantizedPanelBytes(int64_t rows, int64_t cols);

// W (kF32 or kBF16) quantized into MEMORY (QuantizedBytes, 64-byte aligned): a kI8
// matrix over MEMORY. Threaded over rows.
WeightMatrix QuantizeInt8(const WeightMatrix& w, void* memory);

// Whether this host has vector int8 products (AVX2 or wider): the fast precision needs
// them, the plain path being only the reference.
bool HasInt8Products();

// QuantizeInt8 with the panels (RoundUp(rows, 16) x padded columns bytes) and the ROWS
// scales placed by the caller: matrices stacked by rows share one kI8 matrix when each
// but the last has whole panels of rows.
WeightMatrix QuantizeInt8Into(const WeightMatrix& w, void* panels, float* scales);

// A quantized copy that owns its memory (tests and benchmarks; the model quantizes into
// its weight arena).
class QuantizedMatrix {
 public:
  explicit QuantizedMatrix(const WeightMatrix& w);
  const WeightMatrix& matrix() const { return matrix_; }

 private:
  std::unique_ptr<void, void (*)(void*)> memory_;
  WeightMatrix matrix_;
};

// Rows of activations quantized as the int8 products quantize them (a row's int8 values,
// K padded with zeros to the weights' multiple of 4; each scale block's sum and scale),
// for products over the same rows: the routed experts gather their tokens' rows from a
// layer's rows quantized once, not once for each of the experts a token goes to.
class Int8Rows {
 public:
  // X's M rows of K values, over the threads where they are many.
  void Quantize(const float* x, int64_t m, int64_t ldx, int64_t k);
  // FROM's rows INDEX[0, n), in that order.
  void Gather(const Int8Rows& from, const int32_t* index, int64_t n);

  int64_t rows() const { return rows_; }
  int64_t cols() const { return cols_; }
  int64_t blocks() const { return blocks_; }  // scale blocks a row
  const int8_t* values() const { return values_; }  // [rows][cols rounded up to 4]
  const int32_t* sums() const { return sums_.data(); }     // [rows][blocks]
  const float* scales() const { return scales_.data(); }   // [rows][blocks]

 private:
  void Resize(int64_t m, int64_t k);

  int64_t rows_ = 0, cols_ = 0, padded_ = 0, blocks_ = 0;
  ScratchBuffer memory_;  // the values, in huge pages where large
  int8_t* values_ = nullptr;
  std::vector<int32_t> sums_;
  std::vector<float> scales_;
};

// MatMul's Y (+)= X W^T from rows quantized already (W kI8 with X.cols() columns).
void MatMulInt8(const Int8Rows& x, const WeightMatrix& w, float* y, int64_t ldy, bool accumulate);

namespace internal {

// The packed layout: panels of 16 rows, in groups of 4 columns, values stored + 128.
inline constexpr int64_t kInt8PanelRows = 16;
inline constexpr int64_t kInt8Group = 4;
inline constexpr int kInt8Offset = 128;
// Where element (R, C) of a kI8 matrix with ROW_STRIDE padded columns lies in its panels.
inline int64_t Int8Index(int64_t row_stride, int64_t r, int64_t c) {
  return (r / kInt8PanelRows) * kInt8PanelRows * row_stride + (c / kInt8Group) * kInt8Group * kInt8PanelRows +
         (r % kInt8PanelRows) * kInt8Group + c % kInt8Group;
}

// The int8 products' instruction paths; each computes the same integers.
enum class Int8Path : int {
  kPlain = 0,       // portable C++: the reference
  kAvx2 = 1,        // vpmaddubsw on signed weights and |x|, vpmaddwd
  kAvxVnni = 2,     // 256-bit vpdpbusd (AVX-VNNI)
  kAvx512Vnni = 3,  // 512-bit vpdpbusd
};
const char* Int8PathName(Int8Path path);

// Every path this host runs under ActiveIsa() (EPIC_CPU_ISA narrows it), narrowest first.
std::vector<Int8Path> Int8Paths();

// The path MatMul takes on kI8 weights: the widest of Int8Paths(), or the one the
// environment variable EPIC_INT8_PATH names (plain, avx2, avx_vnni, avx512_vnni) where
// it is one of them (else a note on stderr, once).
Int8Path ActiveInt8Path();

// The plain C++ int8 product, single-threaded: MatMul's contract, kI8 weights only.
void MatMulInt8Plain(const float* x, int64_t m, int64_t ldx, const WeightMatrix& w, float* y, int64_t ldy,
                     bool accumulate);

// MatMul on kI8 weights by PATH (one of Int8Paths()).
void MatMulInt8On(Int8Path path, const float* x, int64_t m, int64_t ldx, const WeightMatrix& w, float* y,
                  int64_t ldy, bool accumulate);

// MatMul on kI8 weights (MatMul calls it): MatMulInt8On(ActiveInt8Path(), ...).
void MatMulInt8(const float* x, int64_t m, int64_t ldx, const WeightMatrix& w, float* y, int64_t ldy,
                bool accumulate);

}  // namespace internal
}  // namespace epic::cpu
