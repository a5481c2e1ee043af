#include "worker/latent_cache.h"

#include <set>

#include <gtest/gtest.h>

namespace epic {
namespace {

TEST(LatentCacheTest, ReservesBlocksAndRefusesPastTheBudget) {
  LatentCache cache(/*layers=*/2, /*row_width=*/3, /*block_size=*/4, /*num_blocks=*/5);
  BlockTable a, b;
  ASSERT_TRUE(cache.Reserve(&a, 9).ok());  // 3 blocks
  EXPECT_EQ(a.blocks.size(), 3u);
  EXPECT_EQ(cache.free_blocks(), 2);
  ASSERT_TRUE(cache.Reserve(&a, 12).ok());  // still 3 blocks
  EXPECT_EQ(cache.free_blocks(), 2);
  const Status s = cache.Reserve(&b, 13);  // 4 blocks, 2 free
  EXPECT_EQ(s.code(), StatusCode::kResourceExhausted);
  EXPECT_NE(s.message().find("2 of 5 are free"), std::string::npos) << s.message();
  EXPECT_TRUE(b.blocks.empty());
  cache.Release(&a);
  EXPECT_EQ(cache.free_blocks(), 5);
  ASSERT_TRUE(cache.Reserve(&b, 13).ok());
}

TEST(LatentCacheTest, RowsOfDifferentSequencesAndLayersDoNotAlias) {
  LatentCache cache(2, 3, 2, 6);
  BlockTable a, b;
  ASSERT_TRUE(cache.Reserve(&a, 5).ok());
  ASSERT_TRUE(cache.Reserve(&b, 5).ok());
  std::set<const float*> seen;
  for (int64_t layer = 0; layer < 2; ++layer) {
    for (const BlockTable* t : {&a, &b}) {
      for (int64_t row = 0; row < 5; ++row) {
        float* p = cache.Row(layer, *t, row);
        EXPECT_TRUE(seen.insert(p).second);
        p[0] = p[1] = p[2] = static_cast<float>(layer * 100 + row);
        EXPECT_EQ(cache.Rows(layer, *t).Row(row), p);
      }
    }
  }
}

}  // namespace
}  // namespace epic
