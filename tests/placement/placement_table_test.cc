// The placement vocabulary: the contiguous default with replicas, rank loads, the MoE
// layers' compact view and its way back, and the link's LayerPlacement conversion.
#include "placement/placement_table.h"

#include <gtest/gtest.h>

#ifdef EPIC_WITH_SERVING
#include "placement/placement_proto.h"
#endif

namespace epic::placement {
namespace {

TEST(PlacementTableTest, ContiguousBlocksWithReplicasOfTheNextExperts) {
  const PlacementTable t = ContiguousPlacement(2, 8, 3, 2);
  ASSERT_EQ(t.size(), 2u);
  // Blocks [0,2), [2,5), [5,8), each followed by replicas of the next two experts.
  EXPECT_EQ(t[0][0], (std::vector<int32_t>{0, 1, 2, 3}));
  EXPECT_EQ(t[0][1], (std::vector<int32_t>{2, 3, 4, 5, 6}));
  EXPECT_EQ(t[0][2], (std::vector<int32_t>{5, 6, 7, 0, 1}));
  EXPECT_EQ(t[1], t[0]);
  EXPECT_EQ(ContiguousPlacement(1, 4, 2)[0], (std::vector<std::vector<int32_t>>{{0, 1}, {2, 3}}));
}

TEST(PlacementTableTest, RankLoadsShareAReplicatedExpertsLoad) {
  const std::vector<double> loads = {8, 2, 4, 6};
  const std::vector<std::vector<int32_t>> ranks = {{0, 1}, {0, 2}, {3}};
  EXPECT_EQ(RankLoads(loads, ranks), (std::vector<double>{6, 8, 6}));
  const LayerStats s = PlacementStats(loads, ranks);
  EXPECT_DOUBLE_EQ(s.max_rank_load, 8);
  EXPECT_DOUBLE_EQ(s.mean_rank_load, 20.0 / 3);
  EXPECT_DOUBLE_EQ(s.imbalance(), 8 / (20.0 / 3));
  EXPECT_EQ(ExpertsMoved(ContiguousPlacement(1, 4, 2), {{{0, 2}, {1, 3}}}), 2);
}

TEST(PlacementTableTest, MoeLayersAndBack) {
  PlacementTable full = ContiguousPlacement(4, 6, 2);
  full[0].assign(2, {});  // a dense first layer
  full[2].assign(2, {});
  std::vector<int32_t> layers;
  const PlacementTable moe = MoeLayers(full, &layers);
  EXPECT_EQ(layers, (std::vector<int32_t>{1, 3}));
  ASSERT_EQ(moe.size(), 2u);
  EXPECT_EQ(WithAllLayers(moe, layers, 4), full);
}

#ifdef EPIC_WITH_SERVING
TEST(PlacementTableTest, LayerPlacementsRoundTripAndMisfitsAreRefused) {
  PlacementTable full = ContiguousPlacement(3, 6, 2, 1);
  full[0].assign(2, {});
  LayerPlacements proto;
  PlacementToProto(full, &proto);
  ASSERT_EQ(proto.size(), 2);
  EXPECT_EQ(proto[0].layer(), 1);
  auto back = PlacementFromProto(proto, 3, 2);
  ASSERT_TRUE(back.ok());
  EXPECT_EQ(*back, full);
  EXPECT_FALSE(PlacementFromProto(proto, 2, 2).ok());  // layer 2 of 2
  auto wrong_ranks = PlacementFromProto(proto, 3, 3);
  ASSERT_FALSE(wrong_ranks.ok());
  EXPECT_NE(wrong_ranks.status().message().find("layer 1"), std::string::npos);
}
#endif

}  // namespace
}  // namespace epic::placement
