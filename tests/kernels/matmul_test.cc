// MatMul and MatMulNoTrans against a float64 triple loop on random inputs: every shape
// class (empty, single, odd, multiple blocks), strided and viewed weights, accumulate
// on and off, the dispatched path and the plain one. The dispatched path is the widest
// that EPIC_CPU_ISA allows: ctest runs this binary as it is and with EPIC_CPU_ISA=avx2
// and =plain, so each path is checked on a host that has it.
#include "kernels/cpu/matmul.h"

#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "common/half.h"
#include "kernels/cpu/cpu_features.h"
#include "kernels/cpu/matmul_internal.h"
#include "kernels/cpu/parallel.h"

namespace epic::cpu {
namespace {

constexpr float kSentinel = 12345.0f;  // in y's padding columns, must stay untouched

// Owns the storage behind a WeightMatrix.
struct TestWeights {
  std::vector<uint16_t> bf16;
  std::vector<float> f32;
  WeightMatrix matrix;
};

TestWeights RandomWeights(WeightType type, int64_t rows, int64_t cols, int64_t row_stride,
                          std::mt19937& rng) {
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  TestWeights t;
  const size_t size = static_cast<size_t>(std::max<int64_t>(rows * row_stride, 1));
  if (type == WeightType::kBF16) {
    t.bf16.resize(size);
    for (auto& v : t.bf16) v = FloatToBf16(dist(rng));
    t.matrix.data = t.bf16.data();
  } else {
    t.f32.resize(size);
    for (auto& v : t.f32) v = dist(rng);
    t.matrix.data = t.f32.data();
  }
  t.matrix.type = type;
  t.matrix.rows = rows;
  t.matrix.cols = cols;
  t.matrix.row_stride = row_stride;
  return t;
}

std::vector<float> RandomVector(size_t size, std::mt19937& rng) {
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  std::vector<float> v(std::max<size_t>(size, 1));
  for (auto& e : v) e = dist(rng);
  return v;
}

// Output [m, ldy]: NaN in the n_out columns a non-accumulating call must write, random
// values when accumulating, the sentinel in the padding.
std::vector<float> InitialOutput(int64_t m, int64_t n_out, int64_t ldy, bool accumulate,
                                 std::mt19937& rng) {
  std::vector<float> y = RandomVector(static_cast<size_t>(m * ldy), rng);
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t n = 0; n < ldy; ++n) {
      float& e = y[i * ldy + n];
      if (n >= n_out) {
        e = kSentinel;
      } else if (!accumulate) {
        e = std::numeric_limits<float>::quiet_NaN();
      }
    }
  }
  return y;
}

// Checks y against the float64 product ref (with magnitudes mag = sum |x||w|) added to
// the initial output y0 when accumulating. Returns the number of bad elements.
int CheckOutput(const std::vector<float>& y, const std::vector<float>& y0,
                const std::vector<double>& ref, const std::vector<double>& mag, int64_t m,
                int64_t n_out, int64_t ldy, bool accumulate) {
  int bad = 0;
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t n = 0; n < ldy; ++n) {
      const float got = y[i * ldy + n];
      if (n >= n_out) {
        if (got != kSentinel && bad++ < 5) {
          ADD_FAILURE() << "padding y[" << i << "," << n << "] overwritten: " << got;
        }
        continue;
      }
      const double base = accumulate ? static_cast<double>(y0[i * ldy + n]) : 0.0;
      const double want = base + ref[i * n_out + n];
      const double tolerance = 1e-5 * (mag[i * n_out + n] + std::fabs(base) + 1e-30);
      if (!(std::fabs(got - want) <= tolerance) && bad++ < 5) {
        ADD_FAILURE() << "y[" << i << "," << n << "] = " << got << ", want " << want
                      << " (tolerance " << tolerance << ")";
      }
    }
  }
  return bad;
}

enum class Path { kDispatched, kPlain };

struct Shape {
  int64_t m, rows, cols;
  int64_t stride_pad = 0;  // row_stride = cols + stride_pad
  bool accumulate = false;
};

std::string Describe(WeightType type, const Shape& s, Path path) {
  return std::string(type == WeightType::kBF16 ? "bf16" : "f32") + " m=" + std::to_string(s.m) +
         " rows=" + std::to_string(s.rows) + " cols=" + std::to_string(s.cols) +
         " stride_pad=" + std::to_string(s.stride_pad) + (s.accumulate ? " accumulate" : "") +
         (path == Path::kPlain ? " plain" : "");
}

// y = x w^T against float64; returns the number of bad elements.
int RunMatMul(const WeightMatrix& w, int64_t m, bool accumulate, Path path, std::mt19937& rng) {
  const int64_t ldx = w.cols + 3;
  const int64_t ldy = w.rows + 2;
  const std::vector<float> x = RandomVector(static_cast<size_t>(m * ldx), rng);
  std::vector<float> y = InitialOutput(m, w.rows, ldy, accumulate, rng);
  const std::vector<float> y0 = y;

  std::vector<double> ref(static_cast<size_t>(m * w.rows)), mag(ref.size());
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t n = 0; n < w.rows; ++n) {
      double sum = 0, abs_sum = 0;
      for (int64_t k = 0; k < w.cols; ++k) {
        const double product = static_cast<double>(x[i * ldx + k]) * w.At(n, k);
        sum += product;
        abs_sum += std::fabs(product);
      }
      ref[i * w.rows + n] = sum;
      mag[i * w.rows + n] = abs_sum;
    }
  }
  if (path == Path::kPlain) {
    internal::MatMulPlain(x.data(), m, ldx, w, y.data(), ldy, accumulate);
  } else {
    MatMul(x.data(), m, ldx, w, y.data(), ldy, accumulate);
  }
  return CheckOutput(y, y0, ref, mag, m, w.rows, ldy, accumulate);
}

// y = x w against float64; returns the number of bad elements.
int RunMatMulNoTrans(const WeightMatrix& w, int64_t m, bool accumulate, Path path,
                     std::mt19937& rng) {
  const int64_t ldx = w.rows + 1;
  const int64_t ldy = w.cols + 5;
  const std::vector<float> x = RandomVector(static_cast<size_t>(m * ldx), rng);
  std::vector<float> y = InitialOutput(m, w.cols, ldy, accumulate, rng);
  const std::vector<float> y0 = y;

  std::vector<double> ref(static_cast<size_t>(m * w.cols), 0.0), mag(ref.size(), 0.0);
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t n = 0; n < w.rows; ++n) {
      for (int64_t k = 0; k < w.cols; ++k) {
        const double product = static_cast<double>(x[i * ldx + n]) * w.At(n, k);
        ref[i * w.cols + k] += product;
        mag[i * w.cols + k] += std::fabs(product);
      }
    }
  }
  if (path == Path::kPlain) {
    internal::MatMulNoTransPlain(x.data(), m, ldx, w, y.data(), ldy, accumulate);
  } else {
    MatMulNoTrans(x.data(), m, ldx, w, y.data(), ldy, accumulate);
  }
  return CheckOutput(y, y0, ref, mag, m, w.cols, ldy, accumulate);
}

std::vector<Shape> MatMulShapes() {
  std::vector<Shape> shapes;
  const int64_t ms[] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 24, 25, 33, 130};
  const int64_t sizes[] = {1, 17, 64, 257, 1000};
  int variant = 0;
  for (int64_t m : ms) {
    for (int64_t rows : sizes) {
      for (int64_t cols : sizes) {
        // Keep the float64 reference affordable on the largest cases.
        if (m >= 16 && rows * cols > 257 * 1000) continue;
        ++variant;
        shapes.push_back({m, rows, cols, variant % 3 == 0 ? 0 : 7, variant % 2 == 0});
      }
    }
  }
  // Several k blocks, several column blocks per thread, and row chunking of packed x.
  shapes.push_back({130, 1000, 1000, 0, false});
  shapes.push_back({300, 70, 5000, 3, true});
  shapes.push_back({512, 100, 600, 1, false});
  // Decode's groups of x where 4 rows would not stay in L1: pairs, a third row joining
  // the last pair (2500 columns) or left alone (3000).
  shapes.push_back({3, 70, 2500, 0, false});
  shapes.push_back({5, 40, 3000, 2, true});
  shapes.push_back({13, 30, 1000, 0, true});
  return shapes;
}

class MatMulTest : public ::testing::TestWithParam<WeightType> {};

TEST_P(MatMulTest, MatchesFloat64Reference) {
  std::mt19937 rng(1234);
  for (const Shape& s : MatMulShapes()) {
    SCOPED_TRACE(Describe(GetParam(), s, Path::kDispatched));
    TestWeights w = RandomWeights(GetParam(), s.rows, s.cols, s.cols + s.stride_pad, rng);
    ASSERT_EQ(RunMatMul(w.matrix, s.m, s.accumulate, Path::kDispatched, rng), 0);
  }
}

TEST_P(MatMulTest, PlainPathMatchesFloat64Reference) {
  std::mt19937 rng(99);
  for (const Shape& s : MatMulShapes()) {
    if (s.m * s.rows * s.cols > 20'000'000) continue;
    SCOPED_TRACE(Describe(GetParam(), s, Path::kPlain));
    TestWeights w = RandomWeights(GetParam(), s.rows, s.cols, s.cols + s.stride_pad, rng);
    ASSERT_EQ(RunMatMul(w.matrix, s.m, s.accumulate, Path::kPlain, rng), 0);
  }
}

TEST_P(MatMulTest, EmptyInnerDimensionZeroesOrKeepsOutput) {
  std::mt19937 rng(5);
  for (int64_t m : {1, 4, 20}) {
    for (bool accumulate : {false, true}) {
      TestWeights w = RandomWeights(GetParam(), 9, 4, 4, rng);
      WeightMatrix empty = w.matrix.Cols(1, 0);
      std::vector<float> x(static_cast<size_t>(m) * 4, 1.0f);
      std::vector<float> y(static_cast<size_t>(m) * 9, 2.0f);
      MatMul(x.data(), m, 4, empty, y.data(), 9, accumulate);
      for (float v : y) ASSERT_EQ(v, accumulate ? 2.0f : 0.0f);
    }
  }
}

TEST_P(MatMulTest, RowAndColumnViews) {
  std::mt19937 rng(77);
  TestWeights full = RandomWeights(GetParam(), 300, 500, 512, rng);
  const WeightMatrix view = full.matrix.Rows(10, 100).Cols(37, 201);
  ASSERT_EQ(view.rows, 100);
  ASSERT_EQ(view.cols, 201);
  ASSERT_EQ(view.row_stride, 512);
  for (int64_t r : {0, 5, 99}) {
    for (int64_t c : {0, 13, 200}) ASSERT_EQ(view.At(r, c), full.matrix.At(10 + r, 37 + c));
  }
  for (int64_t m : {1, 3, 8, 40}) {
    for (bool accumulate : {false, true}) {
      SCOPED_TRACE("view m=" + std::to_string(m) + (accumulate ? " accumulate" : ""));
      ASSERT_EQ(RunMatMul(view, m, accumulate, Path::kDispatched, rng), 0);
      ASSERT_EQ(RunMatMul(view, m, accumulate, Path::kPlain, rng), 0);
    }
  }
}

// A product inside any parallel region, active or not, takes no team of its own (inside
// an inactive one that team was nested: fresh threads each call); ParallelFor runs each
// item once, and a loop it keeps on this thread leaves the products every thread.
TEST(ParallelFor, ProductsInsideItTakeTeamsOnlyOutsideEveryRegion) {
  constexpr double kHuge = 1e12;
  const int threads = omp_get_max_threads();
  EXPECT_EQ(internal::TeamSize(kHuge), threads);
  int inactive = -1;
#pragma omp parallel if (false)
  inactive = internal::TeamSize(kHuge);
  EXPECT_EQ(inactive, 1);

  std::vector<int> runs(50, 0), teams(50, -1);
  ParallelFor(50, true, [&](int64_t i) {
    ++runs[i];
    teams[i] = internal::TeamSize(kHuge);
  });
  for (int i = 0; i < 50; ++i) EXPECT_EQ(runs[i], 1) << i;
  if (threads > 1) {
    for (int i = 0; i < 50; ++i) EXPECT_EQ(teams[i], 1) << i;
  }
  ParallelFor(3, false, [&](int64_t i) {
    EXPECT_EQ(omp_get_level(), 0);
    teams[i] = internal::TeamSize(kHuge);
  });
  for (int i = 0; i < 3; ++i) EXPECT_EQ(teams[i], threads) << i;
}

// OnTeam with one thread opens no region, not even an inactive one (each cost a team's
// setup): the body sees the caller's nesting level; with two, each thread runs it once.
TEST(OnTeam, OneThreadRunsInPlaceAndATeamRunsTheBodyOnEachThread) {
  int level = -1, calls = 0;
  OnTeam(1, [&](int t, int n) {
    level = omp_get_level();
    calls += (t == 0 && n == 1);
  });
  EXPECT_EQ(level, 0);
  EXPECT_EQ(calls, 1);
  int nested_level = -1;
#pragma omp parallel num_threads(2)
  {
    if (omp_get_thread_num() == 0) OnTeam(1, [&](int, int) { nested_level = omp_get_level(); });
  }
  EXPECT_EQ(nested_level, 1);
  std::vector<int> ran(2, 0);
  int threads = 0;
  OnTeam(2, [&](int t, int n) {
#pragma omp atomic
    ++ran[t];
    if (t == 0) threads = n;
  });
  EXPECT_EQ(threads, 2);
  EXPECT_EQ(ran, (std::vector<int>{1, 1}));
}

// Called from inside a parallel region, each call runs on its caller's thread alone.
TEST_P(MatMulTest, InsideParallelRegion) {
  std::mt19937 rng(3);
  TestWeights w = RandomWeights(GetParam(), 200, 300, 300, rng);
  int bad = 0;
  // Each thread gets its own generator; results are checked after the region.
#pragma omp parallel num_threads(2) reduction(+ : bad)
  {
    std::mt19937 local(100 + omp_get_thread_num());
    const int64_t m = omp_get_thread_num() == 0 ? 2 : 24;
    const int64_t ldx = 300, ldy = 200;
    std::vector<float> x = RandomVector(static_cast<size_t>(m * ldx), local);
    std::vector<float> y(static_cast<size_t>(m * ldy), std::numeric_limits<float>::quiet_NaN());
    MatMul(x.data(), m, ldx, w.matrix, y.data(), ldy);
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t n = 0; n < 200; ++n) {
        double sum = 0, mag = 0;
        for (int64_t k = 0; k < 300; ++k) {
          const double p = static_cast<double>(x[i * ldx + k]) * w.matrix.At(n, k);
          sum += p;
          mag += std::fabs(p);
        }
        if (!(std::fabs(y[i * ldy + n] - sum) <= 1e-5 * mag)) ++bad;
      }
    }
  }
  EXPECT_EQ(bad, 0);
}

TEST_P(MatMulTest, NoTransMatchesFloat64Reference) {
  std::mt19937 rng(4321);
  const int64_t ms[] = {0, 1, 2, 5, 6, 7, 16, 64};
  // {700, 256}: w's rows in several passes (chunks that stay in L2); up to 16 columns:
  // AVX-512's narrow blocks (12 rows of x, one vector).
  const std::pair<int64_t, int64_t> sizes[] = {{1, 1}, {17, 33}, {128, 512}, {257, 64},
                                               {64, 1000}, {3, 15}, {700, 256}, {20, 16}};
  int variant = 0;
  for (int64_t m : ms) {
    for (auto [rows, cols] : sizes) {
      for (Path path : {Path::kDispatched, Path::kPlain}) {
        ++variant;
        const Shape s{m, rows, cols, variant % 3 == 0 ? 0 : 9, variant % 2 == 0};
        SCOPED_TRACE("no-trans " + Describe(GetParam(), s, path));
        TestWeights w = RandomWeights(GetParam(), rows, cols, cols + s.stride_pad, rng);
        ASSERT_EQ(RunMatMulNoTrans(w.matrix, m, s.accumulate, path, rng), 0);
      }
    }
  }
  // A view: one head's columns of a wider matrix.
  TestWeights full = RandomWeights(GetParam(), 128, 1024, 1024, rng);
  for (bool accumulate : {false, true}) {
    ASSERT_EQ(RunMatMulNoTrans(full.matrix.Cols(512, 512).Rows(3, 120), 9, accumulate,
                               Path::kDispatched, rng),
              0);
  }
}

INSTANTIATE_TEST_SUITE_P(WeightTypes, MatMulTest,
                         ::testing::Values(WeightType::kBF16, WeightType::kF32),
                         [](const auto& info) {
                           return std::string(info.param == WeightType::kBF16 ? "BF16" : "F32");
                         });

// Weights packed once, products over prefixes of their rows and columns (attention's
// keys and values): against a float64 loop over the unpacked weights, with prefixes that
// end inside a panel, a block of columns and a block of rows, rows of x past the
// register tile and in several packed chunks. Every row of y past N_USED is left as it
// was.
TEST(MatMulPackedF32, PrefixProductsMatchFloat64) {
  std::mt19937 rng(77);
  struct Case {
    int64_t rows, cols, stride, m, n_used, k_used;
  };
  const Case cases[] = {{1, 1, 1, 1, 1, 1},        {40, 96, 100, 13, 40, 96},  {40, 96, 96, 13, 17, 96},
                        {700, 96, 96, 9, 413, 96}, {64, 700, 700, 5, 64, 300}, {64, 700, 700, 70, 33, 513},
                        {5, 300, 301, 3, 5, 0},
                        // k long enough that x is packed in several chunks of rows
                        {16, 40000, 40000, 40, 16, 39999}};
  for (const Case& c : cases) {
    SCOPED_TRACE(::testing::Message() << "rows " << c.rows << " cols " << c.cols << " m " << c.m << " n_used "
                                      << c.n_used << " k_used " << c.k_used);
    const std::vector<float> w = RandomVector(static_cast<size_t>(c.rows * c.stride), rng);
    std::vector<float> packed(static_cast<size_t>(PackedF32Floats(c.rows, c.cols)));
    PackF32(w.data(), c.rows, c.cols, c.stride, packed.data());
    const int64_t ldx = c.cols + 3, ldy = c.rows + 2;
    const std::vector<float> x = RandomVector(static_cast<size_t>(c.m * ldx), rng);
    std::vector<float> y(static_cast<size_t>(c.m * ldy), 7.0f);
    MatMulPackedF32(x.data(), c.m, ldx, packed.data(), c.rows, c.cols, c.n_used, c.k_used, y.data(), ldy);
    int bad = 0;
    for (int64_t i = 0; i < c.m; ++i) {
      for (int64_t n = 0; n < ldy; ++n) {
        const float got = y[i * ldy + n];
        if (n >= c.n_used) {
          bad += got != 7.0f;
          continue;
        }
        double sum = 0, mag = 0;
        for (int64_t k = 0; k < c.k_used; ++k) {
          const double p = static_cast<double>(x[i * ldx + k]) * w[n * c.stride + k];
          sum += p;
          mag += std::fabs(p);
        }
        bad += !(std::fabs(got - sum) <= 1e-5 * mag + 1e-30);
      }
    }
    EXPECT_EQ(bad, 0);
  }
}

TEST(MatMulDispatch, ReportsPath) {
  std::printf("MatMul path: %s (active %s, host offers: %s)\n", IsaName(internal::MatMulIsa()),
              IsaName(ActiveIsa()), AvailableIsas().c_str());
}

// A path EPIC_CPU_ISA asks for and the host offers must be the one that runs: a silent
// fallback would leave it untested while its ctest entries pass.
TEST(MatMulDispatch, RunsThePathEpicCpuIsaAsksFor) {
  const char* asked = std::getenv("EPIC_CPU_ISA");
  if (asked == nullptr || *asked == '\0') GTEST_SKIP() << "EPIC_CPU_ISA is not set";
  int rung = -1;
  for (int i = 0; i <= static_cast<int>(Isa::kAmx); ++i) {
    if (std::strcmp(IsaName(static_cast<Isa>(i)), asked) == 0) rung = i;
  }
  ASSERT_GE(rung, 0) << "EPIC_CPU_ISA=" << asked << " names no instruction set";
  if (rung > static_cast<int>(DetectedIsa())) {
    GTEST_SKIP() << "EPIC_CPU_ISA=" << asked << " but this host offers only " << AvailableIsas();
  }
  const Isa want = static_cast<Isa>(rung);
  EXPECT_EQ(ActiveIsa(), want) << IsaName(ActiveIsa());
  const Isa kernels = want >= Isa::kAvx512 ? Isa::kAvx512 : want;
  EXPECT_EQ(internal::MatMulIsa(), kernels) << IsaName(internal::MatMulIsa());
}

TEST(MatMulDispatch, Bf16FormIsTheHostsOrTheOneAsked) {
  const char* asked = std::getenv("EPIC_BF16_FORM");
  constexpr int64_t kAll = std::numeric_limits<int64_t>::max();
  if (asked == nullptr || *asked == '\0') {
    const int zen = AmdZenAvx512();
    EXPECT_EQ(internal::Bf16DotMaxRows(), zen == 4 ? kAll : zen == 5 ? 256 : 0) << "Zen " << zen;
  } else {
    EXPECT_EQ(internal::Bf16DotMaxRows(), std::strcmp(asked, "dot") == 0 ? kAll : 0) << asked;
  }
}

}  // namespace
}  // namespace epic::cpu
