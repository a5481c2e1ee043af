#include "kernels/cuda/mla.h"

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <string>

#include "kernels/cuda/check.h"
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/mma.cuh"

namespace epic::cuda {
namespace {

using detail::CheckPointers;
using detail::kFullMask;
using detail::kThreads;
using detail::kWarps;
using detail::Str;

constexpr int kHeadsPerBlock = 16;  // the MMA's M: one block serves 16 heads of a token
constexpr int kChunkRows = 64;      // cached rows in shared memory at a time: 8 per warp
constexpr int kMaxColumnTiles = static_cast<int>(kMaxMlaLatent / (8 * kWarps));  // output tiles per warp
constexpr int kProbLd = kChunkRows + 8;  // padded so that the A loads of P avoid bank conflicts

static_assert(kChunkRows == 8 * kWarps, "each warp scores one 8-row tile of the chunk");

// Shapes fixed for a launch, in BF16 elements.
struct MlaShape {
  int width = 0;         // kv_lora_rank + rope_dim: a cached row
  int k_padded = 0;      // width rounded up to the MMA's k of 16 (zeros past width)
  int column_tiles = 0;  // 8-wide output tiles per warp: 8 * kWarps * column_tiles >= kv_lora_rank
  int ld = 0;            // shared-memory row stride: 16-byte rows, shifted 4 banks from the one before
};

MlaShape ShapeFor(int64_t lora, int64_t rope) {
  MlaShape s;
  s.width = static_cast<int>(lora + rope);
  s.k_padded = (s.width + 15) / 16 * 16;
  s.column_tiles = static_cast<int>((lora + 8 * kWarps - 1) / (8 * kWarps));
  s.ld = std::max(s.k_padded, 8 * kWarps * s.column_tiles) + 8;
  return s;
}

// Shared memory: Q [16][ld] and the chunk [64][ld] in BF16, scores S [16][64] in F32,
// weights P [16][kProbLd] in BF16, then per head the running max, sum and rescale.
size_t SharedBytes(const MlaShape& s) {
  return static_cast<size_t>(kHeadsPerBlock + kChunkRows) * s.ld * 2 + kHeadsPerBlock * kChunkRows * 4 +
         kHeadsPerBlock * kProbLd * 2 + 3 * kHeadsPerBlock * 4;
}

// The most any shape needs (the widest latent and rope): 100,032 bytes.
const size_t kMaxSharedBytes = SharedBytes(ShapeFor(kMaxMlaLatent, kMaxMlaRope));

// One block: heads [16 * blockIdx.z, +16) of token blockIdx.x over the rows of split
// blockIdx.y. Writes the split's normalised output and log-sum-exp per head, or, when
// the context is not split (max_splits == 1), the output itself to DIRECT_OUT.
template <bool kVectorRows>
__global__ void __launch_bounds__(kThreads) MlaSplitKernel(MlaAttentionParams p, MlaShape shape, int split_rows,
                                                           int max_splits, float* part_out, float* part_lse,
                                                           float* direct_out) {
  extern __shared__ __align__(16) unsigned char smem[];
  __nv_bfloat16* q = reinterpret_cast<__nv_bfloat16*>(smem);
  __nv_bfloat16* kv = q + kHeadsPerBlock * shape.ld;
  float* scores = reinterpret_cast<float*>(kv + kChunkRows * shape.ld);
  __nv_bfloat16* probs = reinterpret_cast<__nv_bfloat16*>(scores + kHeadsPerBlock * kChunkRows);
  float* row_max = reinterpret_cast<float*>(probs + kHeadsPerBlock * kProbLd);
  float* row_sum = row_max + kHeadsPerBlock;
  float* rescale = row_sum + kHeadsPerBlock;

  const int token = blockIdx.x;
  const int split = blockIdx.y;
  const int h0 = blockIdx.z * kHeadsPerBlock;
  const int heads = static_cast<int>(p.num_heads);
  const int lora = static_cast<int>(p.kv_lora_rank);
  const int context = p.context[token];
  const int begin = split * split_rows;
  if (begin >= context) return;  // this token's context has fewer splits
  const int end = min(context, begin + split_rows);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int g = lane / 4, c = lane % 4;

  // Q rows: [q_latent | q_pe] in BF16, zero past width and for heads past the last.
  for (int i = threadIdx.x; i < kHeadsPerBlock * shape.ld; i += blockDim.x) {
    const int h = i / shape.ld, d = i % shape.ld;
    float v = 0.0f;
    if (h0 + h < heads && d < shape.width) {
      const int64_t th = static_cast<int64_t>(token) * heads + h0 + h;
      v = d < lora ? p.q_latent[th * lora + d]
                   : p.q_pe[token * p.q_pe_token_stride + (h0 + h) * p.q_pe_head_stride + (d - lora)];
    }
    q[i] = __float2bfloat16_rn(v);
  }
  if (threadIdx.x < kHeadsPerBlock) {
    row_max[threadIdx.x] = -INFINITY;
    row_sum[threadIdx.x] = 0.0f;
  }

  float acc[kMaxColumnTiles][4];
#pragma unroll
  for (int t = 0; t < kMaxColumnTiles; ++t) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.0f;

  const int32_t* table = p.cache.block_tables + p.table_start[token];
  const int block_size = static_cast<int>(p.cache.block_size);
  for (int chunk = begin; chunk < end; chunk += kChunkRows) {
    const int rows = min(kChunkRows, end - chunk);
    __syncthreads();  // the previous chunk's readers are done (and Q is written)
    // Each warp copies rows warp, warp + 8, ...; rows past the chunk's end are zeros,
    // since a zero weight times a stale NaN would still be NaN.
    for (int r = warp; r < kChunkRows; r += kWarps) {
      __nv_bfloat16* dst = kv + r * shape.ld;
      if (r < rows) {
        const int row = chunk + r;
        const uint16_t* src =
            p.cache.pool + (static_cast<int64_t>(table[row / block_size]) * block_size + row % block_size) * shape.width;
        if constexpr (kVectorRows) {
          for (int v = lane; v < shape.width / 8; v += 32) {
            reinterpret_cast<uint4*>(dst)[v] = reinterpret_cast<const uint4*>(src)[v];
          }
        } else {
          for (int d = lane; d < shape.width; d += 32) dst[d] = __ushort_as_bfloat16(src[d]);
        }
        for (int d = shape.width + lane; d < shape.ld; d += 32) dst[d] = __float2bfloat16_rn(0.0f);
      } else {
        for (int d = lane; d < shape.ld; d += 32) dst[d] = __float2bfloat16_rn(0.0f);
      }
    }
    __syncthreads();

    // Scores of this warp's 8 rows for the 16 heads.
    float s[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int k0 = 0; k0 < shape.k_padded; k0 += 16) {
      uint32_t a[4], b[2];
      detail::LoadA(a, q, shape.ld, k0);
      detail::LoadBRows(b, kv, shape.ld, 8 * warp, k0);
      detail::MmaBf16(s, a, b);
    }
    for (int i = 0; i < 4; ++i) {
      const int head = g + (i / 2) * 8;
      const int col = 8 * warp + 2 * c + (i % 2);
      scores[head * kChunkRows + col] = col < rows ? s[i] * p.scale : -INFINITY;
    }
    __syncthreads();

    // Online softmax: 16 threads per head, 4 columns each.
    {
      const int head = threadIdx.x / 16;
      const int part = threadIdx.x % 16;
      const float old_max = row_max[head];
      float v[4];
      float m = -INFINITY;
      for (int i = 0; i < 4; ++i) {
        v[i] = scores[head * kChunkRows + part * 4 + i];
        m = fmaxf(m, v[i]);
      }
      for (int o = 8; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(kFullMask, m, o));
      const float new_max = fmaxf(old_max, m);  // finite: every chunk has a row
      float sum = 0.0f;
      for (int i = 0; i < 4; ++i) {
        const float e = __expf(v[i] - new_max);  // exp(-inf) = 0 for rows past the end
        sum += e;
        probs[head * kProbLd + part * 4 + i] = __float2bfloat16_rn(e);
      }
      for (int o = 8; o > 0; o >>= 1) sum += __shfl_xor_sync(kFullMask, sum, o);
      __syncwarp();  // every lane has read old_max before part 0 replaces it
      if (part == 0) {
        const float alpha = __expf(old_max - new_max);  // 0 on the first chunk
        rescale[head] = alpha;
        row_sum[head] = row_sum[head] * alpha + sum;
        row_max[head] = new_max;
      }
    }
    __syncthreads();

    // O = O * alpha + P V over this warp's output columns.
    const float alpha_lo = rescale[g], alpha_hi = rescale[g + 8];
#pragma unroll
    for (int t = 0; t < kMaxColumnTiles; ++t) {
      acc[t][0] *= alpha_lo;
      acc[t][1] *= alpha_lo;
      acc[t][2] *= alpha_hi;
      acc[t][3] *= alpha_hi;
    }
    for (int k0 = 0; k0 < kChunkRows; k0 += 16) {
      uint32_t a[4];
      detail::LoadA(a, probs, kProbLd, k0);
#pragma unroll
      for (int t = 0; t < kMaxColumnTiles; ++t) {
        if (t < shape.column_tiles) {
          uint32_t b[2];
          detail::LoadBCols(b, kv, shape.ld, (warp * shape.column_tiles + t) * 8, k0);
          detail::MmaBf16(acc[t], a, b);
        }
      }
    }
  }

  // row_sum and row_max were last written before the final barrier of the loop.
  const int64_t base = (static_cast<int64_t>(token) * max_splits + split) * heads;
  for (int half = 0; half < 2; ++half) {
    const int head = g + 8 * half;
    if (h0 + head >= heads) continue;
    const float inv = 1.0f / row_sum[head];
    float* out = (direct_out != nullptr ? direct_out : part_out) + (base + h0 + head) * lora;
#pragma unroll
    for (int t = 0; t < kMaxColumnTiles; ++t) {
      if (t >= shape.column_tiles) continue;
      const int col = (warp * shape.column_tiles + t) * 8 + 2 * c;
      if (col < lora) out[col] = acc[t][2 * half] * inv;
      if (col + 1 < lora) out[col + 1] = acc[t][2 * half + 1] * inv;
    }
    if (direct_out == nullptr && warp == 0 && c == 0) {
      part_lse[base + h0 + head] = row_max[head] + logf(row_sum[head]);
    }
  }
}

// out[t, h] = the splits' outputs weighted by exp(lse - max lse), normalised.
__global__ void MlaCombineKernel(const int32_t* context, int split_rows, int max_splits, int heads, int lora,
                                 const float* part_out, const float* part_lse, float* out) {
  const int token = blockIdx.x;
  const int h = blockIdx.y;
  const int splits = (context[token] + split_rows - 1) / split_rows;
  const int64_t base = static_cast<int64_t>(token) * max_splits * heads + h;
  float m = -INFINITY;
  for (int s = 0; s < splits; ++s) m = fmaxf(m, part_lse[base + static_cast<int64_t>(s) * heads]);
  float total = 0.0f;
  for (int s = 0; s < splits; ++s) total += __expf(part_lse[base + static_cast<int64_t>(s) * heads] - m);
  const float inv_total = 1.0f / total;
  float* o = out + (static_cast<int64_t>(token) * heads + h) * lora;
  for (int j = threadIdx.x; j < lora; j += blockDim.x) {
    float v = 0.0f;
    for (int s = 0; s < splits; ++s) {
      const int64_t row = base + static_cast<int64_t>(s) * heads;
      v += __expf(part_lse[row] - m) * part_out[row * lora + j];
    }
    o[j] = v * inv_total;
  }
}

__global__ void WriteLatentKernel(const float* latent, int64_t tokens, int64_t width, int64_t ld,
                                  const int64_t* slots, uint16_t* pool) {
  const int64_t total = tokens * width;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < total; k += step) {
    const int64_t t = k / width, i = k % width;
    pool[slots[t] * width + i] = __bfloat16_as_ushort(__float2bfloat16_rn(latent[t * ld + i]));
  }
}

// One block per row: the row's block looked up once, its values copied.
__global__ void GatherLatentKernel(const uint16_t* pool, int64_t block_size, const int32_t* table, int64_t width,
                                   uint16_t* out) {
  const int64_t row = blockIdx.x;
  const uint16_t* src = pool + (static_cast<int64_t>(table[row / block_size]) * block_size + row % block_size) * width;
  for (int64_t i = threadIdx.x; i < width; i += blockDim.x) out[row * width + i] = src[i];
}

// One block per (batch, query) row.
__global__ void CausalSoftmaxKernel(const float* scores, int64_t queries, int64_t keys, int64_t first_pos,
                                    float scale, uint16_t* probs) {
  __shared__ float partial[kWarps];
  const int64_t row = blockIdx.x;
  const int64_t visible = first_pos + row % queries + 1;
  const float* s = scores + row * keys;
  uint16_t* p = probs + row * keys;
  float m = -INFINITY;
  for (int64_t t = threadIdx.x; t < visible; t += blockDim.x) m = fmaxf(m, s[t] * scale);
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(kFullMask, m, o));
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = m;
  __syncthreads();
  m = partial[0];
  for (int w = 1; w < kWarps; ++w) m = fmaxf(m, partial[w]);
  __syncthreads();  // every thread has read the maxima before the sums reuse PARTIAL
  float sum = 0.0f;
  for (int64_t t = threadIdx.x; t < visible; t += blockDim.x) sum += __expf(s[t] * scale - m);
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(kFullMask, sum, o);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = sum;
  __syncthreads();
  sum = 0.0f;
  for (int w = 0; w < kWarps; ++w) sum += partial[w];
  const float inv = 1.0f / sum;
  for (int64_t t = threadIdx.x; t < keys; t += blockDim.x) {
    const float v = t < visible ? __expf(s[t] * scale - m) * inv : 0.0f;
    p[t] = __bfloat16_as_ushort(__float2bfloat16_rn(v));
  }
}

}  // namespace

Status GatherLatentRows(const uint16_t* pool, int64_t block_size, const int32_t* table, int64_t rows, int64_t width,
                        uint16_t* out, cudaStream_t stream) {
  constexpr const char* kOp = "GatherLatentRows";
  if (rows < 0 || width < 1 || block_size < 1 || rows > INT_MAX) {
    return InvalidArgumentError(std::string(kOp) + ": " + Str(rows) + " rows of width " + Str(width) +
                                ", block size " + Str(block_size));
  }
  if (rows == 0) return OkStatus();
  EPIC_RETURN_IF_ERROR(CheckPointers(kOp, {pool, table, out}));
  GatherLatentKernel<<<static_cast<unsigned>(rows), 128, 0, stream>>>(pool, block_size, table, width, out);
  EPIC_CUDA_RETURN_IF_LAUNCH_FAILED("GatherLatentKernel");
  return OkStatus();
}

Status CausalSoftmax(const float* scores, int64_t batches, int64_t queries, int64_t keys, int64_t first_pos,
                     float scale, uint16_t* probs, cudaStream_t stream) {
  constexpr const char* kOp = "CausalSoftmax";
  if (batches < 0 || queries < 0 || first_pos < 0 || first_pos + queries > keys || batches * queries > INT_MAX) {
    return InvalidArgumentError(std::string(kOp) + ": " + Str(batches) + " x " + Str(queries) + " queries from " +
                                "position " + Str(first_pos) + " over " + Str(keys) + " keys");
  }
  if (batches == 0 || queries == 0) return OkStatus();
  EPIC_RETURN_IF_ERROR(CheckPointers(kOp, {scores, probs}));
  CausalSoftmaxKernel<<<static_cast<unsigned>(batches * queries), kThreads, 0, stream>>>(scores, queries, keys,
                                                                                         first_pos, scale, probs);
  EPIC_CUDA_RETURN_IF_LAUNCH_FAILED("CausalSoftmaxKernel");
  return OkStatus();
}

MlaSplits PlanMlaSplits(int64_t tokens, int64_t num_heads, int64_t max_context, int sm_count) {
  MlaSplits s;
  const int64_t chunks = std::max<int64_t>((max_context + kChunkRows - 1) / kChunkRows, 1);
  const int64_t blocks = std::max<int64_t>(tokens * ((num_heads + kHeadsPerBlock - 1) / kHeadsPerBlock), 1);
  const int64_t wanted = std::clamp<int64_t>((2 * std::max(sm_count, 1) + blocks - 1) / blocks, 1, chunks);
  s.split_rows = (chunks + wanted - 1) / wanted * kChunkRows;
  s.max_splits = std::max<int64_t>((max_context + s.split_rows - 1) / s.split_rows, 1);
  return s;
}

int64_t MlaWorkspaceFloats(int64_t tokens, int64_t num_heads, int64_t kv_lora_rank, const MlaSplits& splits) {
  return tokens * splits.max_splits * num_heads * (kv_lora_rank + 1);
}

Status MlaAbsorbedAttention(const MlaAttentionParams& p, const MlaSplits& splits, float* workspace,
                            int64_t workspace_floats, cudaStream_t stream) {
  constexpr const char* kOp = "MlaAbsorbedAttention";
  if (p.tokens < 0 || p.num_heads < 1 || p.kv_lora_rank < 1 || p.kv_lora_rank > kMaxMlaLatent ||
      p.rope_dim < 0 || p.rope_dim > kMaxMlaRope) {
    return InvalidArgumentError(std::string(kOp) + ": " + Str(p.tokens) + " tokens, " + Str(p.num_heads) +
                                " heads, kv_lora_rank " + Str(p.kv_lora_rank) + " (1.." + Str(kMaxMlaLatent) +
                                "), rope_dim " + Str(p.rope_dim) + " (0.." + Str(kMaxMlaRope) + ")");
  }
  if (p.tokens == 0) return OkStatus();
  if (p.cache.block_size < 1 || p.max_context < 1) {
    return InvalidArgumentError(std::string(kOp) + ": block size " + Str(p.cache.block_size) + ", max context " +
                                Str(p.max_context));
  }
  if (splits.split_rows < kChunkRows || splits.split_rows % kChunkRows != 0 ||
      splits.max_splits * splits.split_rows < p.max_context) {
    return InvalidArgumentError(std::string(kOp) + ": " + Str(splits.max_splits) + " splits of " +
                                Str(splits.split_rows) + " rows do not cover a context of " + Str(p.max_context) +
                                " in whole chunks of " + Str(kChunkRows));
  }
  const int64_t needed = MlaWorkspaceFloats(p.tokens, p.num_heads, p.kv_lora_rank, splits);
  if (workspace_floats < needed) {
    return InvalidArgumentError(std::string(kOp) + ": workspace of " + Str(workspace_floats) + " floats, needs " +
                                Str(needed));
  }
  EPIC_RETURN_IF_ERROR(CheckPointers(kOp, {p.q_latent, p.q_pe, p.cache.pool, p.cache.block_tables, p.table_start,
                                           p.context, p.out_latent, workspace}));
  const int64_t groups = (p.num_heads + kHeadsPerBlock - 1) / kHeadsPerBlock;
  if (p.tokens > INT_MAX || splits.max_splits > 65535 || groups > 65535 || p.max_context > INT_MAX) {
    return InvalidArgumentError(std::string(kOp) + ": " + Str(p.tokens) + " tokens, " + Str(splits.max_splits) +
                                " splits and " + Str(groups) + " head groups exceed one grid");
  }
  const MlaShape shape = ShapeFor(p.kv_lora_rank, p.rope_dim);
  const size_t smem = SharedBytes(shape);
  float* part_out = workspace;
  float* part_lse = workspace + p.tokens * splits.max_splits * p.num_heads * p.kv_lora_rank;
  const bool vector_rows = shape.width % 8 == 0 && reinterpret_cast<uintptr_t>(p.cache.pool) % 16 == 0;
  auto kernel = vector_rows ? MlaSplitKernel<true> : MlaSplitKernel<false>;
  // Once per kernel and process: room for the widest shape, so every launch fits.
  static const cudaError_t vector_attr = cudaFuncSetAttribute(
      MlaSplitKernel<true>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kMaxSharedBytes));
  static const cudaError_t scalar_attr = cudaFuncSetAttribute(
      MlaSplitKernel<false>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kMaxSharedBytes));
  EPIC_CUDA_RETURN_IF_ERROR(vector_rows ? vector_attr : scalar_attr,
                            std::string(kOp) + ": " + std::to_string(kMaxSharedBytes) + " bytes of shared memory");
  const bool direct = splits.max_splits == 1;  // nothing to combine: the one split writes the output
  const dim3 grid(static_cast<unsigned>(p.tokens), static_cast<unsigned>(splits.max_splits),
                  static_cast<unsigned>(groups));
  kernel<<<grid, kThreads, smem, stream>>>(p, shape, static_cast<int>(splits.split_rows),
                                          static_cast<int>(splits.max_splits), part_out, part_lse,
                                          direct ? p.out_latent : nullptr);
  EPIC_CUDA_RETURN_IF_LAUNCH_FAILED("MlaSplitKernel");
  if (direct) return OkStatus();
  const dim3 combine_grid(static_cast<unsigned>(p.tokens), static_cast<unsigned>(p.num_heads));
  MlaCombineKernel<<<combine_grid, 128, 0, stream>>>(p.context, static_cast<int>(splits.split_rows),
                                                     static_cast<int>(splits.max_splits),
                                                     static_cast<int>(p.num_heads), static_cast<int>(p.kv_lora_rank),
                                                     part_out, part_lse, p.out_latent);
  EPIC_CUDA_RETURN_IF_LAUNCH_FAILED("MlaCombineKernel");
  return OkStatus();
}

Status WriteLatentRows(const float* latent, int64_t tokens, int64_t width, int64_t ld, const int64_t* slots,
                       uint16_t* pool, cudaStream_t stream) {
  constexpr const char* kOp = "WriteLatentRows";
  if (tokens < 0 || width < 1 || ld < width) {
    return InvalidArgumentError(std::string(kOp) + ": " + Str(tokens) + " rows of width " + Str(width) +
                                " at stride " + Str(ld));
  }
  if (tokens == 0) return OkStatus();
  EPIC_RETURN_IF_ERROR(CheckPointers(kOp, {latent, slots, pool}));
  WriteLatentKernel<<<detail::StrideBlocks(tokens * width), kThreads, 0, stream>>>(latent, tokens, width, ld, slots,
                                                                                 pool);
  EPIC_CUDA_RETURN_IF_LAUNCH_FAILED("WriteLatentKernel");
  return OkStatus();
}

}  // namespace epic::cuda
