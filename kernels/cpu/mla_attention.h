// Multi-head Latent Attention over the latent cache: each cached token is one row
// [c_kv (kv_lora_rank) | k_pe (rope_dim)], shared by all heads.
#pragma once

#include <cstdint>

#include "kernels/cpu/matmul.h"

namespace epic::cpu {

// Where a sequence's cached rows live: row t is at
// pool + (block_table[t / block_size] * block_size + t % block_size) * row_stride
// elements, F32 or BF16 (the fast precision's cache: half the bytes; MatMulNoTrans and
// the scores' products read either).
struct LatentRows {
  const void* pool = nullptr;
  const int32_t* block_table = nullptr;
  int64_t block_size = 0;
  int64_t row_stride = 0;  // kv_lora_rank + rope_dim
  WeightType type = WeightType::kF32;  // kF32 or kBF16

  const void* Row(int64_t t) const {
    const int64_t at = (static_cast<int64_t>(block_table[t / block_size]) * block_size + t % block_size) * row_stride;
    return type == WeightType::kBF16 ? static_cast<const void*>(static_cast<const uint16_t*>(pool) + at)
                                     : static_cast<const void*>(static_cast<const float*>(pool) + at);
  }
  // Rows [t, t + count) as a matrix of their first COLS values; they must lie one after
  // another in the pool.
  WeightMatrix Matrix(int64_t t, int64_t count, int64_t cols) const {
    WeightMatrix m;
    m.type = type;
    m.data = Row(t);
    m.rows = count;
    m.cols = cols;
    m.row_stride = row_stride;
    return m;
  }
  // OUT[0, count) = row T's values [begin, begin + count) in F32.
  void Widen(int64_t t, int64_t begin, int64_t count, float* out) const;
};

// Absorbed form (decode): W_UK is already folded into the query, so attention reads
// only the latent cache, and the output stays latent (W_UV is applied after).
//   score[t] = scale * (q_latent[i, h] . c_kv[t] + q_pe[i, h] . k_pe[t]),  t <= start + i
//   out[i, h] = sum_t softmax(score)[t] * c_kv[t]
// Over BF16 rows the queries are rounded to BF16 for the scores (sums in F32).
struct MlaAbsorbedParams {
  int64_t num_queries = 0;  // new tokens of this sequence, at positions start..start+n-1
  int64_t start = 0;
  int64_t num_heads = 0;
  int64_t kv_lora_rank = 0;
  int64_t rope_dim = 0;
  float scale = 0.0f;
  const float* q_latent = nullptr;  // [num_queries, num_heads, kv_lora_rank]
  const float* q_pe = nullptr;      // [num_queries, num_heads, rope_dim], rotated
  LatentRows cache;                 // holds rows 0 .. start + num_queries - 1
  float* out_latent = nullptr;      // [num_queries, num_heads, kv_lora_rank]
};
void MlaAbsorbedAttention(const MlaAbsorbedParams& params);

// What MlaAbsorbedAttention(PARAMS) will read (its queries and cached rows) brought into
// this core's L2, for a batch's next sequence on a thread while this one runs; over BF16
// rows only (the fast precision's cache: B=16 and B=64 0.86-0.93x the core's time on
// small experts, 0.91-0.96x on V2-Lite's shape; over the exact precision's F32 rows,
// whose products take twice as long, 1.02-1.04x).
void PrefetchAbsorbed(const MlaAbsorbedParams& params);

// Up-projected form (prefill): keys and values of every context row were expanded by
// kv_b_proj; plain causal attention per head.
//   key[t, h] = [k_nope[t, h] | k_pe[t]], query[i, h] = [q_nope | q_pe]
struct MlaExpandedParams {
  int64_t num_queries = 0;
  int64_t start = 0;
  int64_t num_heads = 0;
  int64_t nope_dim = 0;
  int64_t rope_dim = 0;
  int64_t v_dim = 0;
  float scale = 0.0f;
  const float* q = nullptr;     // [num_queries, num_heads, nope_dim + rope_dim], rope rotated
  const float* kv = nullptr;    // [start + num_queries, num_heads, nope_dim + v_dim]
  const float* k_pe = nullptr;  // [start + num_queries, rope_dim]
  float* out = nullptr;         // [num_queries, num_heads, v_dim]
  // Scores and outputs as products of BF16-rounded operands (queries, keys, values and
  // probabilities; sums in F32; matmul_fast.h) instead of F32 ones: the fast precision,
  // where Bf16ProductsBeatF32().
  bool bf16 = false;
};
void MlaExpandedAttention(const MlaExpandedParams& params);

}  // namespace epic::cpu
