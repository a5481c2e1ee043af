// Matrix products on the GPU: the model's dense projections through cuBLAS (BF16
// weights and activations, F32 accumulate and output; F32 throughout for the router),
// the per-head products of MLA's absorbed form as strided batches, and the grouped
// product over the routed experts, a tensor-core kernel of epic's own that reads each
// expert's row range from the device so that the host never waits for the counts.
//
// Pointers are device pointers. Each function checks its sizes (INVALID_ARGUMENT),
// enqueues on its stream and returns without waiting.
#pragma once

#include <cstdint>
#include <memory>

#include "common/status.h"
#include "kernels/cuda/buffer.h"

namespace epic::cuda {

enum class DType : uint8_t { kF32, kBF16 };

// A row-major matrix on the device as a Hugging Face Linear stores it: [rows = out
// features, cols = in features], row stride ld elements.
struct DeviceMatrix {
  DType type = DType::kBF16;
  const void* data = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t ld = 0;

  int64_t ElementBytes() const { return type == DType::kBF16 ? 2 : 4; }
  // Rows [begin, begin + count).
  DeviceMatrix Rows(int64_t begin, int64_t count) const;
};

// A cuBLAS handle bound to one stream. FAILED_PRECONDITION without a usable GPU.
class Blas {
 public:
  static StatusOr<std::unique_ptr<Blas>> Create(cudaStream_t stream = nullptr);
  ~Blas();
  Blas(const Blas&) = delete;
  Blas& operator=(const Blas&) = delete;

  cudaStream_t stream() const { return stream_; }
  void* handle() const { return handle_; }

 private:
  Blas() = default;
  void* handle_ = nullptr;  // cublasHandle_t
  cudaStream_t stream_ = nullptr;
};

// y[i, n] (+)= sum_k x[i, k] * w[n, k] for i < m, n < w.rows, k < w.cols: x is [m, ldx]
// of w's type, y is F32 [m, ldy]. accumulate adds to y instead of overwriting it.
Status MatMul(Blas& blas, const void* x, int64_t m, int64_t ldx, const DeviceMatrix& w, float* y, int64_t ldy,
              bool accumulate = false);

// BATCHES products, batch b reading x + b * x_stride and w shifted by b * w_stride
// elements and writing y + b * y_stride: with transpose_w (as MatMul) y_b[i, n] =
// sum_k x_b[i, k] w_b[n, k]; without it y_b[i, k] = sum_n x_b[i, n] w_b[n, k]. BF16 x
// and w, F32 y. MLA's absorbed form runs one batch per head: q_nope through W_UK
// (no transpose) and the latent output through W_UV (transposed).
struct BatchedMatMulArgs {
  const uint16_t* x = nullptr;
  int64_t m = 0;
  int64_t ldx = 0;
  int64_t x_stride = 0;
  DeviceMatrix w;  // batch 0's matrix (BF16)
  int64_t w_stride = 0;
  bool transpose_w = true;
  float* y = nullptr;
  int64_t ldy = 0;
  int64_t y_stride = 0;
  int64_t batches = 0;
  bool accumulate = false;  // y += instead of y =
};
Status BatchedMatMul(Blas& blas, const BatchedMatMulArgs& args);

// MLA's absorbed form, one batch per head h over kv_b_proj [heads * (nope + v_dim), lora]
// (BF16), whose rows [h * (nope + v_dim), +nope) are W_UK[h] and the next v_dim W_UV[h]:
//   FoldQuery:    q_latent[t, h * lora + :] = q[t, h * q_head_stride + :nope] W_UK[h]
//   UnfoldLatent: out[t, h * v_dim + :] = o_latent[t, h * lora + :lora] W_UV[h]^T
// q is [tokens, ldq] and o_latent [tokens, ldo] (BF16); the outputs are F32 with row stride ldy.
struct MlaHeads {
  DeviceMatrix kv_b_proj;
  int64_t heads = 0;
  int64_t nope = 0;
  int64_t v_dim = 0;
};
Status FoldQuery(Blas& blas, const MlaHeads& mla, const uint16_t* q, int64_t tokens, int64_t ldq,
                 int64_t q_head_stride, float* q_latent, int64_t ldy);
Status UnfoldLatent(Blas& blas, const MlaHeads& mla, const uint16_t* o_latent, int64_t tokens, int64_t ldo,
                    float* out, int64_t ldy);

// out[r, :n] = x[r, :n] rounded to BF16: x is F32 [rows, ldx], out [rows, ldo].
Status ToBf16(const float* x, int64_t rows, int64_t n, int64_t ldx, uint16_t* out, int64_t ldo,
              cudaStream_t stream = nullptr);

// out[r, :n] = BF16 of x[rows[r], :n] for r < *count (a device value, such as
// PermuteByExpert's offsets[num_experts]), at most MAX_ROWS: the routed rows of a step
// gathered for the experts without the host reading the count.
Status GatherRowsToBf16(const float* x, int64_t ldx, int64_t n, const int32_t* rows, const int32_t* count,
                        int64_t max_rows, uint16_t* out, int64_t ldo, cudaStream_t stream = nullptr);

// The experts' weights for GroupedMatMul: expert e's matrix is [n, k] BF16 at
// experts[e] (a device array of device pointers), row stride ld.
struct GroupedWeights {
  const uint16_t* const* experts = nullptr;
  int64_t num_experts = 0;
  int64_t n = 0;
  int64_t k = 0;
  int64_t ld = 0;
};

// The int32 values of scratch GroupedMatMul needs for MAX_ROWS grouped rows.
int64_t GroupedScratchCount(int64_t max_rows, int64_t num_experts);

// y[r, :] = x[r, :] * W_e^T for the grouped rows r in [offsets[e], offsets[e + 1]) of
// every expert e (offsets: [num_experts + 1] on the device, nondecreasing, at most
// MAX_ROWS in all): BF16 x [max_rows, ldx], F32 y [max_rows, ldy]. Rows past
// offsets[num_experts] are not written. An expert with no rows costs nothing.
// REQUIRES: with w.k, ldx and w.ld multiples of 8 the rows are read 16 bytes at a time,
// so x and every expert pointer must then be 16-byte aligned.
Status GroupedMatMul(const uint16_t* x, int64_t max_rows, int64_t ldx, const int32_t* offsets,
                     const GroupedWeights& w, float* y, int64_t ldy, int32_t* scratch, int64_t scratch_count,
                     cudaStream_t stream = nullptr);

}  // namespace epic::cuda
