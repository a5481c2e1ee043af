// Routing semantics, on logits built so that the methods disagree.
#include "kernels/cpu/gating.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include <gtest/gtest.h>

namespace epic::cpu {
namespace {

std::vector<int32_t> Sorted(const int32_t* ids, int64_t k) {
  std::vector<int32_t> v(ids, ids + k);
  std::sort(v.begin(), v.end());
  return v;
}

TEST(GatingTest, GreedyPicksTopScoresAndScales) {
  // Softmax keeps the order; weights are the softmax scores times scale.
  const std::vector<float> logits = {0.1f, 2.0f, -1.0f, 1.5f};
  GateParams p;
  p.num_experts = 4;
  p.top_k = 2;
  p.scale = 16.0f;
  int32_t ids[2];
  float w[2];
  SelectExperts(logits.data(), 1, p, ids, w);
  EXPECT_EQ(ids[0], 1);
  EXPECT_EQ(ids[1], 3);
  double z = 0;
  for (float l : logits) z += std::exp(l);
  EXPECT_NEAR(w[0], 16 * std::exp(2.0) / z, 1e-5);
  EXPECT_NEAR(w[1], 16 * std::exp(1.5) / z, 1e-5);
}

TEST(GatingTest, GroupLimitedRanksGroupsByTheirBestExpert) {
  // 3 groups of 2. Group 0 holds the single best expert; group 1 the best pair.
  // V2 ranks by max: keeps group 0. (Ranking by the top-two sum would keep group 1.)
  const std::vector<float> logits = {3.0f, -5.0f, 2.5f, 2.5f, 0.0f, 0.0f};
  GateParams p;
  p.num_experts = 6;
  p.top_k = 2;
  p.num_groups = 3;
  p.topk_groups = 1;
  p.ranking = GroupRanking::kMax;
  int32_t ids[2];
  float w[2];
  SelectExperts(logits.data(), 1, p, ids, w);
  EXPECT_EQ(Sorted(ids, 2), (std::vector<int32_t>{0, 1}));

  p.ranking = GroupRanking::kTopTwoSum;
  SelectExperts(logits.data(), 1, p, ids, w);
  EXPECT_EQ(Sorted(ids, 2), (std::vector<int32_t>{2, 3}));
}

TEST(GatingTest, NoauxBiasChoosesButDoesNotWeight) {
  // Sigmoid scores; the bias moves the choice to expert 3, the weight is its score.
  const std::vector<float> logits = {1.0f, 0.0f, 0.0f, -1.0f};
  const std::vector<float> bias = {0.0f, 0.0f, 0.0f, 1.0f};
  GateParams p;
  p.num_experts = 4;
  p.top_k = 1;
  p.num_groups = 2;
  p.topk_groups = 1;
  p.ranking = GroupRanking::kTopTwoSum;
  p.sigmoid = true;
  p.choice_bias = bias.data();
  p.scale = 2.5f;
  int32_t id;
  float w;
  SelectExperts(logits.data(), 1, p, &id, &w);
  // Group sums with bias: {0.731+0.5, 0.5+0.269+1}: group 1 wins, expert 3 inside it.
  EXPECT_EQ(id, 3);
  EXPECT_NEAR(w, 2.5 / (1 + std::exp(1.0)), 1e-6);
}

TEST(GatingTest, NormalizeThenScale) {
  const std::vector<float> logits = {0.0f, 1.0f, 2.0f};
  GateParams p;
  p.num_experts = 3;
  p.top_k = 2;
  p.normalize = true;
  p.scale = 1.0f;
  int32_t ids[2];
  float w[2];
  SelectExperts(logits.data(), 1, p, ids, w);
  EXPECT_NEAR(w[0] + w[1], 1.0, 1e-6);
  EXPECT_NEAR(w[0] / w[1], std::exp(1.0), 1e-5);
}

TEST(GatingTest, TiesGoToTheLowerIndexAndManyTokens) {
  std::vector<float> logits(3 * 8, 0.0f);  // all equal
  GateParams p;
  p.num_experts = 8;
  p.top_k = 3;
  p.num_groups = 4;
  p.topk_groups = 2;
  p.ranking = GroupRanking::kMax;
  std::vector<int32_t> ids(9);
  std::vector<float> w(9);
  SelectExperts(logits.data(), 3, p, ids.data(), w.data());
  for (int t = 0; t < 3; ++t) {
    EXPECT_EQ(Sorted(ids.data() + 3 * t, 3), (std::vector<int32_t>{0, 1, 2}));
  }
}

// Many tokens (the threaded path) against a plain reference: logits from a few values, so
// that ties are common; softmax keeps the logits' order, so the reference ranks logits.
TEST(GatingTest, ManyTokensMatchAPlainRankingOfTheLogits) {
  const int64_t tokens = 777, experts = 64, groups = 8, keep_groups = 3, top_k = 6;
  std::vector<float> logits(static_cast<size_t>(tokens * experts));
  uint32_t state = 12345;
  for (float& l : logits) {
    state = state * 1664525u + 1013904223u;
    l = 0.25f * static_cast<float>((state >> 24) % 9) - 1.0f;
  }
  GateParams p;
  p.num_experts = experts;
  p.top_k = top_k;
  p.num_groups = groups;
  p.topk_groups = keep_groups;
  p.ranking = GroupRanking::kMax;
  p.scale = 2.0f;
  std::vector<int32_t> ids(static_cast<size_t>(tokens * top_k));
  std::vector<float> w(ids.size());
  SelectExperts(logits.data(), tokens, p, ids.data(), w.data());

  const int64_t size = experts / groups;
  for (int64_t t = 0; t < tokens; ++t) {
    const float* l = logits.data() + t * experts;
    // Groups by their best logit, lower group on ties; then experts of the kept groups.
    std::vector<int64_t> order(static_cast<size_t>(groups));
    for (int64_t g = 0; g < groups; ++g) order[g] = g;
    auto best = [&](int64_t g) { return *std::max_element(l + g * size, l + (g + 1) * size); };
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return best(a) > best(b); });
    std::vector<int64_t> candidates;
    for (int64_t e = 0; e < experts; ++e) {
      if (std::find(order.begin(), order.begin() + keep_groups, e / size) != order.begin() + keep_groups) {
        candidates.push_back(e);
      }
    }
    std::stable_sort(candidates.begin(), candidates.end(), [&](int64_t a, int64_t b) { return l[a] > l[b]; });
    double z = 0;
    for (int64_t e = 0; e < experts; ++e) z += std::exp(static_cast<double>(l[e]));
    for (int64_t k = 0; k < top_k; ++k) {
      ASSERT_EQ(ids[t * top_k + k], candidates[k]) << "token " << t << " choice " << k;
      EXPECT_NEAR(w[t * top_k + k], 2.0 * std::exp(static_cast<double>(l[candidates[k]])) / z, 1e-6);
    }
  }
}

}  // namespace
}  // namespace epic::cpu
