// The placement planner: properties every plan must have, balance on skewed loads
// against DeepSeek's published EPLB heuristics, and few moves under drifting loads.
#include "placement/placement_planner.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <numeric>
#include <random>
#include <set>
#include <tuple>

#include <gtest/gtest.h>

#include "placement/eplb_baseline.h"
#include "tests/placement/zipf_loads.h"

namespace epic::placement {
namespace {

// Zipf-like loads: expert ranks shuffled per layer, load ~ 1 / rank^s.
std::vector<std::vector<double>> Zipf(int layers, int experts, double s, uint64_t seed) {
  return ZipfLoads(layers, experts, s, seed);
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

// The node of every copy of a routing group's experts must be the same: the groups are
// contiguous blocks of GROUP_SIZE experts, nodes contiguous blocks of PER_NODE ranks.
void ExpectGroupsWithinNodes(const PlacementTable& plan, int group_size, int per_node) {
  for (size_t l = 0; l < plan.size(); ++l) {
    std::map<int, std::set<int>> nodes_of_group;
    for (size_t r = 0; r < plan[l].size(); ++r) {
      for (int32_t e : plan[l][r]) nodes_of_group[e / group_size].insert(static_cast<int>(r) / per_node);
    }
    for (const auto& [g, nodes] : nodes_of_group) {
      EXPECT_EQ(nodes.size(), 1u) << "layer " << l << ": group " << g << " spans nodes";
    }
  }
}

// Whether a rank of LAYER holds one expert twice, which EPLB's packing allows and epic's
// runtime (parallel::ExpertPlacement) refuses.
bool Stacks(const std::vector<std::vector<int32_t>>& layer) {
  for (const auto& r : layer) {
    if (std::set<int32_t>(r.begin(), r.end()).size() != r.size()) return true;
  }
  return false;
}

struct Shape {
  int ranks;
  int spare;  // redundant slots in all
  int nodes;  // with more than one, 8 routing groups kept within nodes
};

TEST(PlannerTest, EveryPlanIsValidAndDeterministic) {
  const Shape shapes[] = {{8, 0, 1}, {8, 8, 1}, {16, 32, 1}, {64, 32, 1}, {8, 0, 2},
                          {16, 32, 4}, {16, 16, 8}, {64, 32, 8}, {32, 64, 4}};
  for (const Shape& sh : shapes) {
    SCOPED_TRACE(::testing::Message() << sh.ranks << " ranks, " << sh.spare << " spare, " << sh.nodes << " nodes");
    const int slots = (160 + sh.spare) / sh.ranks;
    PlannerInput in;
    in.loads = Zipf(3, 160, 1.1, 11);
    in.num_ranks = sh.ranks;
    in.slots_per_rank = slots;
    in.num_nodes = sh.nodes;
    in.num_groups = sh.nodes > 1 ? 8 : 1;
    auto a = PlanPlacement(in);
    auto b = PlanPlacement(in);
    ASSERT_TRUE(a.ok() && b.ok()) << a.status().ToString();
    ExpectValid(*a, 160, sh.ranks, slots);
    EXPECT_EQ(*a, *b);
    if (sh.nodes > 1) ExpectGroupsWithinNodes(*a, 20, sh.ranks / sh.nodes);
    // From a current placement (the contiguous one, or a plan for other loads), too.
    const PlacementTable contiguous = ContiguousPlacement(3, 160, sh.ranks);
    in.loads = Zipf(3, 160, 0.8, 12);
    const PlacementTable previous = *a;
    for (const PlacementTable* current : {&contiguous, &previous}) {
      in.current = current;
      auto c = PlanPlacement(in);
      auto d = PlanPlacement(in);
      ASSERT_TRUE(c.ok() && d.ok()) << c.status().ToString();
      ExpectValid(*c, 160, sh.ranks, slots);
      EXPECT_EQ(*c, *d);
      if (sh.nodes > 1) ExpectGroupsWithinNodes(*c, 20, sh.ranks / sh.nodes);
    }
  }
}

// Like for like: epic without nodes against EPLB's global policy (and the hierarchical
// one on a single node), epic with nodes and 8 groups against the hierarchical policy.
// (EPLB's global policy ignores groups, so it is no peer for a plan that keeps them.)
// Per layer, epic's busiest rank is never busier, except where EPLB's plan puts two
// copies of one expert on a rank: epic's runtime refuses that, and every epic rank
// fills all its slots with distinct experts, so EPLB's stacked copy amounts to a slot
// left idle that epic cannot leave. Those layers are counted and bounded separately.
TEST(PlannerTest, NeverWorseThanEplbOnZipfLoads) {
  const Shape shapes[] = {{8, 0, 1},  {16, 0, 1},  {32, 0, 1},  {8, 8, 1},  {16, 32, 1}, {32, 32, 1},
                          {64, 32, 1}, {64, 96, 1}, {8, 0, 2},  {16, 0, 4}, {16, 32, 2}, {32, 32, 4},
                          {16, 16, 8}, {64, 32, 8}, {64, 96, 8}};
  const int layers = 6;
  int compared = 0, stacked_wins = 0;
  double worst_stacked = 1;
  // Layers where epic is strictly better, and layers compared: without spare slots, and
  // with 8 nodes, per shape.
  std::map<std::tuple<int, int, int>, std::pair<int, int>> better;
  for (double s : {0.6, 1.0, 1.4}) {
    for (uint64_t seed : {21, 22}) {
      const auto loads = Zipf(layers, 160, s, seed);
      for (const Shape& sh : shapes) {
        SCOPED_TRACE(::testing::Message() << "Zipf(" << s << ") seed " << seed << ", " << sh.ranks << " ranks, "
                                          << sh.spare << " spare, " << sh.nodes << " nodes");
        const int slots = (160 + sh.spare) / sh.ranks;
        PlannerInput in;
        in.loads = loads;
        in.num_ranks = sh.ranks;
        in.slots_per_rank = slots;
        in.num_nodes = sh.nodes;
        in.num_groups = sh.nodes > 1 ? 8 : 1;
        auto plan = PlanPlacement(in);
        ASSERT_TRUE(plan.ok()) << plan.status().ToString();
        std::vector<PlacementTable> baselines = {EplbHierarchical(loads, sh.ranks, slots, sh.nodes, 8)};
        if (sh.nodes == 1) baselines.push_back(EplbGlobal(loads, sh.ranks, slots));
        for (const PlacementTable& base : baselines) {
          double epic_sum = 0, base_sum = 0;
          for (int l = 0; l < layers; ++l) {
            const double ours = PlacementStats(loads[l], (*plan)[l]).max_rank_load;
            const double theirs = PlacementStats(loads[l], base[l]).max_rank_load;
            epic_sum += ours;
            base_sum += theirs;
            ++compared;
            if (Stacks(base[l])) {
              if (ours > theirs * (1 + 1e-9)) {
                ++stacked_wins;
                worst_stacked = std::max(worst_stacked, ours / theirs);
                EXPECT_LE(ours, theirs * 1.05) << "layer " << l << ", EPLB stacking copies";
              }
            } else {
              EXPECT_LE(ours, theirs * (1 + 1e-9)) << "layer " << l;
            }
            if (sh.spare == 0 || sh.nodes == 8) {
              auto& [wins, layers_seen] = better[{sh.ranks, sh.spare, sh.nodes}];
              wins += ours < theirs * (1 - 1e-9);
              ++layers_seen;
            }
          }
          EXPECT_LE(epic_sum, base_sum * (1 + 1e-4)) << "over the layers";
        }
      }
    }
  }
  int no_spare_wins = 0, many_node_wins = 0;
  for (const auto& [shape, counts] : better) {
    const auto [ranks, spare, nodes] = shape;
    std::printf("strictly better than EPLB at %d ranks, %d spare, %d nodes: %d of %d comparisons\n", ranks, spare,
                nodes, counts.first, counts.second);
    (spare == 0 ? no_spare_wins : many_node_wins) += counts.first;
  }
  std::printf("EPLB better by stacking two copies of an expert on a rank: %d of %d layers, by up to %.2f%%\n",
              stacked_wins, compared, 100 * (worst_stacked - 1));
  EXPECT_GT(no_spare_wins, 0);
  EXPECT_GT(many_node_wins, 0);
}

// Zipf loads whose hot spot moves: the experts sit on a ring in a random order, and an
// expert's load falls with its distance from a centre that advances SHIFT positions a
// window, so each expert heats up or cools down a little at a time.
std::vector<std::vector<double>> Drifting(const std::vector<std::vector<int>>& rings, double s, int window, int shift) {
  std::vector<std::vector<double>> loads;
  for (const auto& ring : rings) {
    const int experts = static_cast<int>(ring.size());
    const int centre = shift * window % experts;
    std::vector<double> layer(experts);
    for (int i = 0; i < experts; ++i) {
      const int d = std::min(std::abs(i - centre), experts - std::abs(i - centre));
      layer[ring[i]] = 10000.0 / std::pow(d + 1, s);
    }
    loads.push_back(layer);
  }
  return loads;
}

// Re-planned every window from the previous plan, epic stays within 3% of a fresh plan
// and moves far fewer experts than a fresh plan or than EPLB, which has no notion of
// the current placement.
TEST(PlannerTest, FollowsDriftingLoadsWithFewMoves) {
  const Shape shapes[] = {{16, 32, 1}, {8, 0, 1}, {64, 32, 8}};
  const int layers = 4, windows = 10;
  std::mt19937_64 rng(31);
  std::vector<std::vector<int>> rings(layers, std::vector<int>(160));
  for (auto& ring : rings) {
    std::iota(ring.begin(), ring.end(), 0);
    std::shuffle(ring.begin(), ring.end(), rng);
  }
  for (const Shape& sh : shapes) {
    SCOPED_TRACE(::testing::Message() << sh.ranks << " ranks, " << sh.spare << " spare, " << sh.nodes << " nodes");
    const int slots = (160 + sh.spare) / sh.ranks;
    PlannerInput in;
    in.num_ranks = sh.ranks;
    in.slots_per_rank = slots;
    in.num_nodes = sh.nodes;
    in.num_groups = sh.nodes > 1 ? 8 : 1;
    auto eplb = [&](const std::vector<std::vector<double>>& loads) {
      return sh.nodes > 1 ? EplbHierarchical(loads, sh.ranks, slots, sh.nodes, 8) : EplbGlobal(loads, sh.ranks, slots);
    };
    in.loads = Drifting(rings, 1.0, 0, 2);
    auto first = PlanPlacement(in);
    ASSERT_TRUE(first.ok());
    PlacementTable kept = *first, base = eplb(in.loads);
    int64_t kept_moves = 0, fresh_moves = 0, base_moves = 0;
    double kept_max = 0, fresh_max = 0, mean = 0;
    for (int w = 1; w <= windows; ++w) {
      in.loads = Drifting(rings, 1.0, w, 2);
      in.current = &kept;
      auto next = PlanPlacement(in);
      in.current = nullptr;
      auto fresh = PlanPlacement(in);
      ASSERT_TRUE(next.ok() && fresh.ok());
      ExpectValid(*next, 160, sh.ranks, slots);
      if (sh.nodes > 1) ExpectGroupsWithinNodes(*next, 20, sh.ranks / sh.nodes);
      const PlacementTable next_base = eplb(in.loads);
      kept_moves += ExpertsMoved(kept, *next);
      fresh_moves += ExpertsMoved(kept, *fresh);
      base_moves += ExpertsMoved(base, next_base);
      const double kept_imbalance = Imbalance(in.loads, *next), fresh_imbalance = Imbalance(in.loads, *fresh);
      EXPECT_LE(kept_imbalance, 1.03 * fresh_imbalance) << "window " << w;
      for (int l = 0; l < layers; ++l) {
        kept_max += PlacementStats(in.loads[l], (*next)[l]).max_rank_load;
        fresh_max += PlacementStats(in.loads[l], (*fresh)[l]).max_rank_load;
        mean += PlacementStats(in.loads[l], (*fresh)[l]).mean_rank_load;
      }
      kept = std::move(*next);
      base = next_base;
    }
    std::printf("%d ranks, %d spare, %d nodes, %d windows: imbalance kept %.4f, fresh %.4f; experts moved kept %lld, "
                "fresh %lld, EPLB %lld\n",
                sh.ranks, sh.spare, sh.nodes, windows, kept_max / mean, fresh_max / mean,
                static_cast<long long>(kept_moves), static_cast<long long>(fresh_moves),
                static_cast<long long>(base_moves));
    EXPECT_LE(kept_max, 1.02 * fresh_max);
    EXPECT_GT(kept_moves, 0);  // the loads did move
    EXPECT_LT(kept_moves, fresh_moves * 2 / 5);
    EXPECT_LT(kept_moves, base_moves * 2 / 5);
  }
}

}  // namespace
}  // namespace epic::placement
