// The fast products (BF16 activations) against a float64 loop over the same rounded
// operands: the kernel must be exact but for F32 summation, over every shape class
// (single, odd, tile and block edges), strides, views and accumulate. And against the
// exact product: the rounding's error stays within what 8 significant bits allow.
// ctest runs this on each fast path the host has (EPIC_CPU_ISA).
#include "kernels/cpu/matmul_fast.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "common/half.h"
#include "common/scratch_buffer.h"
#include "kernels/cpu/cpu_features.h"

namespace epic::cpu {
namespace {

struct Case {
  int64_t m, n, k;
};

struct Operands {
  std::vector<float> x;
  std::vector<uint16_t> bf16;
  std::vector<float> f32;
  WeightMatrix w;
};

// X [m, ldx] and W [n, stride] (a view of columns [offset, offset + k) when OFFSET > 0).
Operands Random(const Case& c, int64_t ldx, int64_t stride, int64_t offset, WeightType type, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  Operands o;
  o.x.resize(static_cast<size_t>(c.m * ldx));
  for (float& v : o.x) v = dist(rng);
  const size_t size = static_cast<size_t>(c.n * stride);
  if (type == WeightType::kBF16) {
    o.bf16.resize(size);
    for (auto& v : o.bf16) v = FloatToBf16(dist(rng));
  } else {
    o.f32.resize(size);
    for (auto& v : o.f32) v = dist(rng);
  }
  WeightMatrix full;
  full.type = type;
  full.data = type == WeightType::kBF16 ? static_cast<const void*>(o.bf16.data()) : o.f32.data();
  full.rows = c.n;
  full.cols = stride;
  full.row_stride = stride;
  o.w = full.Cols(offset, c.k);
  return o;
}

float Round(float v) { return Bf16ToFloat(FloatToBf16(v)); }

// N values uniform in [-1, 1).
std::vector<float> Uniform(int64_t n, std::mt19937& rng) {
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  std::vector<float> v(static_cast<size_t>(n));
  for (float& e : v) e = dist(rng);
  return v;
}

class MatMulFastTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (internal::FastPath() == nullptr) GTEST_SKIP() << "no BF16 instructions on this host (" << IsaName(ActiveIsa()) << ")";
  }
};

TEST(MatMulFastPathTest, IsTheOneTheHostAndEpicCpuIsaAllow) {
  const char* path = internal::FastPath();
  std::printf("fast path: %s (active ISA %s, host offers: %s)\n", path ? path : "none (exact)", IsaName(ActiveIsa()),
              AvailableIsas().c_str());
  const char* forced = std::getenv("EPIC_CPU_ISA");
  if (forced == nullptr || std::string(IsaName(ActiveIsa())) != forced) return;  // not forced, or not offered here
  if (Has(Isa::kAmx)) {
    EXPECT_STREQ(path, "amx");
  } else if (Has(Isa::kAvx512Bf16)) {
    EXPECT_STREQ(path, "avx512_bf16");
  } else {
    EXPECT_EQ(path, nullptr);
  }
}

TEST_F(MatMulFastTest, EqualsAFloat64LoopOverTheRoundedOperands) {
  const Case cases[] = {{8, 1, 1},     {8, 16, 32},   {9, 17, 33},  {16, 32, 64},   {31, 33, 31},
                        {32, 32, 32},  {33, 47, 100}, {64, 96, 256}, {100, 130, 517}, {257, 64, 1408},
                        {40, 300, 2048}};
  uint32_t seed = 1;
  for (const Case& c : cases) {
    for (const WeightType type : {WeightType::kBF16, WeightType::kF32}) {
      for (const bool accumulate : {false, true}) {
        for (const int64_t offset : {int64_t{0}, int64_t{3}}) {
          SCOPED_TRACE("m " + std::to_string(c.m) + ", n " + std::to_string(c.n) + ", k " + std::to_string(c.k) +
                       (type == WeightType::kBF16 ? ", bf16" : ", f32") + (accumulate ? ", accumulate" : "") +
                       (offset ? ", a view of columns" : ""));
          const int64_t ldx = c.k + 5, stride = c.k + offset + 2, ldy = c.n + 3;
          const Operands o = Random(c, ldx, stride, offset, type, seed++);
          std::vector<float> y(static_cast<size_t>(c.m * ldy), 7.0f);
          const std::vector<float> before = y;
          MatMul(o.x.data(), c.m, ldx, o.w, y.data(), ldy, accumulate, Precision::kFast);
          for (int64_t i = 0; i < c.m; ++i) {
            for (int64_t j = 0; j < ldy; ++j) {
              const size_t at = static_cast<size_t>(i * ldy + j);
              if (j >= c.n) {
                ASSERT_EQ(y[at], before[at]) << "padding column " << j << " written";
                continue;
              }
              double want = accumulate ? before[at] : 0.0, magnitude = std::fabs(want);
              for (int64_t kk = 0; kk < c.k; ++kk) {
                const double term = double(Round(o.x[i * ldx + kk])) * double(Round(o.w.At(j, kk)));
                want += term;
                magnitude += std::fabs(term);
              }
              ASSERT_NEAR(y[at], want, 1e-5 * magnitude + 1e-30) << "row " << i << ", column " << j;
            }
          }
        }
      }
    }
  }
}

TEST_F(MatMulFastTest, StaysWithinBf16RoundingOfTheExactProduct) {
  // Each activation and F32 weight carries at most 2^-9 relative rounding; the product's
  // error is at most about that share of the sum of |terms|.
  const Case c{64, 200, 1024};
  for (const WeightType type : {WeightType::kBF16, WeightType::kF32}) {
    const Operands o = Random(c, c.k, c.k, 0, type, 99);
    std::vector<float> fast(static_cast<size_t>(c.m * c.n)), exact(fast.size());
    MatMul(o.x.data(), c.m, c.k, o.w, fast.data(), c.n, false, Precision::kFast);
    MatMul(o.x.data(), c.m, c.k, o.w, exact.data(), c.n, false, Precision::kExact);
    double worst = 0;
    for (int64_t i = 0; i < c.m; ++i) {
      for (int64_t j = 0; j < c.n; ++j) {
        double magnitude = 0;
        for (int64_t kk = 0; kk < c.k; ++kk) magnitude += std::fabs(double(o.x[i * c.k + kk]) * o.w.At(j, kk));
        const size_t at = static_cast<size_t>(i * c.n + j);
        worst = std::max(worst, std::fabs(double(fast[at]) - exact[at]) / magnitude);
      }
    }
    const double bound = type == WeightType::kBF16 ? std::ldexp(1.0, -9) : std::ldexp(1.0, -8);
    EXPECT_LE(worst, bound);
    EXPECT_GT(worst, 0) << "no rounding at all: the fast path did not run";
  }
}

TEST_F(MatMulFastTest, FewRowsRunExactly) {
  const Case c{internal::kFastMinRows - 1, 40, 64};
  const Operands o = Random(c, c.k, c.k, 0, WeightType::kBF16, 5);
  std::vector<float> fast(static_cast<size_t>(c.m * c.n)), exact(fast.size());
  MatMul(o.x.data(), c.m, c.k, o.w, fast.data(), c.n, false, Precision::kFast);
  MatMul(o.x.data(), c.m, c.k, o.w, exact.data(), c.n, false);
  EXPECT_EQ(fast, exact);
}

// W [rows, k] rounded to BF16 into zeroed Bf16Panels held by MEMORY (64-byte aligned).
const uint16_t* PackPanels(const std::vector<float>& w, int64_t rows, int64_t k, ScratchBuffer& memory) {
  const int64_t elements = Bf16Panels::Elements(rows, k), kp = Bf16Panels::Kp(k);
  auto* packed = static_cast<uint16_t*>(memory.Get(elements * static_cast<int64_t>(sizeof(uint16_t))));
  std::fill(packed, packed + elements, uint16_t{0});
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t kk = 0; kk < k; ++kk) packed[Bf16Panels::Index(kp, r, kk)] = FloatToBf16(w[r * k + kk]);
  }
  return packed;
}

// N values to pack: uniform in [-1, 1), the first a tie (to even: 1.0), the second NaN.
std::vector<float> ToPack(int64_t n, std::mt19937& rng) {
  std::vector<float> w = Uniform(n, rng);
  w[0] = 1.0f + 0x1p-8f;
  if (w.size() > 1) w[1] = NAN;
  return w;
}

// The panels of a ROWS x K matrix that PACK writes, their memory filled with 0xdead
// first so that an element it leaves unwritten shows.
template <typename Pack>
std::vector<uint16_t> Packed(int64_t rows, int64_t k, Pack&& pack) {
  std::vector<uint16_t> panels(static_cast<size_t>(Bf16Panels::Elements(rows, k)), 0xdead);
  pack(panels.data());
  return panels;
}

// GOT equal to WANT bit for bit, else the first element that differs.
::testing::AssertionResult SamePanels(const std::vector<uint16_t>& got, const std::vector<uint16_t>& want) {
  if (got.size() != want.size()) return ::testing::AssertionFailure() << got.size() << " elements, not " << want.size();
  for (size_t e = 0; e < got.size(); ++e) {
    if (got[e] != want[e]) {
      return ::testing::AssertionFailure() << "element " << e << ": " << got[e] << ", not " << want[e];
    }
  }
  return ::testing::AssertionSuccess();
}

// The library's packing equals the element-by-element one above bit for bit, padding
// included, with rows that end inside a panel and a row stride wider than k; values
// that round to even, to odd and NaN among them.
TEST(PackBf16PanelsTest, EqualsPackingEachElement) {
  std::mt19937 rng(5);
  for (const auto& [rows, k] : {std::pair<int64_t, int64_t>{1, 1}, {45, 37}, {70, 100}, {16, 64}, {3, 300}}) {
    SCOPED_TRACE("rows " + std::to_string(rows) + ", k " + std::to_string(k));
    const int64_t ldw = k + 5;
    const std::vector<float> w = ToPack(rows * ldw, rng);
    std::vector<float> dense(static_cast<size_t>(rows * k));
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < k; ++c) dense[r * k + c] = w[r * ldw + c];
    }
    ScratchBuffer want_memory;
    const uint16_t* want = PackPanels(dense, rows, k, want_memory);
    const std::vector<uint16_t> got =
        Packed(rows, k, [&](uint16_t* out) { PackBf16Panels(w.data(), rows, k, ldw, out); });
    ASSERT_TRUE(SamePanels(got, {want, want + got.size()}));
  }
}

// Packing W [k x rows] as its transpose gives PackBf16Panels' panels of the transpose,
// bit for bit: rows short of, at and past a panel of 16 and a block of 32, odd k, a tie
// and a NaN, and zeros past both.
TEST(PackBf16PanelsTest, TransposedEqualsPackingTheTranspose) {
  std::mt19937 rng(6);
  for (const auto& [rows, k] : {std::pair<int64_t, int64_t>{1, 1}, {64, 37}, {45, 100}, {16, 64}, {70, 300}}) {
    SCOPED_TRACE("rows " + std::to_string(rows) + ", k " + std::to_string(k));
    const int64_t ldw = rows + 3;
    const std::vector<float> w = ToPack(k * ldw, rng);
    std::vector<float> transposed(static_cast<size_t>(rows * k));
    for (int64_t c = 0; c < k; ++c) {
      for (int64_t r = 0; r < rows; ++r) transposed[r * k + c] = w[c * ldw + r];
    }
    const std::vector<uint16_t> want =
        Packed(rows, k, [&](uint16_t* out) { PackBf16Panels(transposed.data(), rows, k, k, out); });
    const std::vector<uint16_t> got =
        Packed(rows, k, [&](uint16_t* out) { PackBf16PanelsTransposed(w.data(), k, rows, ldw, out); });
    ASSERT_TRUE(SamePanels(got, want));
  }
}

// Packing rows joined from two parts (F32 rounded, then BF16 as is) gives PackBf16Panels'
// panels of the rows put together, bit for bit: parts of odd and even widths, joined
// widths short of and past a block of 32, rows past the read-ahead and short of it.
TEST(PackBf16PanelsTest, JoinedEqualsPackingTheJoinedRows) {
  std::mt19937 rng(7);
  for (const auto& [rows, ka, kb] :
       {std::tuple<int64_t, int64_t, int64_t>{1, 1, 1}, {5, 64, 32}, {40, 3, 30}, {70, 31, 2}, {600, 128, 64}}) {
    SCOPED_TRACE("rows " + std::to_string(rows) + ", parts " + std::to_string(ka) + " + " + std::to_string(kb));
    const int64_t lda = ka + 9, ldb = kb + 2, k = ka + kb;
    const std::vector<float> a = ToPack(rows * lda, rng), b_values = ToPack(rows * ldb, rng);
    std::vector<uint16_t> b(b_values.size());
    for (size_t i = 0; i < b.size(); ++i) b[i] = FloatToBf16(b_values[i]);
    std::vector<float> joined(static_cast<size_t>(rows * k));
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < ka; ++c) joined[r * k + c] = a[r * lda + c];
      for (int64_t c = 0; c < kb; ++c) joined[r * k + ka + c] = Bf16ToFloat(b[r * ldb + c]);
    }
    const std::vector<uint16_t> want =
        Packed(rows, k, [&](uint16_t* out) { PackBf16Panels(joined.data(), rows, k, k, out); });
    const std::vector<uint16_t> got =
        Packed(rows, k, [&](uint16_t* out) { PackBf16PanelsJoined(a.data(), lda, ka, b.data(), ldb, kb, rows, out); });
    ASSERT_TRUE(SamePanels(got, want));
  }
}

// The float64 sum over K of the rounded X[i] * W[i] (two rows), and the sum of the terms'
// magnitudes (the tolerance's scale).
double RoundedDot(const float* x, const float* w, int64_t k, double* magnitude) {
  double sum = 0;
  *magnitude = 0;
  for (int64_t i = 0; i < k; ++i) {
    const double term = double(Round(x[i])) * double(Round(w[i]));
    sum += term;
    *magnitude += std::fabs(term);
  }
  return sum;
}

// Weights of 70 rows and k = 100, uniform in [-1, 1), packed once as the expanded
// attention's keys and values are.
class PackedPanelsTest : public ::testing::Test {
 protected:
  static constexpr int64_t kRows = 70, kK = 100;
  std::mt19937 rng{9};
  const std::vector<float> w = Uniform(kRows * kK, rng);
  ScratchBuffer memory;
  const uint16_t* packed = PackPanels(w, kRows, kK, memory);
  const int64_t kp = Bf16Panels::Kp(kK);
};

// Panels packed once (the expanded attention's keys and values), read in prefixes of
// their rows and of k, on every host (a plain loop where it has no BF16 instructions):
// the float64 loop over the rounded operands, and nothing written past the rows asked.
TEST_F(PackedPanelsTest, PrefixesEqualAFloat64LoopOverTheRoundedOperands) {
  const Case cases[] = {{1, 70, 100}, {13, 45, 37}, {30, 70, 64}, {12, 16, 100}, {25, 33, 1}};
  for (const Case& c : cases) {
    SCOPED_TRACE("m " + std::to_string(c.m) + ", rows " + std::to_string(c.n) + ", k " + std::to_string(c.k));
    const int64_t ldx = c.k + 3, ldy = c.n + 2;
    const std::vector<float> x = Uniform(c.m * ldx, rng);
    std::vector<float> y(static_cast<size_t>(c.m * ldy), 7.0f);
    MatMulBf16Panels(x.data(), c.m, ldx, {packed, kp}, c.n, c.k, y.data(), ldy);
    for (int64_t i = 0; i < c.m; ++i) {
      for (int64_t j = 0; j < ldy; ++j) {
        const float got = y[static_cast<size_t>(i * ldy + j)];
        if (j >= c.n) {
          ASSERT_EQ(got, 7.0f) << "column " << j << " past the rows asked";
          continue;
        }
        double magnitude;
        const double want = RoundedDot(&x[i * ldx], &w[j * kK], c.k, &magnitude);
        ASSERT_NEAR(got, want, 1e-5 * magnitude + 1e-30) << "row " << i << ", column " << j;
      }
    }
  }
}

// A causal attention's two products, row I of x being position FIRST + I (first before,
// at and past the panels' start; rows past a block of 12): the scores' columns up to
// FIRST + I equal the float64 loop and whole blocks of 32 columns past the last row's
// reach are left as they were; the values' products, x zero past k = FIRST + I, equal
// the loop over all of k in every column, a row that sees nothing 0.
TEST_F(PackedPanelsTest, CausalProductsComputeWhatTheRowsSee) {
  const int64_t n = kRows, k = kK;
  for (const int64_t m : {13, 30}) {
    for (const int64_t first : {-20, 0, 7, 40}) {
      SCOPED_TRACE("m " + std::to_string(m) + ", first " + std::to_string(first));
      const int64_t ldx = k + 3, ldy = n + 2;
      std::vector<float> x = Uniform(m * ldx, rng);
      std::vector<float> y(static_cast<size_t>(m * ldy), 7.0f);
      MatMulBf16Panels(x.data(), m, ldx, {packed, kp}, n, k, y.data(), ldy, {Causal::kColumns, first});
      const int64_t last_reach = first + m;  // the last row's columns, all rows' at most
      for (int64_t i = 0; i < m; ++i) {
        for (int64_t j = 0; j < ldy; ++j) {
          const float got = y[static_cast<size_t>(i * ldy + j)];
          if (j >= n || j / 32 * 32 >= last_reach) {
            ASSERT_EQ(got, 7.0f) << "row " << i << ", column " << j << " is past every row's reach";
          } else if (j <= first + i) {
            double magnitude;
            const double want = RoundedDot(&x[i * ldx], &w[j * k], k, &magnitude);
            ASSERT_NEAR(got, want, 1e-5 * magnitude + 1e-30) << "row " << i << ", column " << j;
          }
        }
      }
      for (int64_t i = 0; i < m; ++i) {
        for (int64_t kk = std::max<int64_t>(0, first + i + 1); kk < k; ++kk) x[i * ldx + kk] = 0.0f;
      }
      std::fill(y.begin(), y.end(), 7.0f);
      MatMulBf16Panels(x.data(), m, ldx, {packed, kp}, n, k, y.data(), ldy, {Causal::kK, first});
      for (int64_t i = 0; i < m; ++i) {
        for (int64_t j = 0; j < ldy; ++j) {
          const float got = y[static_cast<size_t>(i * ldy + j)];
          if (j >= n) {
            ASSERT_EQ(got, 7.0f) << "column " << j << " past the rows asked";
            continue;
          }
          double magnitude;
          const double want = RoundedDot(&x[i * ldx], &w[j * k], k, &magnitude);
          if (first + i < 0) {
            ASSERT_EQ(got, 0.0f) << "row " << i << " sees no key";
          }
          ASSERT_NEAR(got, want, 1e-5 * magnitude + 1e-30) << "row " << i << ", column " << j;
        }
      }
    }
  }
}

// X rounded once (RoundRowsToBf16) and taken by MatMulBf16PanelsRounded gives the
// product MatMulBf16Panels gives from X, bit for bit, causal or not; the rounded rows are
// FloatToBf16's, zero past K and past M.
TEST_F(PackedPanelsTest, RoundedRowsGiveTheSameProducts) {
  for (const int64_t m : {1, 13, 30}) {
    for (const int64_t k : {37, 100}) {
      SCOPED_TRACE("m " + std::to_string(m) + ", k " + std::to_string(k));
      const int64_t ldx = k + 3, ldy = kRows + 2, xkp = Bf16Panels::Kp(k);
      const std::vector<float> x = Uniform(m * ldx, rng);
      std::vector<uint16_t> xb(static_cast<size_t>(Bf16Rows(m) * xkp), 0xabcd);
      ASSERT_GE(Bf16Rows(m), m);
      RoundRowsToBf16(x.data(), m, ldx, k, xb.data());
      for (int64_t i = 0; i < Bf16Rows(m); ++i) {
        for (int64_t j = 0; j < xkp; ++j) {
          ASSERT_EQ(xb[i * xkp + j], i < m && j < k ? FloatToBf16(x[i * ldx + j]) : 0) << "row " << i << ", " << j;
        }
      }
      for (const Causal causal : {Causal{}, Causal{Causal::kColumns, 5}, Causal{Causal::kK, -3}}) {
        std::vector<float> want(static_cast<size_t>(m * ldy), 7.0f), got = want;
        MatMulBf16Panels(x.data(), m, ldx, {packed, kp}, kRows, k, want.data(), ldy, causal);
        MatMulBf16PanelsRounded(xb.data(), m, {packed, kp}, kRows, k, got.data(), ldy, causal);
        ASSERT_EQ(std::memcmp(got.data(), want.data(), got.size() * sizeof(float)), 0) << "causal " << causal.kind;
      }
    }
  }
}

// The activations' rounding is FloatToBf16's, ties to even included: each row of x holds
// one value, and the weights are the identity, so each output is that value rounded.
TEST(MatMulBf16PanelsTest, RoundsActivationsToNearestEven) {
  const float tie = std::ldexp(1.0f, -8);  // half of BF16's last place at 1
  const std::vector<float> values = {1.0f + tie, 1.0f + 3 * tie, -(1.0f + tie), -(1.0f + 3 * tie),
                                     1.0f + tie * 1.5f, 3.0e38f, -2.5e-30f, 0.1f, 1.0f + tie * 0.5f};
  const int64_t n = static_cast<int64_t>(values.size()), kp = Bf16Panels::Kp(n);
  std::vector<float> ones(static_cast<size_t>(n * n), 0.0f);
  for (int64_t r = 0; r < n; ++r) ones[r * n + r] = 1.0f;
  ScratchBuffer memory;
  const uint16_t* identity = PackPanels(ones, n, n, memory);
  std::vector<float> x(static_cast<size_t>(n * n), 0.0f), y(static_cast<size_t>(n * n), NAN);
  for (int64_t i = 0; i < n; ++i) x[i * n + i] = values[i];
  MatMulBf16Panels(x.data(), n, n, {identity, kp}, n, n, y.data(), n);
  for (int64_t i = 0; i < n; ++i) {
    EXPECT_EQ(y[i * n + i], Bf16ToFloat(FloatToBf16(values[i]))) << "value " << values[i];
  }
  EXPECT_EQ(Bf16ToFloat(FloatToBf16(1.0f + tie)), 1.0f);  // the reference itself: to even
  EXPECT_EQ(Bf16ToFloat(FloatToBf16(1.0f + 3 * tie)), 1.0f + 4 * tie);
}

std::vector<uint16_t> RandomBf16(int64_t n, std::mt19937& rng) {
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  std::vector<uint16_t> v(static_cast<size_t>(n));
  for (uint16_t& b : v) b = FloatToBf16(dist(rng));
  return v;
}

// Decode's scores over BF16 rows: every row against every head's packed query, heads
// past one panel and short of one, rows past a block of 12 and in tails of 4 and 1.
TEST(MatMulBf16RowsTest, EqualsAFloat64LoopOverTheRoundedOperands) {
  std::mt19937 rng(21);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  const Case cases[] = {{16, 13, 320}, {5, 1, 20}, {19, 40, 64}, {16, 29, 2}};  // heads, rows, k
  for (const Case& c : cases) {
    SCOPED_TRACE("heads " + std::to_string(c.m) + ", rows " + std::to_string(c.n) + ", k " + std::to_string(c.k));
    const int64_t stride = c.k + 6, ldy = c.m + 3;
    const std::vector<uint16_t> rows = RandomBf16(c.n * stride, rng);
    std::vector<float> q(static_cast<size_t>(c.m * c.k));
    for (float& v : q) v = dist(rng);
    ScratchBuffer memory;
    const uint16_t* packed = PackPanels(q, c.m, c.k, memory);
    std::vector<float> y(static_cast<size_t>(c.n * ldy), 7.0f);
    MatMulBf16Rows(rows.data(), c.n, stride, {packed, Bf16Panels::Kp(c.k)}, c.m, c.k, y.data(), ldy);
    for (int64_t t = 0; t < c.n; ++t) {
      for (int64_t h = 0; h < ldy; ++h) {
        const float got = y[static_cast<size_t>(t * ldy + h)];
        if (h >= c.m) {
          ASSERT_EQ(got, 7.0f) << "column " << h << " past the heads";
          continue;
        }
        double want = 0, magnitude = 0;
        for (int64_t j = 0; j < c.k; ++j) {
          const double term = double(Bf16ToFloat(rows[t * stride + j])) * double(Round(q[h * c.k + j]));
          want += term;
          magnitude += std::fabs(term);
        }
        ASSERT_NEAR(got, want, 1e-5 * magnitude + 1e-30) << "row " << t << ", head " << h;
      }
    }
  }
}

// Decode's outputs over BF16 rows: odd row counts (the last row paired with none),
// columns short of and past a vector, heads past 16 and in blocks of 8 and 4, accumulate.
TEST(MatMulNoTransBf16Test, EqualsAFloat64LoopOverTheOperands) {
  std::mt19937 rng(22);
  struct Shape {
    int64_t m, n, cols;
    bool accumulate;
  };
  const Shape shapes[] = {{16, 13, 256, false}, {3, 1, 37, true},  {19, 40, 16, false},
                          {16, 7, 5, true},      {12, 9, 40, true}, {31, 2, 17, false}};
  for (const Shape& c : shapes) {
    SCOPED_TRACE("m " + std::to_string(c.m) + ", n " + std::to_string(c.n) + ", cols " + std::to_string(c.cols));
    const int64_t ldx = c.n + 5, stride = c.cols + 3, ldy = c.cols + 2;
    const std::vector<uint16_t> x = RandomBf16(c.m * ldx, rng), w = RandomBf16(c.n * stride, rng);
    std::vector<float> y(static_cast<size_t>(c.m * ldy), 0.5f);
    MatMulNoTransBf16(x.data(), ldx, c.m, w.data(), c.n, stride, c.cols, y.data(), ldy, c.accumulate);
    for (int64_t i = 0; i < c.m; ++i) {
      for (int64_t j = 0; j < ldy; ++j) {
        const float got = y[static_cast<size_t>(i * ldy + j)];
        if (j >= c.cols) {
          ASSERT_EQ(got, 0.5f) << "column " << j << " past the columns asked";
          continue;
        }
        double want = c.accumulate ? 0.5 : 0.0, magnitude = want;
        for (int64_t t = 0; t < c.n; ++t) {
          const double term = double(Bf16ToFloat(x[i * ldx + t])) * double(Bf16ToFloat(w[t * stride + j]));
          want += term;
          magnitude += std::fabs(term);
        }
        ASSERT_NEAR(got, want, 1e-5 * magnitude + 1e-30) << "row " << i << ", column " << j;
      }
    }
  }
}

}  // namespace
}  // namespace epic::cpu
