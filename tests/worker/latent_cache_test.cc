#include "worker/latent_cache.h"

#include <set>

#include <gtest/gtest.h>

#include "common/half.h"

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

// Every row written, then every row read back: rows that aliased would read another's
// values. A BF16 cache gives back each value rounded to BF16 (1/3 is not one).
void CheckRowsRoundTrip(bool bf16) {
  LatentCache cache(2, 3, 2, 6, /*host_rows=*/true, bf16);
  EXPECT_EQ(cache.row_bytes(), bf16 ? 6 : 12);
  BlockTable a, b;
  ASSERT_TRUE(cache.Reserve(&a, 5).ok());
  ASSERT_TRUE(cache.Reserve(&b, 5).ok());
  auto value = [](int64_t layer, int64_t seq, int64_t row, int64_t j) {
    return static_cast<float>(layer * 100 + seq * 10 + row) + static_cast<float>(j + 1) / 3.0f;
  };
  std::set<const void*> seen;
  for (int64_t layer = 0; layer < 2; ++layer) {
    for (int64_t seq = 0; seq < 2; ++seq) {
      for (int64_t row = 0; row < 5; ++row) {
        const float values[3] = {value(layer, seq, row, 0), value(layer, seq, row, 1), value(layer, seq, row, 2)};
        const BlockTable& t = seq == 0 ? a : b;
        cache.Write(layer, t, row, values);
        EXPECT_TRUE(seen.insert(cache.Rows(layer, t).Row(row)).second);
      }
    }
  }
  for (int64_t layer = 0; layer < 2; ++layer) {
    for (int64_t seq = 0; seq < 2; ++seq) {
      const cpu::LatentRows rows = cache.Rows(layer, seq == 0 ? a : b);
      EXPECT_EQ(rows.type, bf16 ? cpu::WeightType::kBF16 : cpu::WeightType::kF32);
      for (int64_t row = 0; row < 5; ++row) {
        float got[2];
        rows.Widen(row, 1, 2, got);  // values [1, 3)
        for (int64_t j = 0; j < 2; ++j) {
          const float want = value(layer, seq, row, j + 1);
          EXPECT_EQ(got[j], bf16 ? Bf16ToFloat(FloatToBf16(want)) : want) << layer << " " << seq << " " << row;
        }
      }
    }
  }
}

TEST(LatentCacheTest, RowsOfDifferentSequencesAndLayersDoNotAlias) { CheckRowsRoundTrip(/*bf16=*/false); }

TEST(LatentCacheTest, Bf16RowsHoldTheirValuesRounded) { CheckRowsRoundTrip(/*bf16=*/true); }

}  // namespace
}  // namespace epic
