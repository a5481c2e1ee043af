// MLA attention on the GPU (kernels/cuda/mla.h) against cpu::MlaAbsorbedAttention on
// random caches: paged with shuffled blocks, decode and prefill sequences mixed in one
// launch, one split and many, DeepSeek-V2's widths and odd ones. Outputs are poisoned
// first. Without a GPU the device cases report SKIPPED; the split planning and the
// argument checks run on the host and are tested everywhere.
#include "kernels/cuda/mla.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "common/half.h"
#include "kernels/cpu/mla_attention.h"
#include "kernels/cuda/buffer.h"
#include "tests/kernels/cuda_test_util.h"

namespace epic::cuda {
namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
// The cache and q are BF16 on both sides, so only the kernel's BF16 softmax weights
// (relative error 2^-9 each) and the order of sums differ: the output, a weighted mean
// of values in [-1, 1], moves by at most about 2^-9.
constexpr double kTolerance = 5e-3;
constexpr int64_t kNope = 8;  // q rows are [q_nope | q_pe], as in the model: q_pe is read in place

struct Sequence {
  int64_t start;  // rows already cached
  int64_t n;      // new tokens, at positions start .. start + n - 1
};

struct MlaCase {
  const char* name;
  int64_t heads;
  int64_t lora;
  int64_t rope;
  int64_t block_size;
  std::vector<Sequence> sequences;
};

void PrintTo(const MlaCase& c, std::ostream* os) { *os << c.name; }

float RoundBf16(float v) { return Bf16ToFloat(FloatToBf16(v)); }

std::vector<float> RandomBf16(size_t n, std::mt19937_64& rng) {
  std::uniform_real_distribution<float> d(-1.0f, 1.0f);
  std::vector<float> v(n);
  for (float& x : v) x = RoundBf16(d(rng));
  return v;
}

// A case's inputs on the host, and the CPU's answer.
struct Inputs {
  int64_t tokens = 0, width = 0, max_context = 0;
  std::vector<float> pool;          // [blocks * block_size, width], BF16 values
  std::vector<int32_t> tables;      // every sequence's blocks, one after another
  std::vector<int32_t> table_start, context;
  std::vector<float> q_latent;      // [tokens, heads, lora]
  std::vector<float> q;             // [tokens, heads, kNope + rope]
  std::vector<float> want;          // [tokens, heads, lora]
};

Inputs Prepare(const MlaCase& c, uint64_t seed) {
  std::mt19937_64 rng(seed);
  Inputs in;
  in.width = c.lora + c.rope;
  int64_t blocks = 0;
  for (const Sequence& s : c.sequences) blocks += (s.start + s.n + c.block_size - 1) / c.block_size;
  blocks += 3;  // spare blocks nobody reads
  std::vector<int32_t> order(static_cast<size_t>(blocks));
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), rng);
  in.pool = RandomBf16(static_cast<size_t>(blocks * c.block_size * in.width), rng);
  const int64_t qhd = kNope + c.rope;
  size_t next_block = 0;
  for (const Sequence& s : c.sequences) {
    const int32_t start = static_cast<int32_t>(in.tables.size());
    const int64_t need = (s.start + s.n + c.block_size - 1) / c.block_size;
    for (int64_t b = 0; b < need; ++b) in.tables.push_back(order[next_block++]);
    for (int64_t i = 0; i < s.n; ++i) {
      in.table_start.push_back(start);
      in.context.push_back(static_cast<int32_t>(s.start + i + 1));
      in.max_context = std::max(in.max_context, s.start + i + 1);
    }
    in.tokens += s.n;
  }
  in.q_latent = RandomBf16(static_cast<size_t>(in.tokens * c.heads * c.lora), rng);
  in.q = RandomBf16(static_cast<size_t>(in.tokens * c.heads * qhd), rng);

  // The CPU reference, sequence by sequence, on the same BF16 values.
  in.want.assign(static_cast<size_t>(in.tokens * c.heads * c.lora), 0.0f);
  int64_t first = 0;
  for (const Sequence& s : c.sequences) {
    std::vector<float> q_pe(static_cast<size_t>(s.n * c.heads * c.rope));
    for (int64_t i = 0; i < s.n * c.heads; ++i) {
      for (int64_t d = 0; d < c.rope; ++d) q_pe[i * c.rope + d] = in.q[(first * c.heads + i) * qhd + kNope + d];
    }
    cpu::MlaAbsorbedParams p;
    p.num_queries = s.n;
    p.start = s.start;
    p.num_heads = c.heads;
    p.kv_lora_rank = c.lora;
    p.rope_dim = c.rope;
    p.scale = 0.3f;
    p.q_latent = in.q_latent.data() + first * c.heads * c.lora;
    p.q_pe = q_pe.data();
    p.cache.pool = in.pool.data();
    p.cache.block_table = in.tables.data() + in.table_start[first];
    p.cache.block_size = c.block_size;
    p.cache.row_stride = in.width;
    p.out_latent = in.want.data() + first * c.heads * c.lora;
    cpu::MlaAbsorbedAttention(p);
    first += s.n;
  }
  return in;
}

std::vector<uint16_t> ToBits(const std::vector<float>& v) {
  std::vector<uint16_t> bits(v.size());
  for (size_t i = 0; i < v.size(); ++i) bits[i] = FloatToBf16(v[i]);
  return bits;
}

// Runs the kernel on IN with splits planned for SM_COUNT multiprocessors.
void RunOnDevice(const MlaCase& c, const Inputs& in, int sm_count, std::vector<float>* got) {
  ASSERT_OK_AND_ASSIGN(auto pool, DeviceBuffer<uint16_t>::FromHost(ToBits(in.pool)));
  ASSERT_OK_AND_ASSIGN(auto tables, DeviceBuffer<int32_t>::FromHost(in.tables));
  ASSERT_OK_AND_ASSIGN(auto table_start, DeviceBuffer<int32_t>::FromHost(in.table_start));
  ASSERT_OK_AND_ASSIGN(auto context, DeviceBuffer<int32_t>::FromHost(in.context));
  ASSERT_OK_AND_ASSIGN(auto q_latent, DeviceBuffer<float>::FromHost(in.q_latent));
  ASSERT_OK_AND_ASSIGN(auto q, DeviceBuffer<float>::FromHost(in.q));
  ASSERT_OK_AND_ASSIGN(auto out, DeviceBuffer<float>::FromHost(std::vector<float>(in.want.size(), kNaN)));
  const MlaSplits splits = PlanMlaSplits(in.tokens, c.heads, in.max_context, sm_count);
  const int64_t floats = MlaWorkspaceFloats(in.tokens, c.heads, c.lora, splits);
  ASSERT_OK_AND_ASSIGN(auto workspace, DeviceBuffer<float>::FromHost(std::vector<float>(floats, kNaN)));
  MlaAttentionParams p;
  p.tokens = in.tokens;
  p.num_heads = c.heads;
  p.kv_lora_rank = c.lora;
  p.rope_dim = c.rope;
  p.scale = 0.3f;
  p.q_latent = q_latent.data();
  p.q_pe = q.data() + kNope;
  p.q_pe_token_stride = c.heads * (kNope + c.rope);
  p.q_pe_head_stride = kNope + c.rope;
  p.cache = {pool.data(), c.block_size, tables.data()};
  p.table_start = table_start.data();
  p.context = context.data();
  p.max_context = in.max_context;
  p.out_latent = out.data();
  ASSERT_OK(MlaAbsorbedAttention(p, splits, workspace.data(), workspace.size()));
  ASSERT_OK_AND_ASSIGN(*got, out.ToHost());
}

class MlaVsCpu : public ::testing::TestWithParam<MlaCase> {};

TEST_P(MlaVsCpu, MatchesTheCpuWithOneSplitAndWithMany) {
  SKIP_WITHOUT_GPU();
  const MlaCase& c = GetParam();
  const Inputs in = Prepare(c, 7);
  // One multiprocessor asks for the fewest splits; 132 (an H100) for many.
  for (int sm : {1, 132}) {
    std::vector<float> got;
    RunOnDevice(c, in, sm, &got);
    ASSERT_EQ(got.size(), in.want.size());
    double worst = 0;
    for (size_t i = 0; i < got.size(); ++i) {
      ASSERT_FALSE(std::isnan(got[i])) << "output " << i << " never written (sm " << sm << ")";
      worst = std::max(worst, std::fabs(static_cast<double>(got[i]) - in.want[i]));
    }
    EXPECT_LE(worst, kTolerance) << c.name << " with splits for " << sm << " multiprocessors";
  }
}

TEST_P(MlaVsCpu, RepeatsBitForBit) {
  SKIP_WITHOUT_GPU();
  const MlaCase& c = GetParam();
  const Inputs in = Prepare(c, 11);
  std::vector<float> a, b;
  RunOnDevice(c, in, 132, &a);
  RunOnDevice(c, in, 132, &b);
  ASSERT_EQ(a.size(), b.size());
  EXPECT_EQ(0, std::memcmp(a.data(), b.data(), a.size() * sizeof(float)));
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, MlaVsCpu,
    ::testing::Values(
        // Decode: one token per sequence, contexts around the 64-row chunk's edges.
        MlaCase{"decode_tiny", 4, 64, 16, 16, {{0, 1}, {15, 1}, {63, 1}, {64, 1}, {299, 1}}},
        // Prefill: each new token sees the rows up to its own position; a block size
        // that divides nothing.
        MlaCase{"prefill_mixed", 3, 64, 16, 5, {{0, 37}, {10, 20}, {70, 1}}},
        // DeepSeek-V2's widths, two head groups (the second partly filled), long contexts.
        MlaCase{"v2_widths", 20, 512, 64, 64, {{4095, 1}, {999, 1}, {0, 1}, {130, 3}}},
        // A row width that is no multiple of 8 takes the element-wise copy.
        MlaCase{"odd_width", 2, 40, 6, 7, {{0, 9}, {30, 1}}},
        // Many heads of one token: 128 heads as DeepSeek-V2 on one GPU.
        MlaCase{"v2_heads", 128, 512, 64, 64, {{2047, 1}, {511, 2}}}),
    [](const ::testing::TestParamInfo<MlaCase>& info) { return std::string(info.param.name); });

TEST(MlaLatentWrite, RoundsRowsIntoTheirSlotsAndLeavesTheRestAlone) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(3);
  const int64_t tokens = 5, width = 80, ld = 96, rows = 40;
  std::vector<float> latent(static_cast<size_t>(tokens * ld));
  std::uniform_real_distribution<float> d(-3.0f, 3.0f);
  for (float& v : latent) v = d(rng);
  const std::vector<int64_t> slots = {7, 0, 39, 12, 13};
  const uint16_t poison = 0x7fc1;  // a BF16 NaN
  ASSERT_OK_AND_ASSIGN(auto dev_latent, DeviceBuffer<float>::FromHost(latent));
  ASSERT_OK_AND_ASSIGN(auto dev_slots, DeviceBuffer<int64_t>::FromHost(slots));
  ASSERT_OK_AND_ASSIGN(auto pool,
                       DeviceBuffer<uint16_t>::FromHost(std::vector<uint16_t>(rows * width, poison)));
  ASSERT_OK(WriteLatentRows(dev_latent.data(), tokens, width, ld, dev_slots.data(), pool.data()));
  ASSERT_OK_AND_ASSIGN(auto got, pool.ToHost());
  std::vector<uint16_t> want(static_cast<size_t>(rows * width), poison);
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t i = 0; i < width; ++i) want[slots[t] * width + i] = FloatToBf16(latent[t * ld + i]);
  }
  EXPECT_EQ(got, want);
}

TEST(MlaExpanded, GatherLatentRowsCopiesASequencesRowsInOrder) {
  SKIP_WITHOUT_GPU();
  const int64_t block = 5, width = 19, rows = 23, blocks = 9;
  std::vector<uint16_t> pool(static_cast<size_t>(blocks * block * width));
  for (size_t i = 0; i < pool.size(); ++i) pool[i] = static_cast<uint16_t>(i * 7 + 1);
  const std::vector<int32_t> table = {6, 2, 8, 0, 4};  // 23 rows need 5 blocks
  ASSERT_OK_AND_ASSIGN(auto dpool, DeviceBuffer<uint16_t>::FromHost(pool));
  ASSERT_OK_AND_ASSIGN(auto dtable, DeviceBuffer<int32_t>::FromHost(table));
  ASSERT_OK_AND_ASSIGN(auto out, DeviceBuffer<uint16_t>::FromHost(std::vector<uint16_t>(rows * width + 3, 0xffff)));
  ASSERT_OK(GatherLatentRows(dpool.data(), block, dtable.data(), rows, width, out.data()));
  ASSERT_OK_AND_ASSIGN(auto got, out.ToHost());
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < width; ++i) {
      ASSERT_EQ(got[r * width + i], pool[(table[r / block] * block + r % block) * width + i]) << r << ", " << i;
    }
  }
  for (int64_t i = rows * width; i < rows * width + 3; ++i) EXPECT_EQ(got[i], 0xffff);  // nothing past the rows
}

TEST(MlaExpanded, CausalSoftmaxMatchesFloat64AndMasksTheFuture) {
  SKIP_WITHOUT_GPU();
  for (int64_t keys : {1, 7, 300, 1100}) {
    const int64_t batches = 3, queries = std::min<int64_t>(keys, 5), first = keys - queries;
    std::mt19937_64 rng(keys);
    std::vector<float> scores(static_cast<size_t>(batches * queries * keys));
    std::uniform_real_distribution<float> d(-20.0f, 20.0f);
    for (float& v : scores) v = d(rng);
    ASSERT_OK_AND_ASSIGN(auto ds, DeviceBuffer<float>::FromHost(scores));
    ASSERT_OK_AND_ASSIGN(auto dp, DeviceBuffer<uint16_t>::FromHost(std::vector<uint16_t>(scores.size(), 0x7fc1)));
    const float scale = 0.37f;
    ASSERT_OK(CausalSoftmax(ds.data(), batches, queries, keys, first, scale, dp.data()));
    ASSERT_OK_AND_ASSIGN(auto got, dp.ToHost());
    for (int64_t row = 0; row < batches * queries; ++row) {
      const int64_t visible = first + row % queries + 1;
      double m = -1e300, sum = 0;
      for (int64_t t = 0; t < visible; ++t) m = std::max(m, 0.37 * scores[row * keys + t]);
      for (int64_t t = 0; t < visible; ++t) sum += std::exp(0.37 * scores[row * keys + t] - m);
      for (int64_t t = 0; t < keys; ++t) {
        const double p = Bf16ToFloat(got[row * keys + t]);
        if (t >= visible) {
          ASSERT_EQ(got[row * keys + t], 0) << "future key " << t << " of row " << row;
          continue;
        }
        const double want = std::exp(0.37 * scores[row * keys + t] - m) / sum;
        ASSERT_NEAR(p, want, 4e-3 * want + 1e-7) << "keys " << keys << ", row " << row << ", key " << t;
      }
    }
  }
}

// --- On the host: split planning and argument checks --------------------------

TEST(MlaSplitPlan, CoversEveryContextInWholeChunksWithoutEmptySplits) {
  for (int64_t tokens : {1, 3, 64, 128}) {
    for (int64_t heads : {1, 16, 20, 128}) {
      for (int64_t context : {1, 63, 64, 65, 1000, 4096, 32768}) {
        for (int sm : {1, 108, 132}) {
          const MlaSplits s = PlanMlaSplits(tokens, heads, context, sm);
          SCOPED_TRACE(std::to_string(tokens) + " tokens, " + std::to_string(heads) + " heads, context " +
                       std::to_string(context) + ", " + std::to_string(sm) + " SMs");
          EXPECT_GE(s.split_rows, 64);
          EXPECT_EQ(s.split_rows % 64, 0);
          EXPECT_GE(s.max_splits * s.split_rows, context);
          EXPECT_LT((s.max_splits - 1) * s.split_rows, context);  // the last split has rows
          // Enough blocks to fill the GPU twice over, as far as the context allows,
          // within a factor of two of the wish.
          const int64_t blocks = tokens * ((heads + 15) / 16);
          const int64_t chunks = (context + 63) / 64;
          EXPECT_GE(2 * blocks * s.max_splits, std::min<int64_t>(2 * sm, blocks * chunks));
          EXPECT_EQ(MlaWorkspaceFloats(tokens, heads, 512, s), tokens * s.max_splits * heads * 513);
        }
      }
    }
  }
}

TEST(MlaArguments, RefusesBadShapesBeforeTouchingTheDevice) {
  float dummy = 0;
  uint16_t cache = 0;
  int32_t ids = 0;
  MlaAttentionParams p;
  p.tokens = 2;
  p.num_heads = 4;
  p.kv_lora_rank = 64;
  p.rope_dim = 16;
  p.q_latent = p.q_pe = &dummy;
  p.cache = {&cache, 16, &ids};
  p.table_start = p.context = &ids;
  p.max_context = 100;
  p.out_latent = &dummy;
  const MlaSplits good = PlanMlaSplits(2, 4, 100, 132);
  const int64_t floats = MlaWorkspaceFloats(2, 4, 64, good);

  MlaAttentionParams wide = p;
  wide.kv_lora_rank = 513;
  EXPECT_EQ(MlaAbsorbedAttention(wide, good, &dummy, floats).code(), StatusCode::kInvalidArgument);
  MlaAttentionParams long_rope = p;
  long_rope.rope_dim = 65;
  EXPECT_EQ(MlaAbsorbedAttention(long_rope, good, &dummy, floats).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(MlaAbsorbedAttention(p, good, &dummy, floats - 1).code(), StatusCode::kInvalidArgument);
  MlaSplits short_splits = good;
  short_splits.max_splits = 1;
  short_splits.split_rows = 64;
  EXPECT_EQ(MlaAbsorbedAttention(p, short_splits, &dummy, floats).code(), StatusCode::kInvalidArgument);
  MlaSplits ragged = good;
  ragged.split_rows = 100;
  EXPECT_EQ(MlaAbsorbedAttention(p, ragged, &dummy, floats).code(), StatusCode::kInvalidArgument);
  MlaAttentionParams no_out = p;
  no_out.out_latent = nullptr;
  EXPECT_EQ(MlaAbsorbedAttention(no_out, good, &dummy, floats).code(), StatusCode::kInvalidArgument);
  MlaAttentionParams none = p;
  none.tokens = 0;
  EXPECT_TRUE(MlaAbsorbedAttention(none, good, &dummy, floats).ok());

  int64_t slot = 0;
  EXPECT_EQ(WriteLatentRows(&dummy, 1, 80, 79, &slot, &cache).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(WriteLatentRows(&dummy, -1, 80, 80, &slot, &cache).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(WriteLatentRows(nullptr, 1, 80, 80, &slot, &cache).code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(WriteLatentRows(&dummy, 0, 80, 80, &slot, &cache).ok());

  EXPECT_EQ(GatherLatentRows(&cache, 0, &ids, 3, 80, &cache).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(GatherLatentRows(nullptr, 16, &ids, 3, 80, &cache).code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(GatherLatentRows(&cache, 16, &ids, 0, 80, &cache).ok());
  uint16_t probs = 0;
  EXPECT_EQ(CausalSoftmax(&dummy, 2, 5, 10, 6, 1.0f, &probs).code(), StatusCode::kInvalidArgument);  // 6 + 5 > 10
  EXPECT_EQ(CausalSoftmax(nullptr, 2, 5, 10, 5, 1.0f, &probs).code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(CausalSoftmax(&dummy, 0, 5, 10, 5, 1.0f, &probs).ok());
}

}  // namespace
}  // namespace epic::cuda
