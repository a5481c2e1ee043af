// Scratch buffers (common/scratch_buffer.h).
#include "common/scratch_buffer.h"

#include <cstdint>
#include <utility>

#include <gtest/gtest.h>

namespace epic {
namespace {

TEST(ScratchBufferTest, GrowsKeepingWhatItHeldAndAlignsLargeBuffersToHugePages) {
  ScratchBuffer buffer;
  auto* small = buffer.Get<int32_t>(1000);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(small) % 64, 0u);
  for (int32_t i = 0; i < 1000; ++i) small[i] = i * 7;
  EXPECT_EQ(buffer.Get<int32_t>(10), small) << "a smaller request moved the buffer";

  const int64_t large = (int64_t{3} << 20) / 4;  // 3 MiB of int32
  auto* grown = buffer.Get<int32_t>(large);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(grown) % (2 << 20), 0u) << "not on a huge page's boundary";
  for (int32_t i = 0; i < 1000; ++i) ASSERT_EQ(grown[i], i * 7) << "lost at " << i;
  grown[large - 1] = 5;  // the whole request is writable

  ScratchBuffer moved = std::move(buffer);
  EXPECT_EQ(moved.Get<int32_t>(large), grown);
  EXPECT_EQ(moved.Get<int32_t>(large)[large - 1], 5);
  EXPECT_NE(buffer.Get<int32_t>(16), grown) << "the moved-from buffer still owns the memory";  // NOLINT(bugprone-use-after-move)
}

}  // namespace
}  // namespace epic
