// The placement planner: properties every plan must have, and balance on skewed loads.
#include "coordinator/placement_planner.h"

#include <cmath>
#include <map>
#include <random>
#include <set>

#include <gtest/gtest.h>

namespace epic::coordinator {
namespace {

// Zipf-like loads: expert ranks shuffled per layer, load ~ 1 / rank^s.
std::vector<std::vector<double>> Zipf(int layers, int experts, double s, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<std::vector<double>> loads(layers, std::vector<double>(experts));
  for (auto& layer : loads) {
    std::vector<int> order(experts);
    for (int i = 0; i < experts; ++i) order[i] = i;
    std::shuffle(order.begin(), order.end(), rng);
    for (int i = 0; i < experts; ++i) layer[order[i]] = 10000.0 / std::pow(i + 1, s);
  }
  return loads;
}

void ExpectValid(const PlacementTable& plan, int64_t experts, int ranks, int slots) {
  for (const auto& layer : plan) {
    ASSERT_EQ(static_cast<int>(layer.size()), ranks);
    std::set<int32_t> seen;
    for (const auto& r : layer) {
      EXPECT_EQ(static_cast<int>(r.size()), slots);  // every slot used
      EXPECT_EQ(std::set<int32_t>(r.begin(), r.end()).size(), r.size()) << "expert twice on a rank";
      seen.insert(r.begin(), r.end());
    }
    EXPECT_EQ(static_cast<int64_t>(seen.size()), experts) << "an expert is on no rank";
  }
}

double Imbalance(const std::vector<std::vector<double>>& loads, const PlacementTable& plan) {
  double max = 0, mean = 0;
  for (size_t l = 0; l < loads.size(); ++l) {
    const LayerStats s = PlacementStats(loads[l], plan[l]);
    max += s.max_rank_load;
    mean += s.mean_rank_load;
  }
  return max / mean;
}

TEST(PlannerTest, BalancesZipfLoadsAndUsesReplicas) {
  const auto loads = Zipf(4, 160, 1.2, 1);
  PlannerInput in;
  in.loads = loads;
  in.num_ranks = 8;
  in.slots_per_rank = 20;  // no redundant slots
  auto plain = PlanPlacement(in);
  ASSERT_TRUE(plain.ok()) << plain.status().ToString();
  ExpectValid(*plain, 160, 8, 20);
  const double contiguous = Imbalance(loads, ContiguousPlacement(4, 160, 8));
  const double planned = Imbalance(loads, *plain);
  EXPECT_LT(planned, contiguous);
  in.slots_per_rank = 24;  // 32 redundant slots
  auto replicated = PlanPlacement(in);
  ASSERT_TRUE(replicated.ok());
  ExpectValid(*replicated, 160, 8, 24);
  EXPECT_LT(Imbalance(loads, *replicated), planned);
  EXPECT_LT(Imbalance(loads, *replicated), 1.05);
  // The lower bound: no rank can carry less than the hottest expert's share.
  std::cout << "imbalance: contiguous " << contiguous << ", planned " << planned << ", with 32 replicas "
            << Imbalance(loads, *replicated) << "\n";
}

TEST(PlannerTest, KeepsGroupsWithinNodes) {
  const auto loads = Zipf(2, 160, 1.0, 2);
  PlannerInput in;
  in.loads = loads;
  in.num_ranks = 8;
  in.slots_per_rank = 22;
  in.num_nodes = 2;
  in.num_groups = 8;  // 20 experts a group, 4 groups a node
  auto plan = PlanPlacement(in);
  ASSERT_TRUE(plan.ok()) << plan.status().ToString();
  ExpectValid(*plan, 160, 8, 22);
  for (const auto& layer : *plan) {
    std::map<int, std::set<int>> nodes_of_group;
    for (int r = 0; r < 8; ++r) {
      for (int32_t e : layer[r]) nodes_of_group[e / 20].insert(r / 4);
    }
    for (const auto& [g, nodes] : nodes_of_group) EXPECT_EQ(nodes.size(), 1u) << "group " << g << " spans nodes";
  }
}

TEST(PlannerTest, DeterministicAndKeepsExpertsInPlace) {
  const auto loads = Zipf(3, 64, 1.1, 3);
  PlannerInput in;
  in.loads = loads;
  in.num_ranks = 4;
  in.slots_per_rank = 18;
  auto a = PlanPlacement(in);
  auto b = PlanPlacement(in);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(*a, *b);
  // Re-planning the same loads from the plan itself moves nothing.
  in.current = &*a;
  auto again = PlanPlacement(in);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(ExpertsMoved(*a, *again), 0);
  // Slightly drifted loads: far fewer moves than planning from scratch, balance kept.
  auto drifted = loads;
  for (auto& layer : drifted) layer[5] *= 1.002;
  in.loads = drifted;
  auto kept = PlanPlacement(in);
  in.current = nullptr;
  auto fresh = PlanPlacement(in);
  ASSERT_TRUE(kept.ok() && fresh.ok());
  EXPECT_LE(ExpertsMoved(*a, *kept), ExpertsMoved(*a, *fresh));
  EXPECT_LT(Imbalance(drifted, *kept), 1.03 * Imbalance(drifted, *fresh));
}

TEST(PlannerTest, RefusesWhatCannotBePlanned) {
  PlannerInput in;
  in.loads = {{1, 2, 3, 4}};
  in.num_ranks = 2;
  in.slots_per_rank = 1;
  EXPECT_NE(PlanPlacement(in).status().message().find("cannot hold 4 experts"), std::string::npos);
  in.slots_per_rank = 2;
  in.num_nodes = 3;
  EXPECT_NE(PlanPlacement(in).status().message().find("must divide ranks"), std::string::npos);
  in.num_nodes = 1;
  in.num_groups = 3;
  EXPECT_NE(PlanPlacement(in).status().message().find("must divide the 4 experts"), std::string::npos);
  in.num_groups = 1;
  in.loads = {{1, 2, 3, 4}, {1, 2}};
  EXPECT_NE(PlanPlacement(in).status().message().find("layer 1 has 2 experts"), std::string::npos);
  in.loads = {{1, -2, 3, 4}};
  EXPECT_NE(PlanPlacement(in).status().message().find("negative"), std::string::npos);
}

}  // namespace
}  // namespace epic::coordinator
