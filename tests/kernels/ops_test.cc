// Row-wise kernels against float64 written plainly.
#include "kernels/cpu/ops.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include <gtest/gtest.h>

#include "common/half.h"
#include "kernels/cpu/matmul_fast.h"
#include "tests/testing/random_values.h"

namespace epic::cpu {
namespace {

using epic::testing::Random;

TEST(OpsTest, RmsNormMatchesFloat64) {
  // A few rows (one thread), and a prefill's (blocks of rows over the threads), with rows
  // whose width is not a multiple of the 8 partial sums.
  for (const auto& [rows, n, ld] : {std::tuple<int64_t, int64_t, int64_t>{3, 37, 40}, {133, 1027, 1030}}) {
    std::vector<float> x = Random(rows * ld, 1), w = Random(n, 2);
    std::vector<float> out(rows * ld, NAN);
    RmsNorm(x.data(), rows, n, ld, w.data(), 1e-6f, out.data(), ld);
    for (int64_t r = 0; r < rows; ++r) {
      double ss = 0;
      for (int64_t i = 0; i < n; ++i) ss += double(x[r * ld + i]) * x[r * ld + i];
      const double inv = 1.0 / std::sqrt(ss / n + 1e-6);
      for (int64_t i = 0; i < n; ++i) {
        ASSERT_NEAR(out[r * ld + i], w[i] * x[r * ld + i] * inv, 1e-6 * (1 + std::fabs(w[i] * x[r * ld + i] * inv)))
            << rows << " rows, row " << r << ", column " << i;
      }
      for (int64_t i = n; i < ld; ++i) ASSERT_TRUE(std::isnan(out[r * ld + i])) << "wrote past the row";
    }
  }
}

TEST(OpsTest, RmsNormInPlaceOverPartOfARow) {
  // The latent row [c_kv | k_pe] is normalised only over c_kv, in place.
  std::vector<float> row = {3, 4, 100, 200};
  const float w[2] = {1, 1};
  RmsNorm(row.data(), 1, 2, 4, w, 0.0f, row.data(), 4);
  EXPECT_NEAR(row[0], 3 / std::sqrt(12.5), 1e-6);
  EXPECT_NEAR(row[1], 4 / std::sqrt(12.5), 1e-6);
  EXPECT_EQ(row[2], 100);
  EXPECT_EQ(row[3], 200);
}

TEST(OpsTest, RopeRotatesInterleavedPairs) {
  // DeepSeek rotates (x0, x1), (x2, x3): pair i by position * inv_freq[i].
  std::vector<float> x = {1, 0, 0, 1};
  const double inv_freq[2] = {0.5, 0.25};
  ApplyRope(x.data(), 2, inv_freq, 2, 1.0);
  EXPECT_NEAR(x[0], std::cos(1.0), 1e-6);
  EXPECT_NEAR(x[1], std::sin(1.0), 1e-6);
  EXPECT_NEAR(x[2], -std::sin(0.5), 1e-6);
  EXPECT_NEAR(x[3], std::cos(0.5), 1e-6);
}

double Dot(const float* a, const float* b, int n) {
  double sum = 0;
  for (int i = 0; i < n; ++i) sum += double(a[i]) * b[i];
  return sum;
}

TEST(OpsTest, RopePreservesNormTimesMscaleAndRelativePosition) {
  std::vector<float> q = Random(8, 3), k = Random(8, 4);
  const double inv_freq[4] = {1.0, 0.1, 0.01, 0.001};
  auto dot_at = [&](int64_t pq, int64_t pk) {
    std::vector<float> a = q, b = k;
    ApplyRope(a.data(), pq, inv_freq, 4, 1.0);
    ApplyRope(b.data(), pk, inv_freq, 4, 1.0);
    return Dot(a.data(), b.data(), 8);
  };
  // Attention sees only the distance between positions.
  EXPECT_NEAR(dot_at(7, 3), dot_at(107, 103), 1e-4);
  std::vector<float> a = q;
  ApplyRope(a.data(), 12345, inv_freq, 4, 0.5);
  EXPECT_NEAR(std::sqrt(Dot(a.data(), a.data(), 8)), 0.5 * std::sqrt(Dot(q.data(), q.data(), 8)), 1e-5);
}

TEST(OpsTest, RopeOverSlicesRotatesEachSliceAndNothingBetween) {
  // 3 slices of 8 pairs, 5 floats apart beyond their width; more pairs than one chunk too.
  for (int64_t pairs : {8, 70}) {
    const int64_t stride = 2 * pairs + 5;
    std::vector<double> inv_freq(static_cast<size_t>(pairs));
    for (int64_t i = 0; i < pairs; ++i) inv_freq[i] = std::pow(10000.0, -2.0 * i / (2.0 * pairs));
    const std::vector<float> before = Random(3 * stride, 9);
    std::vector<float> all = before;
    ApplyRope(all.data(), 3, stride, 777, inv_freq.data(), pairs, 1.3);
    for (int64_t s = 0; s < 3; ++s) {
      for (int64_t i = 0; i < pairs; ++i) {
        const double a = before[s * stride + 2 * i], b = before[s * stride + 2 * i + 1];
        const double angle = 777.0 * inv_freq[i];
        EXPECT_NEAR(all[s * stride + 2 * i], 1.3 * (a * std::cos(angle) - b * std::sin(angle)), 1e-5);
        EXPECT_NEAR(all[s * stride + 2 * i + 1], 1.3 * (b * std::cos(angle) + a * std::sin(angle)), 1e-5);
      }
      for (int64_t j = 2 * pairs; j < stride; ++j) EXPECT_EQ(all[s * stride + j], before[s * stride + j]) << "gap";
    }
  }
}

// The rotation by a step's factors (every prefill token's 17 slices) is the double
// formula, each product and sum rounded once, bit for bit on every path: whole vectors of
// four pairs and a tail, slices apart with a gap left alone.
TEST(OpsTest, RopeByFactorsIsTheDoubleFormulaBitForBit) {
  for (const int64_t pairs : {16, 7}) {
    const int64_t stride = 2 * pairs + 3;
    std::vector<double> inv_freq(static_cast<size_t>(pairs)), cos(inv_freq.size()), sin(inv_freq.size());
    for (int64_t i = 0; i < pairs; ++i) inv_freq[i] = std::pow(10000.0, -2.0 * i / (2.0 * pairs));
    RopeFactors(4099, inv_freq.data(), pairs, 0.9, cos.data(), sin.data());
    const std::vector<float> before = Random(3 * stride, 10, -50, 50);
    std::vector<float> all = before;
    ApplyRope(all.data(), 3, stride, cos.data(), sin.data(), pairs);
    for (int64_t s = 0; s < 3; ++s) {
      for (int64_t i = 0; i < pairs; ++i) {
        const double a = before[s * stride + 2 * i], b = before[s * stride + 2 * i + 1];
        const double ac = a * cos[i], bs = b * sin[i], bc = b * cos[i], as = a * sin[i];
        EXPECT_EQ(all[s * stride + 2 * i], static_cast<float>(ac - bs)) << "slice " << s << " pair " << i;
        EXPECT_EQ(all[s * stride + 2 * i + 1], static_cast<float>(bc + as)) << "slice " << s << " pair " << i;
      }
      for (int64_t j = 2 * pairs; j < stride; ++j) EXPECT_EQ(all[s * stride + j], before[s * stride + j]) << "gap";
    }
  }
}

TEST(OpsTest, SoftmaxSiluAxpy) {
  for (int n : {1, 15, 16, 50, 1000}) {
    std::vector<float> x = Random(n, 5 + n, -30, 30);
    std::vector<float> s = x;
    Softmax(s.data(), n);
    double max = x[0];
    for (float v : x) max = std::max<double>(max, v);
    double sum = 0;
    for (float v : x) sum += std::exp(v - max);
    for (int i = 0; i < n; ++i) {
      const double want = std::exp(x[i] - max) / sum;
      EXPECT_NEAR(s[i], want, 1e-6 * want + 1e-12) << "n " << n << " i " << i;
    }
  }

  // Wide inputs: the exponential's whole range, underflow and overflow included.
  std::vector<float> g = Random(333, 6, -120, 120), u = Random(333, 7), out(333);
  g[0] = 0.0f;
  SiluMul(g.data(), u.data(), 333, out.data());
  for (int i = 0; i < 333; ++i) {
    const double want = g[i] / (1 + std::exp(-double(g[i]))) * u[i];
    EXPECT_NEAR(out[i], want, 1e-6 * std::fabs(want) + 1e-30) << "gate " << g[i];
  }
  const float special[] = {NAN, INFINITY, -INFINITY};
  std::vector<float> one(3, 1.0f), silu(3);
  SiluMul(special, one.data(), 3, silu.data());
  EXPECT_TRUE(std::isnan(silu[0]));
  EXPECT_EQ(silu[1], INFINITY);
  EXPECT_TRUE(silu[2] == 0.0f || std::isnan(silu[2]));  // -inf * 0: the exact form gives NaN

  std::vector<float> y = u;
  Axpy(0.5f, g.data(), 33, y.data());
  for (int i = 0; i < 33; ++i) EXPECT_FLOAT_EQ(y[i], u[i] + 0.5f * g[i]);

  // WeightedSum: the same bits as Y zeroed and one Axpy a row, in order (the MoE combine
  // took the second form before), over widths with and without a vector's tail, no rows,
  // one, and rows whose order changes the sums.
  for (const int64_t n : {1, 16, 37, 1024}) {
    for (const int64_t count : {0, 1, 6, 9}) {
      std::vector<std::vector<float>> rows;
      std::vector<const float*> ptrs;
      std::vector<float> weights = Random(count, 40 + count, -2, 2);
      for (int64_t j = 0; j < count; ++j) {
        rows.push_back(Random(n, 50 + j, -1e3, 1e3));
        ptrs.push_back(rows.back().data());
      }
      std::vector<float> want(n + 1, 0.0f), got(n + 1, NAN);
      want[n] = NAN;
      for (int64_t j = 0; j < count; ++j) Axpy(weights[j], ptrs[j], n, want.data());
      WeightedSum(ptrs, weights.data(), n, got.data());
      for (int64_t i = 0; i < n; ++i) {
        EXPECT_EQ(std::bit_cast<uint32_t>(got[i]), std::bit_cast<uint32_t>(want[i]))
            << "n " << n << " rows " << count << " i " << i;
      }
      EXPECT_TRUE(std::isnan(got[n])) << "wrote past N";
    }
  }

  // Scale: each value times alpha, one rounding, bit for bit; the values past N untouched
  // (a vector's tail under a mask).
  for (const int n : {1, 16, 37}) {
    std::vector<float> z = g;
    Scale(0.3f, z.data(), n);
    for (int i = 0; i < 333; ++i) EXPECT_EQ(z[i], i < n ? g[i] * 0.3f : g[i]) << "n " << n << " i " << i;
  }
}

// Columns narrower than, as wide as and past one vector of 16, over rows read with a
// stride wider than the columns; OUT's rows wider than the rows written.
TEST(OpsTest, ExpColumnsMatchesFloat64) {
  for (const auto& [rows, cols, ldx] : {std::tuple<int64_t, int64_t, int64_t>{1, 3, 5}, {70, 16, 16}, {33, 37, 40}}) {
    const float scale = 0.7f;
    const int64_t ldo = rows + 3;
    std::vector<float> x = Random(rows * ldx, 8 + cols, -30, 30), out(cols * ldo, NAN), max(cols), sum(cols);
    ExpColumns(x.data(), rows, cols, ldx, scale, out.data(), ldo, max.data(), sum.data());
    for (int64_t c = 0; c < cols; ++c) {
      double top = -INFINITY, total = 0;
      for (int64_t r = 0; r < rows; ++r) top = std::max<double>(top, double(scale) * x[r * ldx + c]);
      EXPECT_NEAR(max[c], top, 1e-6 * std::fabs(top)) << "column " << c;
      for (int64_t r = 0; r < rows; ++r) {
        const double want = std::exp(double(scale) * x[r * ldx + c] - top);
        total += want;
        EXPECT_NEAR(out[c * ldo + r], want, 1e-5 * want + 1e-12) << "column " << c << " row " << r;
      }
      EXPECT_NEAR(sum[c], total, 1e-5 * total) << "column " << c;
      for (int64_t r = rows; r < ldo; ++r) EXPECT_TRUE(std::isnan(out[c * ldo + r])) << "wrote past row " << c;
    }
  }
}

// A row taken in blocks (widths past, at and short of a vector; the last block partly
// valid, then one with nothing valid) gives the softmax of the whole row: each block's
// exponentials rescaled by the factors of the blocks after it, over the final sum.
TEST(OpsTest, OnlineSoftmaxRowComposesToTheWholeRowsSoftmax) {
  const float scale = 0.3f;
  const std::vector<float> x = Random(100, 21, -40, 40);
  const std::vector<int64_t> widths = {37, 16, 5, 40, 8};  // blocks of the row, 106 wide
  const int64_t valid_total = 100;
  double top = -INFINITY;
  for (const float v : x) top = std::max<double>(top, double(scale) * v);
  double total = 0;
  for (const float v : x) total += std::exp(double(scale) * v - top);
  float max = -INFINITY;
  double sum = 0;
  std::vector<std::vector<float>> blocks;
  std::vector<float> alphas;
  for (int64_t begin = 0; const int64_t width : widths) {
    std::vector<float> block(static_cast<size_t>(width), NAN);
    const int64_t valid = std::clamp<int64_t>(valid_total - begin, 0, width);
    std::copy(x.begin() + begin, x.begin() + begin + valid, block.begin());
    const float before = max;
    alphas.push_back(OnlineSoftmaxRow(block.data(), valid, width, scale, &max, &sum));
    EXPECT_NEAR(alphas.back(), std::exp(double(before) - max), 1e-6) << "block at " << begin;
    for (int64_t i = valid; i < width; ++i) EXPECT_EQ(block[i], 0.0f) << "block at " << begin << " value " << i;
    if (valid == 0) {
      EXPECT_EQ(alphas.back(), 1.0f);
    }
    blocks.push_back(block);
    begin += width;
  }
  EXPECT_NEAR(max, top, 1e-6 * std::fabs(top));
  EXPECT_NEAR(sum, total, 1e-5 * total);
  for (int64_t b = 0, begin = 0; b < static_cast<int64_t>(blocks.size()); begin += widths[b], ++b) {
    double later = 1;  // the factors of the blocks after this one
    for (size_t a = static_cast<size_t>(b) + 1; a < alphas.size(); ++a) later *= alphas[a];
    for (int64_t i = 0; i < widths[b] && begin + i < valid_total; ++i) {
      const double want = std::exp(double(scale) * x[begin + i] - top) / total;
      EXPECT_NEAR(blocks[b][i] * later / sum, want, 1e-5 * want + 1e-12) << "value " << begin + i;
    }
  }
}

// The BF16 form writes what OnlineSoftmaxRow writes, each value rounded as FloatToBf16,
// with the same maximum, sum and factor, and leaves its scores alone: widths short of,
// at and past a vector, nothing valid, a row with a NaN, and rows with an exponential
// below the normal floats (rounded as FloatToBf16 rounds subnormals, not taken as zero).
TEST(OpsTest, OnlineSoftmaxRowBf16RoundsWhatOnlineSoftmaxRowWrites) {
  for (const auto& [valid, width] : {std::pair<int64_t, int64_t>{5, 7}, {16, 32}, {37, 64}, {0, 9}, {100, 100}}) {
    for (const bool nan : {false, true}) {
      std::vector<float> x = Random(width, 30 + valid, -40, 40);
      if (nan && valid > 3) x[3] = NAN;
      if (valid > 1) {  // e^(0.3 x[1] - max) = e^-89.5: subnormal, and not zero in BF16
        float top = 1.5f;
        for (int64_t i = 0; i < valid; ++i) top = i == 1 ? top : std::fmax(top, 0.3f * x[i]);
        x[1] = (top - 89.5f) / 0.3f;
      }
      std::vector<float> f32 = x;
      float max = 1.5f, max_bf16 = 1.5f;  // a block after one whose maximum was 1.5
      double sum = 2.0, sum_bf16 = 2.0;
      const float alpha = OnlineSoftmaxRow(f32.data(), valid, width, 0.3f, &max, &sum);
      std::vector<uint16_t> rounded(static_cast<size_t>(width) + 1, 0xabcd);
      const std::vector<float> before = x;
      const float alpha_bf16 =
          OnlineSoftmaxRowBf16(x.data(), valid, width, 0.3f, &max_bf16, &sum_bf16, rounded.data());
      const std::string where = "valid " + std::to_string(valid) + " width " + std::to_string(width);
      EXPECT_EQ(std::memcmp(x.data(), before.data(), x.size() * sizeof(float)), 0) << where << ": scores changed";
      EXPECT_EQ(std::memcmp(&alpha, &alpha_bf16, sizeof(float)), 0) << where;
      EXPECT_EQ(std::memcmp(&max, &max_bf16, sizeof(float)), 0) << where;
      EXPECT_EQ(std::memcmp(&sum, &sum_bf16, sizeof(double)), 0) << where;
      if (valid > 1 && !nan) {
        EXPECT_EQ(std::fpclassify(f32[1]), FP_SUBNORMAL) << where;
        EXPECT_NE(FloatToBf16(f32[1]), 0) << where;
      }
      for (int64_t i = 0; i < width; ++i) {
        EXPECT_EQ(rounded[i], FloatToBf16(f32[i])) << where << " value " << i;
      }
      EXPECT_EQ(rounded[width], 0xabcd) << where << ": wrote past the width";
    }
  }
}

// RoundToBf16 (every latent row of a BF16 cache, the BF16 products' operands) is
// FloatToBf16 bit for bit on each vector path: ties to even either way, the largest
// finite values rounding to infinity, subnormals, signed zeros, and NaNs kept NaN
// (quiet), in every lane of a vector and in a tail.
TEST(OpsTest, RoundToBf16IsFloatToBf16BitForBit) {
  const uint32_t bits[] = {0x3f808000, 0x3f818000, 0x3f808001, 0x3f817fff, 0x7f7fffff, 0xff7fffff, 0x00000001,
                           0x80008000, 0x00018000, 0x80000000, 0x00000000, 0x7f800000, 0xff800000, 0x7f800001,
                           0xffc00001, 0x7fbfffff, 0x3eaaaaab, 0xc0490fdb};
  std::vector<float> in;
  for (int copy = 0; copy < 3; ++copy) {
    for (const uint32_t b : bits) in.push_back(std::bit_cast<float>(b ^ (copy == 2 ? 0x80000000u : 0u)));
  }
  const std::vector<float> random = Random(45, 77, -1e3, 1e3);
  in.insert(in.end(), random.begin(), random.end());
  for (const size_t n : {in.size(), size_t{13}, size_t{8}, size_t{3}}) {
    std::vector<uint16_t> out(n + 1, 0xabcd);
    RoundToBf16(in.data(), static_cast<int64_t>(n), out.data());
    for (size_t i = 0; i < n; ++i) {
      EXPECT_EQ(out[i], FloatToBf16(in[i])) << "n " << n << ", value " << i << " bits " << std::hex
                                            << std::bit_cast<uint32_t>(in[i]);
    }
    EXPECT_EQ(out[n], 0xabcd) << "wrote past " << n;
  }
}

}  // namespace
}  // namespace epic::cpu
