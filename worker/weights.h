// The model's weights, bound to the checkpoint. Matrices keep their BF16 or F32
// values (F16 is widened to F32 once); norms and biases are copied to F32.
//
// By default matrices are copied into anonymous memory backed by 2 MiB transparent
// huge pages: decode streams every weight once per token, and over the file's 4 KiB
// page-cache pages the hardware prefetchers stop at each page and the TLB misses,
// which held decode near half of the bandwidth bound. kMapped uses the file's pages
// in place (no second copy while the page cache holds the file).
// With the fast precision the matrices of the products (attention's projections, the
// MLPs and experts, lm_head) are quantized to int8 at load (kernels/cpu/matmul_int8.h),
// always into anonymous memory; the embedding, the router and kv_b_proj keep their
// values, kv_b_proj beside an int8 copy for the expanded attention.
// A ModelWeights stays valid while its Checkpoint is open.
#pragma once

#include <memory>
#include <vector>

#include "common/status.h"
#include "kernels/cpu/matmul.h"
#include "kernels/cpu/matmul_fast.h"
#include "worker/arena.h"
#include "worker/checkpoint.h"

namespace epic {

struct MlpWeights {
  cpu::WeightMatrix gate;  // [intermediate, hidden]
  cpu::WeightMatrix up;    // [intermediate, hidden]
  cpu::WeightMatrix down;  // [hidden, intermediate]
  // Gate's rows then up's in one matrix, gate and up being its views, where the binder
  // copied them (one product for both: one pass over x, one team of threads); else
  // without data.
  cpu::WeightMatrix gate_up;
};

struct LayerWeights {
  std::vector<float> input_norm;           // [hidden]
  std::vector<float> post_attention_norm;  // [hidden]
  // Query: q_proj without LoRA, else q_a_proj -> q_a_norm -> q_b_proj.
  cpu::WeightMatrix q_proj;                // [heads * q_head_dim, hidden]
  cpu::WeightMatrix q_a_proj;              // [q_lora_rank, hidden]
  std::vector<float> q_a_norm;             // [q_lora_rank]
  cpu::WeightMatrix q_b_proj;              // [heads * q_head_dim, q_lora_rank]
  cpu::WeightMatrix kv_a_proj;             // [kv_lora_rank + rope_dim, hidden]
  // q_a_proj's rows then kv_a_proj's in one matrix, those two being its views, where the
  // binder copied them (one product of x for both); else without data.
  cpu::WeightMatrix q_a_kv_a;
  std::vector<float> kv_a_norm;            // [kv_lora_rank]
  cpu::WeightMatrix kv_b_proj;             // [heads * (nope_dim + v_dim), kv_lora_rank]
  // kv_b_proj for the expanded form's product over every context row and the absorbed
  // form's W_UV fold: its int8 copy under the fast precision, else kv_b_proj.
  cpu::WeightMatrix kv_b_expand;
  // Under fast, each head's W_UK (kv_b_proj rows [h * (nope + v_dim), + nope))
  // transposed, stacked by heads, in int8: [heads * kv_lora_rank, nope_dim], the W_UK
  // fold as a product over its rows. Without data otherwise (the fold reads kv_b_proj).
  cpu::WeightMatrix kv_b_uk;
  cpu::WeightMatrix o_proj;                // [hidden, heads * v_dim]

  bool moe = false;
  MlpWeights dense;                        // when !moe; this rank's part (WeightShard)
  cpu::WeightMatrix router;                // [n_routed_experts, hidden]
  std::vector<float> choice_bias;          // [n_routed_experts], noaux_tc only
  std::vector<MlpWeights> experts;         // this rank's expert slots (all experts by default)
  // Per slot: the memory of an expert loaded after start (by a rebalance), freed with
  // it; nullptr for experts in ModelWeights::arena.
  std::vector<std::shared_ptr<Arena>> expert_memory;
  bool has_shared = false;
  MlpWeights shared;                       // intermediate = moe_intermediate * n_shared; this rank's part
};

enum class WeightResidency { kCopy, kMapped };

// Which part of the model a rank holds: attention heads [head_begin, head_end) (their
// rows of q_b_proj/q_proj and kv_b_proj, their columns of o_proj), vocabulary rows
// [vocab_begin, vocab_end) of lm_head, and per layer the logical experts of its slots,
// in slot order. Everything else is replicated. Default: the whole model.
struct WeightShard {
  int64_t head_begin = 0;
  int64_t head_end = -1;   // -1: all heads
  int64_t vocab_begin = 0;
  int64_t vocab_end = -1;  // -1: the whole vocabulary
  std::vector<std::vector<int32_t>> expert_slots;  // [layer]; empty: all experts, in order
  // The dense MLPs and the shared experts are split by their intermediate dimension:
  // this rank holds part mlp_part of mlp_parts (rows of gate/up, columns of down).
  int64_t mlp_part = 0;
  int64_t mlp_parts = 1;
};

struct ModelWeights {
  cpu::WeightMatrix embed;    // [vocab, hidden]
  std::vector<LayerWeights> layers;
  std::vector<float> final_norm;
  cpu::WeightMatrix lm_head;  // [vocab rows of this rank, hidden]; rows of embed when tied

  Arena arena;               // the matrices' memory, unless kMapped
  int64_t matrix_bytes = 0;  // bytes of all matrices as used

  // Binds every tensor of CHECKPOINT, copying (kCopy) or touching (kMapped) every
  // page once with PROGRESS, so that the first step does not pay for page faults.
  static StatusOr<std::unique_ptr<ModelWeights>> Bind(const Checkpoint& checkpoint,
                                                      const ProgressFn& progress,
                                                      WeightResidency residency = WeightResidency::kCopy,
                                                      const WeightShard& shard = {},
                                                      cpu::Precision precision = cpu::Precision::kExact);
};

// One routed expert bound on its own, for a rank that newly holds it: copied into
// memory of its own (freed when MEMORY is), or used in place when kMapped (and exact).
struct BoundExpert {
  MlpWeights weights;
  std::shared_ptr<Arena> memory;  // nullptr when kMapped
  int64_t bytes = 0;
};
StatusOr<BoundExpert> BindExpert(const Checkpoint& checkpoint, int64_t layer, int32_t expert,
                                 WeightResidency residency, cpu::Precision precision = cpu::Precision::kExact);

// Gives back to the system the pages wholly inside W's matrices (an expert bound at
// start, in the shared arena, that the rank no longer holds). W must not be read again.
void ReleaseExpertPages(const MlpWeights& w);

}  // namespace epic
