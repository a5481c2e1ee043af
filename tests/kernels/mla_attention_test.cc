// Both forms of MLA against float64 attention written plainly, over a paged cache
// whose blocks are out of order, at shapes that cross the kernels' edges: contexts split
// over the threads (some splits empty), heads past one vector, query chunks of 64 (128
// with BF16 operands), blocks split by the context's end.
#include "kernels/cpu/mla_attention.h"

#include <omp.h>

#include <cmath>
#include <random>
#include <vector>

#include <gtest/gtest.h>

#include "common/half.h"

namespace epic::cpu {
namespace {

std::vector<float> Random(size_t n, std::mt19937_64& rng) {
  std::uniform_real_distribution<float> d(-1.0f, 1.0f);
  std::vector<float> v(n);
  for (float& x : v) x = d(rng);
  return v;
}

// Softmax-weighted sum for one query over `context` keys, in double.
std::vector<double> Attend(const std::vector<double>& scores, const std::vector<std::vector<double>>& values) {
  double max = scores[0];
  for (double s : scores) max = std::max(max, s);
  double z = 0;
  for (double s : scores) z += std::exp(s - max);
  std::vector<double> out(values[0].size(), 0.0);
  for (size_t t = 0; t < scores.size(); ++t) {
    for (size_t j = 0; j < out.size(); ++j) out[j] += std::exp(scores[t] - max) / z * values[t][j];
  }
  return out;
}

double RoundedToBf16(float v) { return Bf16ToFloat(FloatToBf16(v)); }

struct AbsorbedShape {
  int64_t heads, lora, rope, block, start, n;
};

// With BF16 the pool holds the rows rounded (the fast precision's cache) and the
// reference takes the queries rounded too: the kernel's scores are products of BF16
// operands summed in F32 (vdpbf16ps, or F32 products of the widened values). Its
// probabilities are rounded to BF16 as well (2^-9 relative each, |values| <= 1): within
// 4e-3 then.
void CheckAbsorbed(const AbsorbedShape& shape, bool bf16 = false) {
  std::mt19937_64 rng(11);
  const auto [heads, lora, rope, block, start, n] = shape;
  const int64_t width = lora + rope;
  // Blocks out of order in the pool, some one after another (the kernel reads such runs
  // in one product): the sequence's blocks in runs of 3, the runs in reverse order, one
  // spare block first.
  const int64_t blocks = (start + n + block - 1) / block;
  const int64_t runs = (blocks + 2) / 3;
  const int64_t pool_blocks = 1 + runs * 3;
  std::vector<int32_t> table;
  for (int64_t b = 0; b < blocks; ++b) table.push_back(static_cast<int32_t>(1 + (runs - 1 - b / 3) * 3 + b % 3));
  std::vector<float> pool = Random(pool_blocks * block * width, rng);
  std::vector<float> ql = Random(n * heads * lora, rng), qp = Random(n * heads * rope, rng);
  std::vector<uint16_t> pool_bf16(pool.size());
  if (bf16) {
    for (size_t j = 0; j < pool.size(); ++j) {
      pool_bf16[j] = FloatToBf16(pool[j]);
      pool[j] = Bf16ToFloat(pool_bf16[j]);  // what the reference reads
    }
  }
  auto query = [&](float v) { return bf16 ? RoundedToBf16(v) : double{v}; };
  std::vector<float> out(n * heads * lora, NAN);
  MlaAbsorbedParams p;
  p.num_queries = n;
  p.start = start;
  p.num_heads = heads;
  p.kv_lora_rank = lora;
  p.rope_dim = rope;
  p.scale = 0.3f;
  p.q_latent = ql.data();
  p.q_pe = qp.data();
  p.cache = {pool.data(), table.data(), block, width};
  if (bf16) p.cache = {pool_bf16.data(), table.data(), block, width, WeightType::kBF16};
  p.out_latent = out.data();
  MlaAbsorbedAttention(p);

  for (int64_t i = 0; i < n; ++i) {
    for (int64_t h = 0; h < heads; ++h) {
      std::vector<double> scores;
      std::vector<std::vector<double>> values;
      for (int64_t t = 0; t <= start + i; ++t) {
        const float* row = pool.data() + (table[t / block] * block + t % block) * width;
        double s = 0;
        for (int64_t j = 0; j < lora; ++j) s += query(ql[(i * heads + h) * lora + j]) * row[j];
        for (int64_t j = 0; j < rope; ++j) s += query(qp[(i * heads + h) * rope + j]) * row[lora + j];
        scores.push_back(0.3 * s);
        values.emplace_back(row, row + lora);
      }
      const std::vector<double> want = Attend(scores, values);
      for (int64_t j = 0; j < lora; ++j) {
        EXPECT_NEAR(out[(i * heads + h) * lora + j], want[j], bf16 ? 4e-3 : 1e-5) << "query " << i << " head " << h;
      }
    }
  }
}

class AbsorbedTest : public ::testing::TestWithParam<AbsorbedShape> {};

TEST_P(AbsorbedTest, OverPagedCacheMatchesFloat64) { CheckAbsorbed(GetParam()); }

TEST_P(AbsorbedTest, OverBf16CacheMatchesFloat64OfRoundedOperands) { CheckAbsorbed(GetParam(), /*bf16=*/true); }

// More threads than this host may have cores: contexts in five splits, the shorter
// queries' later splits empty.
TEST(AbsorbedThreadsTest, ContextsSplitFiveWaysMatchFloat64) {
  const int threads = omp_get_max_threads();
  omp_set_num_threads(5);
  CheckAbsorbed({16, 24, 8, 16, 300, 2});
  CheckAbsorbed({8, 24, 8, 4, 0, 330});
  omp_set_num_threads(threads);
}

struct ExpandedShape {
  int64_t heads, nope, rope, vdim, start, n;
};

class ExpandedTest : public ::testing::TestWithParam<ExpandedShape> {};

// The expanded form against float64; with BF16 operands, against float64 attention of the
// BF16-rounded queries, keys and values, within 4e-3: the probabilities are rounded to
// BF16 too (2^-9 relative each), and |values| <= 1.
void CheckExpanded(const ExpandedShape& shape, bool bf16) {
  std::mt19937_64 rng(12);
  const auto [heads, nope, rope, vdim, start, n] = shape;
  const int64_t context = start + n, qk = nope + rope, kvw = heads * (nope + vdim);
  std::vector<float> q = Random(n * heads * qk, rng), kv = Random(context * kvw, rng);
  std::vector<float> kpe = Random(context * rope, rng), out(n * heads * vdim, NAN);
  MlaExpandedParams p;
  p.num_queries = n;
  p.start = start;
  p.num_heads = heads;
  p.nope_dim = nope;
  p.rope_dim = rope;
  p.v_dim = vdim;
  p.scale = 0.25f;
  p.q = q.data();
  p.kv = kv.data();
  p.k_pe = kpe.data();
  p.out = out.data();
  p.bf16 = bf16;
  MlaExpandedAttention(p);
  const double tolerance = bf16 ? 4e-3 : 1e-5;
  double off_exact = 0;  // largest distance from exact attention of the unrounded operands
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t h = 0; h < heads; ++h) {
      for (const bool rounded : {bf16, false}) {
        auto operand = [&](float v) { return rounded ? RoundedToBf16(v) : double{v}; };
        std::vector<double> scores;
        std::vector<std::vector<double>> values;
        const float* qi = q.data() + (i * heads + h) * qk;
        for (int64_t t = 0; t <= start + i; ++t) {  // causal
          const float* k = kv.data() + t * kvw + h * (nope + vdim);
          double s = 0;
          for (int64_t j = 0; j < nope; ++j) s += operand(qi[j]) * operand(k[j]);
          for (int64_t j = 0; j < rope; ++j) s += operand(qi[nope + j]) * operand(kpe[t * rope + j]);
          scores.push_back(0.25 * s);
          values.emplace_back();
          for (int64_t j = 0; j < vdim; ++j) values.back().push_back(operand(k[nope + j]));
        }
        const std::vector<double> want = Attend(scores, values);
        for (int64_t j = 0; j < vdim; ++j) {
          const double got = out[(i * heads + h) * vdim + j];
          if (rounded == bf16) {
            ASSERT_NEAR(got, want[j], tolerance) << "query " << i << " head " << h;
          }
          off_exact = std::max(off_exact, std::fabs(got - want[j]));
        }
      }
    }
  }
  // The operands were rounded indeed (BF16 leaves 1e-4 to 1e-3 here, less over the
  // longest contexts' averages; exact ~1e-7).
  if (bf16) {
    EXPECT_GT(off_exact, 2e-5);
  }
}

TEST_P(ExpandedTest, CausalMatchesFloat64) { CheckExpanded(GetParam(), /*bf16=*/false); }

// On any host: where it has no BF16 instructions the products run in F32 on the rounded
// operands, within the same bound.
TEST_P(ExpandedTest, Bf16OperandsMatchFloat64OfRoundedOperands) { CheckExpanded(GetParam(), /*bf16=*/true); }

INSTANTIATE_TEST_SUITE_P(Shapes, AbsorbedTest,
                         ::testing::Values(AbsorbedShape{3, 20, 6, 4, 9, 5},       // one group
                                           AbsorbedShape{16, 24, 8, 16, 70, 3},    // two full groups
                                           AbsorbedShape{11, 16, 4, 16, 33, 2},    // a group of 3
                                           AbsorbedShape{2, 512, 64, 16, 100, 1},    // V2's widths
                                           // Contexts past one chunk of 256 rows: each query's
                                           // chunks combined; one query's context split among
                                           // the threads, in parts of several chunks; a few
                                           // queries split in two.
                                           AbsorbedShape{16, 24, 8, 16, 300, 8},
                                           AbsorbedShape{10, 32, 8, 16, 1200, 1},
                                           AbsorbedShape{5, 16, 4, 16, 600, 3},
                                           // Heads as one vector of the scores' product, and
                                           // past one (16 lanes); queries shorter than their
                                           // splits.
                                           AbsorbedShape{16, 24, 8, 16, 200, 1},
                                           AbsorbedShape{20, 16, 4, 16, 150, 2},
                                           AbsorbedShape{8, 24, 8, 16, 0, 130}));

INSTANTIATE_TEST_SUITE_P(Shapes, ExpandedTest,
                         ::testing::Values(ExpandedShape{2, 8, 4, 6, 3, 4},         // one chunk
                                           ExpandedShape{3, 16, 8, 12, 20, 150},   // three chunks, a part one
                                           ExpandedShape{1, 32, 16, 24, 0, 64},    // exactly one chunk
                                           ExpandedShape{2, 128, 64, 128, 5, 70},  // V2's widths
                                           ExpandedShape{2, 24, 8, 16, 10, 300},   // BF16: chunks of 128 and a part
                                           // BF16: contexts past one block of 512 keys (the
                                           // online softmax rescales), a chunk's queries
                                           // ending in different blocks, and queries that
                                           // see nothing of the last block.
                                           ExpandedShape{2, 16, 8, 16, 450, 200},
                                           ExpandedShape{1, 16, 8, 8, 1100, 3}));

}  // namespace
}  // namespace epic::cpu
