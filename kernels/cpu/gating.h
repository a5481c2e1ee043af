// MoE routing: from router logits to each token's top-k experts and weights.
#pragma once

#include <cstdint>

namespace epic::cpu {

enum class GroupRanking {
  kNone,     // greedy: top-k over all experts
  kMax,      // DeepSeek-V2 group_limited_greedy: a group ranks by its best expert
  kTopTwoSum,  // DeepSeek-V3 noaux_tc: a group ranks by the sum of its best two
};

struct GateParams {
  int64_t num_experts = 0;
  int64_t top_k = 0;
  int64_t num_groups = 1;     // experts split into contiguous groups
  int64_t topk_groups = 1;    // groups a token may use
  GroupRanking ranking = GroupRanking::kNone;
  bool sigmoid = false;       // scores: sigmoid(logits); otherwise softmax(logits)
  const float* choice_bias = nullptr;  // added to scores for choosing only (noaux_tc)
  bool normalize = false;     // divide the chosen weights by their sum (+1e-20)
  float scale = 1.0f;         // then multiply them by this
};

// logits [tokens, num_experts] -> expert ids and weights [tokens, top_k]. Ties go to
// the lower expert index. Experts outside the kept groups are excluded (-inf), as in
// DeepSeek's own inference code; HF's fills 0, which differs only when every kept
// choice value is negative. Scores are computed in F32 as the reference models do.
void SelectExperts(const float* logits, int64_t tokens, const GateParams& params, int32_t* ids,
                   float* weights);

}  // namespace epic::cpu
