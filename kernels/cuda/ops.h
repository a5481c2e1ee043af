// Element-wise and row-wise operations of the DeepSeek layer on the GPU, with the
// semantics of their CPU counterparts (kernels/cpu/ops.h, worker/sampler.h's ArgMax),
// which the tests compare them against.
//
// Pointers named here are device pointers. Each function checks its sizes (INVALID_ARGUMENT
// otherwise), enqueues its kernel on STREAM (nullptr: the default stream) and returns
// without waiting; a launch failure is returned with the CUDA error text, while a fault
// inside the kernel shows at the next synchronising call (a DeviceBuffer copy). Zero
// rows launch nothing and succeed.
#pragma once

#include <cstdint>
#include <vector>

#include "common/status.h"
#include "kernels/cuda/buffer.h"

namespace epic::cuda {

// out[r, i] = weight[i] * (x[r, i] * inv_r), inv_r = 1 / sqrt(mean_i(x[r, i]^2) + eps),
// the mean taken in double and inv_r rounded to F32 as on the CPU. x and out are
// [rows, ldx] and [rows, ldo]; out may equal x (then ldo == ldx).
Status RmsNorm(const float* x, int64_t rows, int64_t n, int64_t ldx, const float* weight, float eps,
               float* out, int64_t ldo, cudaStream_t stream = nullptr);

// The rotary frequencies on the device, copied once from the host table
// (worker/rope.h's RopeTable: inv_freq and YaRN's mscale).
struct RopeFrequencies {
  DeviceBuffer<double> inv_freq;  // [pairs]
  double mscale = 1.0;

  static StatusOr<RopeFrequencies> FromHost(const std::vector<double>& inv_freq, double mscale);
  int64_t pairs() const { return inv_freq.size(); }
};

// Where the rope slices lie in a block of token rows: token t's slice s starts at
// x + t * ld + offset + s * slice_stride and holds 2 * pairs values. For q: slices =
// heads, slice_stride = q_head_dim, offset = qk_nope_head_dim; for the latent's k_pe:
// slices = 1, offset = kv_lora_rank.
struct RopeRows {
  float* x = nullptr;
  int64_t tokens = 0;
  int64_t ld = 0;
  int64_t offset = 0;
  int64_t slices = 1;
  int64_t slice_stride = 0;
};

// Rotates each slice's interleaved pairs (x[2i], x[2i+1]) by positions[t] * inv_freq[i]
// and scales by mscale, in place, as cpu::ApplyRope does (angle, cos and sin in
// double). positions: [tokens] on the device.
Status ApplyRope(const RopeRows& rows, const int64_t* positions, const RopeFrequencies& freq,
                 cudaStream_t stream = nullptr);

// out[r, i] = silu(gate[r, i]) * up[r, i] over [rows, n]; gate and up share the row
// stride ld (a fused [rows, 2n] gate|up block gives gate = p, up = p + n, ld = 2n).
Status SiluMul(const float* gate, const float* up, int64_t rows, int64_t n, int64_t ld, float* out, int64_t ldo,
               cudaStream_t stream = nullptr);

// out row i = x row rows[i] for i < n, rows of ROW_BYTES bytes (16 bytes at a time when
// the rows and pointers allow): whole rows gathered for an exchange. ROWS is on the device.
Status GatherRowBytes(const void* x, int64_t row_bytes, const int32_t* rows, int64_t n, void* out,
                      cudaStream_t stream = nullptr);

// y[i] += x[i] for i < n (F32): a residual add.
Status AddInPlace(float* y, const float* x, int64_t n, cudaStream_t stream = nullptr);

// out[t, :] = table[token_ids[t], :] as F32 for a [vocab, n] table (F32, or BF16 bits).
// The ids live on the device, so they cannot be checked here: an id outside
// [0, vocab) reads nothing and leaves a row of NaN, for the caller to have checked.
Status GatherRows(const int32_t* token_ids, int64_t tokens, const float* table, int64_t vocab, int64_t n,
                  float* out, int64_t ldo, cudaStream_t stream = nullptr);
Status GatherRowsBf16(const int32_t* token_ids, int64_t tokens, const uint16_t* table, int64_t vocab,
                      int64_t n, float* out, int64_t ldo, cudaStream_t stream = nullptr);

// out[r] = the index of row r's largest value, the lowest on ties, exactly as the
// sequential ArgMax: a NaN at index 0 gives 0, a NaN elsewhere is never chosen.
// x is [rows, ld]; REQUIRES n >= 1.
Status ArgMaxRows(const float* x, int64_t rows, int64_t n, int64_t ld, int32_t* out,
                  cudaStream_t stream = nullptr);

}  // namespace epic::cuda
