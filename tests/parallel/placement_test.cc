#include "parallel/expert_placement.h"

#include <set>

#include <gtest/gtest.h>

namespace epic::parallel {
namespace {

TEST(ExpertPlacementTest, ContiguousKeepsGroupsTogether) {
  // 160 experts in 8 groups of 20 on 8 ranks: group g on rank g.
  const auto p = ExpertPlacement::Contiguous(3, {false, true, true}, 160, 8);
  EXPECT_FALSE(p.is_moe_layer(0));
  for (int r = 0; r < 8; ++r) {
    const auto& slots = p.slots(1, r);
    ASSERT_EQ(slots.size(), 20u);
    for (int32_t e : slots) EXPECT_EQ(e / 20, r);
  }
}

TEST(ExpertPlacementTest, UnevenSplitsAndReplicas) {
  const auto p = ExpertPlacement::Contiguous(1, {true}, 10, 3, /*redundant_per_rank=*/2);
  std::multiset<int32_t> all;
  for (int r = 0; r < 3; ++r) {
    const auto& s = p.slots(0, r);
    EXPECT_EQ(std::set<int32_t>(s.begin(), s.end()).size(), s.size()) << "duplicate on rank " << r;
    all.insert(s.begin(), s.end());
  }
  EXPECT_EQ(all.size(), 10u + 6u);
  for (int e = 0; e < 10; ++e) EXPECT_GE(p.replicas(0, e).size(), 1u);
  // Rank 0 holds experts 0..2 and replicas of 3, 4.
  EXPECT_EQ(p.slots(0, 0), (std::vector<int32_t>{0, 1, 2, 3, 4}));
}

TEST(ExpertPlacementTest, RoutePrefersTheLocalReplicaThenSplitsDeterministically) {
  auto p = ExpertPlacement::Create({{{0, 1}, {1, 2}, {1, 3}}}, 4);
  ASSERT_TRUE(p.ok()) << p.status().ToString();
  // Expert 1 lives on ranks 0, 1 and 2: each rank keeps its own.
  for (int r = 0; r < 3; ++r) EXPECT_EQ(p->Route(0, 1, r, 7).rank, r);
  // Expert 3 only on rank 2; expert 2 only on rank 1.
  EXPECT_EQ(p->Route(0, 3, 0, 5).rank, 2);
  EXPECT_EQ(p->Route(0, 3, 0, 5).slot, 1);
  // Expert 1 on ranks 1 and 2 only.
  auto q = ExpertPlacement::Create({{{0}, {0, 1}, {1}}}, 2);
  ASSERT_TRUE(q.ok());
  // From rank 0, expert 1 has replicas on ranks 1 and 2: token parity picks.
  EXPECT_EQ(q->Route(0, 1, 0, 4).rank, 1);
  EXPECT_EQ(q->Route(0, 1, 0, 5).rank, 2);
  EXPECT_EQ(q->Route(0, 1, 0, 5).rank, q->Route(0, 1, 0, 5).rank);
}

TEST(ExpertPlacementTest, RefusesInvalidTables) {
  auto missing = ExpertPlacement::Create({{{0}, {2}}}, 3);
  EXPECT_EQ(missing.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(missing.status().message().find("expert 1 is on no rank"), std::string::npos)
      << missing.status().message();
  auto twice = ExpertPlacement::Create({{{0, 0}, {1}}}, 2);
  EXPECT_NE(twice.status().message().find("holds expert 0 twice"), std::string::npos);
  auto range = ExpertPlacement::Create({{{0, 5}, {1}}}, 2);
  EXPECT_NE(range.status().message().find("outside [0, 2)"), std::string::npos);
  auto ragged = ExpertPlacement::Create({{{0}, {1}}, {{0, 1}}}, 2);
  EXPECT_NE(ragged.status().message().find("layer 1 lists 1 ranks"), std::string::npos);
}

}  // namespace
}  // namespace epic::parallel
