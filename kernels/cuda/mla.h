// Multi-head Latent Attention on the GPU, in the absorbed form, over a paged BF16
// latent cache: the device form of cpu::MlaAbsorbedAttention (kernels/cpu/mla_attention.h).
//
// Every query token t sees the first context[t] rows of its sequence's cache, so one
// launch serves decode (one token per sequence) and prefill (a sequence's new tokens,
// each seeing the rows up to its own position) of any mix of sequences. Long contexts
// are split over several blocks, each reducing its share of rows with an online
// softmax, and a second kernel combines the shares by their log-sum-exp, as FlashMLA
// and flash-decoding do. Scores and the weighted sum run on BF16 tensor cores with F32
// accumulation: q is rounded to BF16 (the cache already is), and so are the softmax
// weights before they multiply the rows; the softmax itself is F32.
//
// Pointers are device pointers; the function checks its sizes (INVALID_ARGUMENT),
// enqueues on STREAM and returns without waiting.
#pragma once

#include <cstdint>

#include "common/status.h"
#include "kernels/cuda/buffer.h"

namespace epic::cuda {

// The widest latent the kernel holds per row (c_kv), and the widest rope part.
inline constexpr int64_t kMaxMlaLatent = 512;
inline constexpr int64_t kMaxMlaRope = 64;

// One layer's latent cache: NUM_BLOCKS blocks of BLOCK_SIZE rows [c_kv | k_pe], BF16,
// rows kv_lora_rank + rope_dim wide and contiguous. A sequence's row i lives in block
// block_tables[table_start[t] + i / block_size] at row i % block_size.
struct PagedLatent {
  const uint16_t* pool = nullptr;
  int64_t block_size = 0;
  const int32_t* block_tables = nullptr;  // every sequence's block ids, one after another
};

struct MlaAttentionParams {
  int64_t tokens = 0;
  int64_t num_heads = 0;
  int64_t kv_lora_rank = 0;
  int64_t rope_dim = 0;
  float scale = 0.0f;
  const float* q_latent = nullptr;  // [tokens, num_heads, kv_lora_rank]: q_nope folded through W_UK
  // Rotated q_pe of token t, head h at q_pe + t * q_pe_token_stride + h * q_pe_head_stride
  // (rope_dim values): the rope part of q read in place.
  const float* q_pe = nullptr;
  int64_t q_pe_token_stride = 0;
  int64_t q_pe_head_stride = 0;
  PagedLatent cache;
  const int32_t* table_start = nullptr;  // [tokens] where the token's sequence's block ids start
  const int32_t* context = nullptr;      // [tokens] cached rows the token sees (its position + 1), >= 1
  int64_t max_context = 0;               // the largest of context (known on the host)
  float* out_latent = nullptr;           // [tokens, num_heads, kv_lora_rank]
};

// How the rows of a context are split over blocks: SPLIT_ROWS rows each (a multiple of
// the kernel's chunk), up to MAX_SPLITS per token.
struct MlaSplits {
  int64_t split_rows = 0;
  int64_t max_splits = 0;
};

// Enough splits to give SM_COUNT multiprocessors about two blocks each.
MlaSplits PlanMlaSplits(int64_t tokens, int64_t num_heads, int64_t max_context, int sm_count);

// F32 values of scratch the launch needs for SPLITS (partial outputs and their
// log-sum-exps).
int64_t MlaWorkspaceFloats(int64_t tokens, int64_t num_heads, int64_t kv_lora_rank, const MlaSplits& splits);

// REQUIRES: 1 <= kv_lora_rank <= kMaxMlaLatent, 0 <= rope_dim <= kMaxMlaRope; WORKSPACE
// holds MlaWorkspaceFloats(...) values. Every context[t] is in [1, max_context] and
// every block id it reaches is a block of the pool (neither can be checked here).
Status MlaAbsorbedAttention(const MlaAttentionParams& params, const MlaSplits& splits, float* workspace,
                            int64_t workspace_floats, cudaStream_t stream = nullptr);

// The expanded form (prefill: K and V up-projected through kv_b_proj, then plain causal
// attention per head through cuBLAS) needs two pieces of its own:
//
// OUT [rows, width] = a sequence's first ROWS cached rows, contiguous (BF16 bits);
// TABLE is that sequence's block ids.
Status GatherLatentRows(const uint16_t* pool, int64_t block_size, const int32_t* table, int64_t rows, int64_t width,
                        uint16_t* out, cudaStream_t stream = nullptr);

// PROBS[b, i, :] = softmax over t <= first_pos + i of SCALE * SCORES[b, i, t], as BF16,
// and 0 for the masked keys t > first_pos + i: SCORES and PROBS are [batches, queries,
// keys] (F32 and BF16 bits). The sum is F32 over the unrounded weights.
// REQUIRES: first_pos + queries <= keys.
Status CausalSoftmax(const float* scores, int64_t batches, int64_t queries, int64_t keys, int64_t first_pos,
                     float scale, uint16_t* probs, cudaStream_t stream = nullptr);

// The cache write of a step: row slots[t] of POOL (row width WIDTH, BF16) =
// latent[t, :WIDTH] (F32 [tokens, ld]) rounded to BF16. A slot is a block id times the
// block size plus the row within the block.
Status WriteLatentRows(const float* latent, int64_t tokens, int64_t width, int64_t ld, const int64_t* slots,
                       uint16_t* pool, cudaStream_t stream = nullptr);

}  // namespace epic::cuda
