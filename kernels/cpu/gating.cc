#include "kernels/cpu/gating.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels/cpu/ops.h"

namespace epic::cpu {
namespace {

// Indices of the K largest values, largest first, lower index on ties.
void TopK(const float* values, int64_t n, int64_t k, int32_t* out) {
  std::vector<int32_t> order(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) order[i] = static_cast<int32_t>(i);
  auto better = [values](int32_t a, int32_t b) {
    return values[a] > values[b] || (values[a] == values[b] && a < b);
  };
  std::partial_sort(order.begin(), order.begin() + k, order.end(), better);
  std::copy(order.begin(), order.begin() + k, out);
}

}  // namespace

void SelectExperts(const float* logits, int64_t tokens, const GateParams& p, int32_t* ids,
                   float* weights) {
  const int64_t n = p.num_experts;
  const int64_t group_size = n / p.num_groups;
  std::vector<float> scores(static_cast<size_t>(n));
  std::vector<float> choice(static_cast<size_t>(n));
  std::vector<float> group_score(static_cast<size_t>(p.num_groups));
  std::vector<int32_t> groups(static_cast<size_t>(p.topk_groups));
  for (int64_t t = 0; t < tokens; ++t) {
    const float* l = logits + t * n;
    if (p.sigmoid) {
      for (int64_t e = 0; e < n; ++e) scores[e] = 1.0f / (1.0f + std::exp(-l[e]));
    } else {
      std::copy(l, l + n, scores.begin());
      Softmax(scores.data(), n);
    }
    for (int64_t e = 0; e < n; ++e) choice[e] = scores[e] + (p.choice_bias ? p.choice_bias[e] : 0.0f);

    if (p.ranking != GroupRanking::kNone) {
      for (int64_t g = 0; g < p.num_groups; ++g) {
        const float* s = choice.data() + g * group_size;
        if (p.ranking == GroupRanking::kMax) {
          group_score[g] = *std::max_element(s, s + group_size);
        } else {
          int32_t best[2];
          TopK(s, group_size, 2, best);
          group_score[g] = s[best[0]] + s[best[1]];
        }
      }
      TopK(group_score.data(), p.num_groups, p.topk_groups, groups.data());
      std::vector<bool> keep(static_cast<size_t>(p.num_groups), false);
      for (int32_t g : groups) keep[g] = true;
      for (int64_t e = 0; e < n; ++e) {
        if (!keep[e / group_size]) choice[e] = -std::numeric_limits<float>::infinity();
      }
    }

    int32_t* id = ids + t * p.top_k;
    float* w = weights + t * p.top_k;
    TopK(choice.data(), n, p.top_k, id);
    double sum = 0.0;
    for (int64_t k = 0; k < p.top_k; ++k) {
      w[k] = scores[id[k]];
      sum += w[k];
    }
    const double norm = p.normalize ? 1.0 / (sum + 1e-20) : 1.0;
    for (int64_t k = 0; k < p.top_k; ++k) w[k] = static_cast<float>(w[k] * norm * p.scale);
  }
}

}  // namespace epic::cpu
