#include "kernels/cpu/gating.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels/cpu/ops.h"
#include "kernels/cpu/parallel.h"

namespace epic::cpu {
namespace {

// Indices of the K largest of VALUES[0, N), largest first, lower index on ties: each
// value in index order goes in after those not smaller, so an equal one already kept
// stays ahead. (K is small: a top-k of 6 or 8 from 160; partial_sort over an index
// vector cost a third of the routing.)
void TopK(const float* values, int64_t n, int64_t k, int32_t* out) {
  if (k <= 0) return;
  int64_t kept = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float v = values[i];
    if (kept == k && !(v > values[out[k - 1]])) continue;
    int64_t at = std::min(kept, k - 1);
    while (at > 0 && values[out[at - 1]] < v) {
      out[at] = out[at - 1];
      --at;
    }
    out[at] = static_cast<int32_t>(i);
    kept = std::min(kept + 1, k);
  }
}

// One token's choice; SCORES and CHOICE hold num_experts values, GROUP_SCORE num_groups,
// GROUPS topk_groups.
void SelectOne(const float* l, const GateParams& p, float* scores, float* choice, float* group_score,
               int32_t* groups, int32_t* id, float* w) {
  const int64_t n = p.num_experts;
  const int64_t group_size = n / p.num_groups;
  if (p.sigmoid) {
    for (int64_t e = 0; e < n; ++e) scores[e] = 1.0f / (1.0f + std::exp(-l[e]));
  } else {
    std::copy(l, l + n, scores);
    Softmax(scores, n);
  }
  for (int64_t e = 0; e < n; ++e) choice[e] = scores[e] + (p.choice_bias ? p.choice_bias[e] : 0.0f);

  if (p.ranking != GroupRanking::kNone) {
    for (int64_t g = 0; g < p.num_groups; ++g) {
      const float* s = choice + g * group_size;
      if (p.ranking == GroupRanking::kMax) {
        group_score[g] = *std::max_element(s, s + group_size);
      } else {
        int32_t best[2];
        TopK(s, group_size, 2, best);
        group_score[g] = s[best[0]] + s[best[1]];
      }
    }
    TopK(group_score, p.num_groups, p.topk_groups, groups);
    for (int64_t g = 0; g < p.num_groups; ++g) {
      if (std::find(groups, groups + p.topk_groups, g) != groups + p.topk_groups) continue;
      std::fill(choice + g * group_size, choice + (g + 1) * group_size, -std::numeric_limits<float>::infinity());
    }
  }

  TopK(choice, n, p.top_k, id);
  double sum = 0.0;
  for (int64_t k = 0; k < p.top_k; ++k) {
    w[k] = scores[id[k]];
    sum += w[k];
  }
  const double norm = p.normalize ? 1.0 / (sum + 1e-20) : 1.0;
  for (int64_t k = 0; k < p.top_k; ++k) w[k] = static_cast<float>(w[k] * norm * p.scale);
}

}  // namespace

void SelectExperts(const float* logits, int64_t tokens, const GateParams& p, int32_t* ids,
                   float* weights) {
  // Tokens are independent: a prefill's hundreds spread over the threads.
  ParallelRows(tokens, tokens * p.num_experts >= 8192, [&](int64_t t) {
    thread_local std::vector<float> scores, choice, group_score;
    thread_local std::vector<int32_t> groups;
    scores.resize(static_cast<size_t>(p.num_experts));
    choice.resize(static_cast<size_t>(p.num_experts));
    group_score.resize(static_cast<size_t>(p.num_groups));
    groups.resize(static_cast<size_t>(p.topk_groups));
    SelectOne(logits + t * p.num_experts, p, scores.data(), choice.data(), group_score.data(), groups.data(),
              ids + t * p.top_k, weights + t * p.top_k);
  });
}

}  // namespace epic::cpu
