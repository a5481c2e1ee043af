// The routed-expert layer's own steps on the GPU, around the expert products: the gate
// (cpu::SelectExperts' semantics), the grouping of routed choices by expert so that each
// expert multiplies all of its rows at once, and the weighted combine back into token rows.
// The grouping is the device form of parallel::GroupBySlot when slots are experts.
//
// Pointers named here are device pointers. As in ops.h, each function checks its sizes
// (INVALID_ARGUMENT otherwise), enqueues on STREAM (nullptr: the default stream) and
// returns without waiting; faults inside a kernel show at the next synchronising call.
// Nothing here uses float atomics: every result is the same from run to run.
#pragma once

#include <cstdint>

#include "common/status.h"
#include "kernels/cpu/gating.h"
#include "kernels/cuda/buffer.h"

namespace epic::cuda {

// The gate keeps one token's experts in shared memory; DeepSeek's largest is 256.
inline constexpr int64_t kMaxGateExperts = 1024;

// logits [tokens, num_experts] -> ids and weights [tokens, top_k], as cpu::SelectExperts
// does with PARAMS: the same choices (lower index on ties, among experts and among
// groups; experts outside the kept groups excluded as -inf) and weights within a few
// F32 ulps. PARAMS.choice_bias is a host pointer and is never read here: CHOICE_BIAS
// [num_experts] is its device copy, and is required when PARAMS.choice_bias is set.
// REQUIRES: 1 <= top_k <= num_experts <= kMaxGateExperts; with group ranking,
// num_groups divides num_experts and 1 <= topk_groups <= num_groups, and kTopTwoSum
// needs groups of two or more. Logits are finite (the CPU's sort has no order for NaN).
Status TopKGating(const float* logits, int64_t tokens, const cpu::GateParams& params, const float* choice_bias,
                  int32_t* ids, float* weights, cudaStream_t stream = nullptr);

// Where PermuteByExpert writes, all allocated by the caller. "Grouped rows" are the
// routed choices ordered by expert, then by token, then by k: the rows of expert e are
// [offsets[e], offsets[e + 1]).
struct ExpertRows {
  int32_t* counts = nullptr;        // [num_experts] choices routed to each expert
  int32_t* offsets = nullptr;       // [num_experts + 1] exclusive scan of counts
  int32_t* source_token = nullptr;  // [tokens * top_k] each grouped row's token
  float* weight = nullptr;          // [tokens * top_k] each grouped row's gate weight
  int32_t* grouped_row = nullptr;   // [tokens, top_k] where each choice went; -1: not routed
  int32_t* scratch = nullptr;       // [PermuteScratchCount(...)] per-chunk counts
};

// The int32 values of ExpertRows::scratch that PermuteByExpert needs.
int64_t PermuteScratchCount(int64_t tokens, int64_t top_k, int64_t num_experts);

// Groups the choices IDS [tokens, top_k] (with WEIGHTS [tokens, top_k]) by expert, in
// token order within each expert, exactly as parallel::GroupBySlot orders a rank's
// received rows. An id outside [0, num_experts) (such as a -1 pad) is not routed: it is
// counted nowhere and its grouped_row is -1. Grouped rows past offsets[num_experts] are
// left untouched. The rows of hidden states then follow with GatherRows(source_token).
// REQUIRES: 1 <= num_experts <= kMaxGateExperts, tokens * top_k < 2^31.
Status PermuteByExpert(const int32_t* ids, const float* weights, int64_t tokens, int64_t top_k,
                       int64_t num_experts, const ExpertRows& out, cudaStream_t stream = nullptr);

// The combine: y[t, :] += sum over k of weights[t, k] * expert_out[grouped_row[t, k], :],
// the k terms summed in k order in F32 and then added to y, one block per token (no
// atomics). Choices with grouped_row -1 (or outside [0, rows)) add nothing; a token with
// none leaves its row of y untouched. expert_out is [rows, ldx], y is [tokens, ldy],
// both n wide.
Status ScatterAddWeighted(const float* expert_out, int64_t rows, int64_t n, int64_t ldx, const int32_t* grouped_row,
                          const float* weights, int64_t tokens, int64_t top_k, float* y, int64_t ldy,
                          cudaStream_t stream = nullptr);

}  // namespace epic::cuda
