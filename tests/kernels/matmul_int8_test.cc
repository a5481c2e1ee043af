// Int8 products against a float64 loop written here: the weights as QuantizeInt8 left
// them (read back through At, itself checked against the rule max |w| / 127), the
// activations quantized by the same rule in the test, each scale block of a row apart.
// The kernel must equal that but for F32 rounding; every instruction path the host has
// (AVX2, AVX-VNNI, AVX512_VNNI) must equal the plain one bit for bit; and against the
// exact product the error stays within what the two roundings allow. ctest runs this on
// the host's paths and forced plain.
#include "kernels/cpu/matmul_int8.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "common/half.h"
#include "kernels/cpu/matmul_internal.h"

namespace epic::cpu {
namespace {

struct Case {
  int64_t m, n, k;
};

struct Quantized {
  std::vector<uint16_t> bf16;  // the source, [n, k]
  WeightMatrix source;
  std::unique_ptr<QuantizedMatrix> copy;
  WeightMatrix w;  // kI8, copy's
};

Quantized Make(int64_t n, int64_t k, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 0.05f);
  Quantized q;
  q.bf16.resize(static_cast<size_t>(n * k));
  for (auto& v : q.bf16) v = FloatToBf16(dist(rng));
  q.source = {WeightType::kBF16, q.bf16.data(), n, k, k};
  q.copy = std::make_unique<QuantizedMatrix>(q.source);
  q.w = q.copy->matrix();
  return q;
}

std::vector<float> RandomX(int64_t m, int64_t ldx, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> x(static_cast<size_t>(m * ldx));
  for (float& v : x) v = dist(rng);
  return x;
}

// Max |x| over X's scale block that holds value C.
float ScaleBlockMax(const float* x, int64_t k, int64_t c) {
  const int64_t begin = c / kInt8ScaleBlock * kInt8ScaleBlock;
  float amax = 0;
  for (int64_t j = begin; j < std::min(k, begin + kInt8ScaleBlock); ++j) amax = std::max(amax, std::fabs(x[j]));
  return amax;
}

// Row X of K values as the rule says, each scale block on its own: scale = max |x| /
// 127, q = round(x * 127 / max).
std::vector<double> QuantizeRowByRule(const float* x, int64_t k) {
  std::vector<double> out(static_cast<size_t>(k), 0.0);
  for (int64_t c = 0; c < k; ++c) {
    const float amax = ScaleBlockMax(x, k, c);
    if (amax == 0) continue;
    out[c] = std::nearbyint(x[c] * (127.0f / amax)) * static_cast<double>(amax / 127.0f);
  }
  return out;
}

TEST(QuantizeInt8, EveryWeightWithinHalfAStepOfItsRow) {
  const Quantized q = Make(37, 53, 1);
  for (int64_t r = 0; r < 37; ++r) {
    double amax = 0;
    for (int64_t c = 0; c < 53; ++c) amax = std::max(amax, std::fabs(double{q.source.At(r, c)}));
    ASSERT_NEAR(q.w.scales[r], amax / 127, amax * 1e-6) << r;
    for (int64_t c = 0; c < 53; ++c) {
      ASSERT_NEAR(q.w.At(r, c), q.source.At(r, c), q.w.scales[r] * 0.5001) << r << "," << c;
    }
  }
}

// Y against the float64 loop over both quantized operands, within F32 rounding.
void ExpectMatchesRule(const std::vector<float>& x, int64_t m, int64_t ldx, const WeightMatrix& w,
                       const std::vector<float>& y, int64_t ldy, const std::vector<float>& before) {
  for (int64_t i = 0; i < m; ++i) {
    const std::vector<double> xq = QuantizeRowByRule(x.data() + i * ldx, w.cols);
    for (int64_t n = 0; n < w.rows; ++n) {
      double want = before.empty() ? 0.0 : before[i * ldy + n];
      double magnitude = std::fabs(want);
      for (int64_t c = 0; c < w.cols; ++c) {
        want += xq[c] * w.At(n, c);
        magnitude += std::fabs(xq[c] * w.At(n, c));
      }
      ASSERT_NEAR(y[i * ldy + n], want, 1e-6 * magnitude + 1e-30) << "row " << i << " col " << n;
    }
  }
}

TEST(MatMulInt8, MatchesAFloat64LoopOverTheQuantizedOperands) {
  // 1-6 rows read a thread's panels as side-by-side parts with some left over: 600 and
  // 1000 columns (38 and 63 panels).
  const Case cases[] = {{1, 1, 1},     {1, 16, 4},    {1, 17, 5},      {3, 33, 7},     {6, 64, 64},
                        {7, 65, 259},  {13, 130, 300}, {2, 1408, 2048}, {40, 200, 96},  {19, 48, 1408},
                        {1, 600, 300}, {2, 1000, 96}, {3, 600, 520},    {5, 600, 300},  {6, 1000, 96}};
  uint32_t seed = 10;
  for (const Case& c : cases) {
    for (bool accumulate : {false, true}) {
      SCOPED_TRACE(testing::Message() << c.m << "x" << c.n << "x" << c.k << (accumulate ? " accumulate" : ""));
      const Quantized q = Make(c.n, c.k, ++seed);
      const int64_t ldx = c.k + 3, ldy = c.n + 5;
      const std::vector<float> x = RandomX(c.m, ldx, ++seed);
      std::vector<float> before = RandomX(c.m, ldy, ++seed);
      for (internal::Int8Path path : internal::Int8Paths()) {
        SCOPED_TRACE(internal::Int8PathName(path));
        std::vector<float> y = before;
        internal::MatMulInt8On(path, x.data(), c.m, ldx, q.w, y.data(), ldy, accumulate);
        ExpectMatchesRule(x, c.m, ldx, q.w, y, ldy, accumulate ? before : std::vector<float>{});
        for (int64_t i = 0; i < c.m; ++i) {
          for (int64_t j = c.n; j < ldy; ++j) ASSERT_EQ(y[i * ldy + j], before[i * ldy + j]) << "past the columns";
        }
      }
    }
  }
}

TEST(MatMulInt8, EveryPathEqualsThePlainOneBitForBit) {
  const Case cases[] = {{1, 100, 36},  {2, 64, 4100},  {3, 50, 300},   {5, 77, 130},  {6, 48, 256},
                        {64, 160, 520}, {300, 96, 64}, {512, 64, 1024}, {1, 1000, 300}, {3, 600, 100},
                        {4, 600, 520},  {6, 1000, 100}};
  uint32_t seed = 50;
  for (const Case& c : cases) {
    SCOPED_TRACE(testing::Message() << c.m << "x" << c.n << "x" << c.k);
    const Quantized q = Make(c.n, c.k, ++seed);
    std::vector<float> x = RandomX(c.m, c.k, ++seed);
    // Rows whose extremes quantize to +-127 and to 0 (every product at the int8 edges).
    x[0] = 1e-30f;
    if (c.m > 1) std::fill(x.begin() + c.k, x.begin() + 2 * c.k, -3.0f);
    std::vector<float> plain(static_cast<size_t>(c.m * c.n));
    internal::MatMulInt8Plain(x.data(), c.m, c.k, q.w, plain.data(), c.n, false);
    std::vector<float> active(plain.size());
    MatMul(x.data(), c.m, c.k, q.w, active.data(), c.n);
    EXPECT_EQ(active, plain) << "MatMul's path, " << internal::Int8PathName(internal::ActiveInt8Path());
    for (internal::Int8Path path : internal::Int8Paths()) {
      std::vector<float> y(plain.size());
      internal::MatMulInt8On(path, x.data(), c.m, c.k, q.w, y.data(), c.n, false);
      for (size_t i = 0; i < y.size(); ++i) ASSERT_EQ(y[i], plain[i]) << internal::Int8PathName(path) << " at " << i;
    }
  }
}

TEST(MatMulInt8, MatMulTakesTheWidestPathOrTheOneAsked) {
  const std::vector<internal::Int8Path> paths = internal::Int8Paths();
  ASSERT_EQ(paths.front(), internal::Int8Path::kPlain);
  EXPECT_EQ(HasInt8Products(), internal::ActiveInt8Path() != internal::Int8Path::kPlain);
  const char* asked = std::getenv("EPIC_INT8_PATH");
  std::string want = internal::Int8PathName(paths.back());
  for (internal::Int8Path p : paths) {
    if (asked != nullptr && want != asked && std::string(internal::Int8PathName(p)) == asked) want = asked;
  }
  EXPECT_EQ(internal::Int8PathName(internal::ActiveInt8Path()), want);
  if (std::getenv("EPIC_CPU_ISA") != nullptr && std::string(std::getenv("EPIC_CPU_ISA")) == "plain") {
    EXPECT_EQ(paths.size(), 1u) << "forced plain, no vector path may run";
  }
}

TEST(MatMulInt8, ErrorAgainstTheExactProductWithinTheRoundingsBound) {
  const Case c{9, 80, 700};
  const Quantized q = Make(c.n, c.k, 77);
  const std::vector<float> x = RandomX(c.m, c.k, 78);
  std::vector<float> y(static_cast<size_t>(c.m * c.n));
  MatMul(x.data(), c.m, c.k, q.w, y.data(), c.n);
  for (int64_t i = 0; i < c.m; ++i) {
    for (int64_t n = 0; n < c.n; ++n) {
      double exact = 0, bound = 0;
      for (int64_t k = 0; k < c.k; ++k) {
        const double x_step = ScaleBlockMax(x.data() + i * c.k, c.k, k) / 127.0;
        const double xv = x[i * c.k + k], wv = q.source.At(n, k);
        exact += xv * wv;
        // |x w - x' w'| <= |x| |w - w'| + |x - x'| |w'|, each rounding at most half a step.
        bound += std::fabs(xv) * q.w.scales[n] * 0.5 + x_step * 0.5 * std::fabs(double{q.w.At(n, k)});
      }
      ASSERT_NEAR(y[i * c.n + n], exact, bound * 1.001) << i << "," << n;
    }
  }
}

TEST(MatMulInt8, ANonFiniteActivationMakesItsRowNotFiniteAndNoOther) {
  // In the second scale block of three: the row's other blocks are finite.
  const int64_t k = 2 * kInt8ScaleBlock + 50;
  const Quantized q = Make(40, k, 5);
  std::vector<float> x = RandomX(3, k, 6);
  x[k + kInt8ScaleBlock + 10] = INFINITY;
  for (internal::Int8Path path : internal::Int8Paths()) {
    SCOPED_TRACE(internal::Int8PathName(path));
    std::vector<float> y(3 * 40);
    internal::MatMulInt8On(path, x.data(), 3, k, q.w, y.data(), 40, false);
    for (int64_t n = 0; n < 40; ++n) {
      EXPECT_TRUE(std::isfinite(y[n]));
      EXPECT_FALSE(std::isfinite(y[40 + n]));
      EXPECT_TRUE(std::isfinite(y[80 + n]));
    }
  }
}

TEST(MatMulInt8, ARowViewFromAPanelIsThoseRowsOfTheProduct) {
  const Quantized q = Make(100, 72, 9);
  const std::vector<float> x = RandomX(4, 72, 10);
  std::vector<float> all(4 * 100), part(4 * 50);
  MatMul(x.data(), 4, 72, q.w, all.data(), 100);
  MatMul(x.data(), 4, 72, q.w.Rows(32, 50), part.data(), 50);
  for (int64_t i = 0; i < 4; ++i) {
    for (int64_t n = 0; n < 50; ++n) ASSERT_EQ(part[i * 50 + n], all[i * 100 + 32 + n]);
  }
}

TEST(MatMulInt8, RowsQuantizedOnceThenGatheredEqualMatMulOnTheGatheredRows) {
  // The routed experts' way: a layer's rows quantized once, an expert's gathered from
  // them (repeats and any order), against MatMul quantizing the gathered F32 rows itself.
  const int64_t rows = 40, k = 130, ldx = 133;
  std::vector<float> x = RandomX(rows, ldx, 21);
  x[5 * ldx + 7] = NAN;  // a row not finite stays its own
  std::fill(x.begin() + 6 * ldx, x.begin() + 6 * ldx + k, 0.0f);
  Int8Rows layer;
  layer.Quantize(x.data(), rows, ldx, k);
  ASSERT_EQ(layer.rows(), rows);
  ASSERT_EQ(layer.cols(), k);
  for (const std::vector<int32_t>& index :
       {std::vector<int32_t>{3}, {39, 0, 5, 5, 6, 17, 2}, std::vector<int32_t>(rows)}) {
    std::vector<int32_t> pick = index;
    if (pick.size() == static_cast<size_t>(rows)) {
      for (int64_t i = 0; i < rows; ++i) pick[i] = static_cast<int32_t>(rows - 1 - i);
    }
    const int64_t n = static_cast<int64_t>(pick.size());
    SCOPED_TRACE(testing::Message() << n << " rows gathered");
    Int8Rows gathered;
    gathered.Gather(layer, pick.data(), n);
    std::vector<float> f32(static_cast<size_t>(n * k));
    for (int64_t i = 0; i < n; ++i) std::copy_n(x.begin() + pick[i] * ldx, k, f32.begin() + i * k);
    for (const int64_t out : {int64_t{16}, int64_t{77}, int64_t{300}}) {
      const Quantized q = Make(out, k, static_cast<uint32_t>(out));
      const int64_t ldy = out + 3;
      std::vector<float> want(static_cast<size_t>(n * ldy), 1.5f), got = want;
      MatMul(f32.data(), n, k, q.w, want.data(), ldy, /*accumulate=*/true);
      MatMulInt8(gathered, q.w, got.data(), ldy, /*accumulate=*/true);
      for (size_t i = 0; i < got.size(); ++i) {
        if (std::isnan(want[i])) {
          ASSERT_TRUE(std::isnan(got[i])) << i;
        } else {
          ASSERT_EQ(got[i], want[i]) << out << " outputs, at " << i;
        }
      }
    }
  }
}

TEST(MatMulInt8, ZeroActivationsGiveZero) {
  const Quantized q = Make(20, 30, 11);
  std::vector<float> x(2 * 30, 0.0f), y(2 * 20, 1.0f);
  MatMul(x.data(), 2, 30, q.w, y.data(), 20);
  for (float v : y) EXPECT_EQ(v, 0.0f);
}

}  // namespace
}  // namespace epic::cpu
