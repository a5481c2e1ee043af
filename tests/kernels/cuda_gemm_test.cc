// The CUDA matrix products against float64 host loops on random inputs of odd sizes:
// cuBLAS's dense and per-head products, the BF16 conversions and epic's grouped expert
// product. Outputs, and the padding of inputs, are poisoned with NaN first, so a value
// the kernels never wrote, or one they should never have read, shows. On a machine
// without a GPU every device test reports SKIPPED; the argument checks that return
// before any device work run everywhere.
#include "kernels/cuda/gemm.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iterator>
#include <limits>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "common/half.h"
#include "kernels/cuda/buffer.h"
#include "kernels/cuda/device.h"
#include "tests/kernels/cuda_test_util.h"
#include "tests/testing/random_values.h"

namespace epic::cuda {
namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr uint16_t kBf16NaN = 0x7fc0;
// What BF16 outputs are poisoned with: a NaN that rounding no finite value produces.
constexpr uint16_t kBf16Poison = 0xffff;
// A product of two BF16 values is exact in F32, so BF16 products differ from float64
// only by the F32 accumulation, at most about k * 2^-24 of sum |x||w| in any order:
// 1e-4 of it holds for every k here and is far below a wrong element, a k block counted
// twice or missed, or a row from the wrong expert.
constexpr double kBf16Relative = 1e-4;
constexpr double kAbsoluteFloor = 1e-6;
// F32 products (the router): TF32's 10-bit mantissa would miss this by far.
constexpr double kF32Relative = 1e-5;

using epic::testing::Random;

float FromBits(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Any F32 value but NaN, from random bits: every exponent, subnormals included.
std::vector<float> RandomBits(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<float> v(n);
  for (float& x : v) {
    do {
      x = FromBits(static_cast<uint32_t>(rng()));
    } while (std::isnan(x));
  }
  return v;
}

// Values rounded to BF16 on the host: the bits to upload and the floats they stand for.
struct Bf16Values {
  std::vector<uint16_t> bits;
  std::vector<float> values;
};

Bf16Values RoundToBf16(const std::vector<float>& v) {
  Bf16Values out;
  out.bits.resize(v.size());
  out.values.resize(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    out.bits[i] = FloatToBf16(v[i]);
    out.values[i] = Bf16ToFloat(out.bits[i]);
  }
  return out;
}

// Sets columns [width, ld) of every row of M (row stride LD) to POISON.
template <typename T>
void PoisonPadding(std::vector<T>& m, int64_t width, int64_t ld, T poison) {
  for (size_t r = 0; r * ld < m.size(); ++r) {
    for (int64_t c = width; c < ld; ++c) m[r * ld + c] = poison;
  }
}

// out[i, o] = sum_j x[i * ldx + j] * w[o * w_out + j * w_in] for i < m, o < outs, j < ins,
// in float64, with scale[i, o] = sum_j |x||w| for the tolerance. (w_out, w_in) = (ld, 1)
// is x W^T; (1, ld) is x W.
struct Product {
  std::vector<double> value;  // [m, outs]
  std::vector<double> scale;  // [m, outs]
};

Product HostProduct(const float* x, int64_t m, int64_t ldx, const float* w, int64_t outs, int64_t ins,
                    int64_t w_out, int64_t w_in) {
  Product p;
  p.value.assign(m * outs, 0.0);
  p.scale.assign(m * outs, 0.0);
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t o = 0; o < outs; ++o) {
      double sum = 0.0, size = 0.0;
      for (int64_t j = 0; j < ins; ++j) {
        const double term = static_cast<double>(x[i * ldx + j]) * static_cast<double>(w[o * w_out + j * w_in]);
        sum += term;
        size += std::fabs(term);
      }
      p.value[i * outs + o] = sum;
      p.scale[i * outs + o] = size;
    }
  }
  return p;
}

void ExpectClose(float got, double want, double scale, double relative, const std::string& what, int64_t row,
                 int64_t col) {
  EXPECT_NEAR(got, want, relative * scale + kAbsoluteFloor) << what << ": row " << row << " col " << col;
}

bool IsBf16NaN(uint16_t bits) { return (bits & 0x7f80u) == 0x7f80u && (bits & 0x7fu) != 0; }

std::string Shape(int64_t m, int64_t k, int64_t n) {
  return "m " + std::to_string(m) + ", k " + std::to_string(k) + ", n " + std::to_string(n);
}

// --- MatMul ---------------------------------------------------------------------------

TEST(CudaGemmTest, MatMulWithBf16WeightsMatchesAFloat64Loop) {
  SKIP_WITHOUT_GPU();
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Blas> blas, Blas::Create());
  int variant = 0;
  for (int64_t m : {1, 3, 17, 130}) {
    for (int64_t k : {7, 64, 129}) {
      for (int64_t n : {1, 33, 256}) {
        // Padding of x, y and w in turn, and together: the strides must be passed as given.
        const int64_t ldx = k + (variant & 1 ? 5 : 0);
        const int64_t ldy = n + (variant & 2 ? 3 : 0);
        const int64_t ldw = k + (variant % 3 == 0 ? 8 : 0);
        ++variant;
        const std::string what = "BF16 MatMul, " + Shape(m, k, n);
        Bf16Values x = RoundToBf16(Random(m * ldx, 100 + m * 1000 + k * 10 + n));
        Bf16Values w = RoundToBf16(Random(n * ldw, 200 + m * 1000 + k * 10 + n));
        // Padding the product must never read.
        PoisonPadding(x.bits, k, ldx, kBf16NaN);
        PoisonPadding(w.bits, k, ldw, kBf16NaN);
        const Product want = HostProduct(x.values.data(), m, ldx, w.values.data(), n, k, ldw, 1);

        ASSERT_OK_AND_ASSIGN(DeviceBuffer<uint16_t> dx, DeviceBuffer<uint16_t>::FromHost(x.bits));
        ASSERT_OK_AND_ASSIGN(DeviceBuffer<uint16_t> dw, DeviceBuffer<uint16_t>::FromHost(w.bits));
        ASSERT_OK_AND_ASSIGN(DeviceBuffer<float> dy, DeviceBuffer<float>::FromHost(std::vector<float>(m * ldy, kNaN)));
        const DeviceMatrix matrix{DType::kBF16, dw.data(), n, k, ldw};
        ASSERT_OK(MatMul(*blas, dx.data(), m, ldx, matrix, dy.data(), ldy));
        ASSERT_OK_AND_ASSIGN(std::vector<float> got, dy.ToHost());
        for (int64_t i = 0; i < m; ++i) {
          for (int64_t c = 0; c < n; ++c) {
            ExpectClose(got[i * ldy + c], want.value[i * n + c], want.scale[i * n + c], kBf16Relative, what, i, c);
          }
          for (int64_t c = n; c < ldy; ++c) EXPECT_TRUE(std::isnan(got[i * ldy + c])) << what << ": padding written";
        }
      }
    }
  }
}

TEST(CudaGemmTest, MatMulAccumulateAddsToY) {
  SKIP_WITHOUT_GPU();
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Blas> blas, Blas::Create());
  const int64_t shapes[][3] = {{1, 7, 1}, {3, 129, 33}, {17, 64, 256}, {130, 129, 33}};
  for (const auto& shape : shapes) {
    const int64_t m = shape[0], k = shape[1], n = shape[2];
    const int64_t ldx = k + 1, ldy = n + 2;
    const std::string what = "accumulating MatMul, " + Shape(m, k, n);
    Bf16Values x = RoundToBf16(Random(m * ldx, 300 + m + k + n));
    const Bf16Values w = RoundToBf16(Random(n * k, 400 + m + k + n));
    PoisonPadding(x.bits, k, ldx, kBf16NaN);
    std::vector<float> y = Random(m * ldy, 500 + m + k + n, -50.0f, 50.0f);
    PoisonPadding(y, n, ldy, kNaN);
    const Product product = HostProduct(x.values.data(), m, ldx, w.values.data(), n, k, k, 1);

    ASSERT_OK_AND_ASSIGN(DeviceBuffer<uint16_t> dx, DeviceBuffer<uint16_t>::FromHost(x.bits));
    ASSERT_OK_AND_ASSIGN(DeviceBuffer<uint16_t> dw, DeviceBuffer<uint16_t>::FromHost(w.bits));
    ASSERT_OK_AND_ASSIGN(DeviceBuffer<float> dy, DeviceBuffer<float>::FromHost(y));
    ASSERT_OK(MatMul(*blas, dx.data(), m, ldx, {DType::kBF16, dw.data(), n, k, k}, dy.data(), ldy,
                     /*accumulate=*/true));
    ASSERT_OK_AND_ASSIGN(std::vector<float> got, dy.ToHost());
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t c = 0; c < n; ++c) {
        const double before = y[i * ldy + c];
        ExpectClose(got[i * ldy + c], before + product.value[i * n + c], std::fabs(before) + product.scale[i * n + c],
                    kBf16Relative, what, i, c);
      }
      EXPECT_TRUE(std::isnan(got[i * ldy + n])) << what << ": padding written";
    }
  }
}

TEST(CudaGemmTest, MatMulWithF32WeightsStaysF32) {
  SKIP_WITHOUT_GPU();
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Blas> blas, Blas::Create());
  for (int64_t m : {1, 17, 130}) {
    for (int64_t k : {7, 64, 129}) {
      for (int64_t n : {1, 33, 160}) {  // 160: V2's routed experts
        const int64_t ldx = k + 2, ldy = n + 1;
        const std::string what = "F32 MatMul, " + Shape(m, k, n);
        std::vector<float> x = Random(m * ldx, 600 + m * 1000 + k * 10 + n);
        const std::vector<float> w = Random(n * k, 700 + m * 1000 + k * 10 + n);
        PoisonPadding(x, k, ldx, kNaN);
        const Product want = HostProduct(x.data(), m, ldx, w.data(), n, k, k, 1);

        ASSERT_OK_AND_ASSIGN(DeviceBuffer<float> dx, DeviceBuffer<float>::FromHost(x));
        ASSERT_OK_AND_ASSIGN(DeviceBuffer<float> dw, DeviceBuffer<float>::FromHost(w));
        ASSERT_OK_AND_ASSIGN(DeviceBuffer<float> dy, DeviceBuffer<float>::FromHost(std::vector<float>(m * ldy, kNaN)));
        ASSERT_OK(MatMul(*blas, dx.data(), m, ldx, {DType::kF32, dw.data(), n, k, k}, dy.data(), ldy));
        ASSERT_OK_AND_ASSIGN(std::vector<float> got, dy.ToHost());
        for (int64_t i = 0; i < m; ++i) {
          for (int64_t c = 0; c < n; ++c) {
            EXPECT_NEAR(got[i * ldy + c], want.value[i * n + c], kF32Relative * want.scale[i * n + c] + 1e-12)
                << what << ": row " << i << " col " << c;
          }
          EXPECT_TRUE(std::isnan(got[i * ldy + n])) << what << ": padding written";
        }
      }
    }
  }

  // Exact in F32 (every partial sum j (1 + 2^-15), j <= 64, fits 24 bits), while TF32
  // rounds 1 + 2^-15 to 1 and would give 64.
  const int64_t m = 17, k = 64, n = 33;
  const float one_plus = 1.0f + std::ldexp(1.0f, -15);
  ASSERT_OK_AND_ASSIGN(DeviceBuffer<float> dx, DeviceBuffer<float>::FromHost(std::vector<float>(m * k, 1.0f)));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer<float> dw, DeviceBuffer<float>::FromHost(std::vector<float>(n * k, one_plus)));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer<float> dy, DeviceBuffer<float>::FromHost(std::vector<float>(m * n, kNaN)));
  ASSERT_OK(MatMul(*blas, dx.data(), m, k, {DType::kF32, dw.data(), n, k, k}, dy.data(), n));
  ASSERT_OK_AND_ASSIGN(std::vector<float> got, dy.ToHost());
  const float exact = 64.0f + std::ldexp(1.0f, -9);
  for (int64_t i = 0; i < m * n; ++i) ASSERT_EQ(got[i], exact) << "element " << i << ": TF32 rounding?";
}

TEST(CudaGemmTest, MatMulReadsARowRangeOfALargerMatrix) {
  SKIP_WITHOUT_GPU();
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Blas> blas, Blas::Create());
  // [200, 129] with 7 spare values a row (a column block of a wider matrix).
  const int64_t full_rows = 200, k = 129, ld = 136, m = 5, ldx = k + 3;
  const int64_t ranges[][2] = {{0, 1}, {37, 70}, {130, 70}};  // the first row, the middle, the end
  for (DType type : {DType::kBF16, DType::kF32}) {
    const bool bf16 = type == DType::kBF16;
    Bf16Values w = RoundToBf16(Random(full_rows * ld, 800));
    Bf16Values x = RoundToBf16(Random(m * ldx, 801));
    if (!bf16) {  // F32 values that BF16 cannot hold
      w.values = Random(full_rows * ld, 802);
      x.values = Random(m * ldx, 803);
    }
    PoisonPadding(w.bits, k, ld, kBf16NaN);
    PoisonPadding(w.values, k, ld, kNaN);
    PoisonPadding(x.bits, k, ldx, kBf16NaN);
    PoisonPadding(x.values, k, ldx, kNaN);
    DeviceBuffer<uint16_t> dw16, dx16;
    DeviceBuffer<float> dw32, dx32;
    if (bf16) {
      ASSERT_OK_AND_ASSIGN(dw16, DeviceBuffer<uint16_t>::FromHost(w.bits));
      ASSERT_OK_AND_ASSIGN(dx16, DeviceBuffer<uint16_t>::FromHost(x.bits));
    } else {
      ASSERT_OK_AND_ASSIGN(dw32, DeviceBuffer<float>::FromHost(w.values));
      ASSERT_OK_AND_ASSIGN(dx32, DeviceBuffer<float>::FromHost(x.values));
    }
    const void* w_data = bf16 ? static_cast<const void*>(dw16.data()) : dw32.data();
    const void* x_data = bf16 ? static_cast<const void*>(dx16.data()) : dx32.data();
    const DeviceMatrix full{type, w_data, full_rows, k, ld};
    for (const auto& range : ranges) {
      const int64_t begin = range[0], count = range[1], ldy = count + 1;
      const std::string what = std::string(bf16 ? "BF16" : "F32") + " rows [" + std::to_string(begin) + ", +" +
                               std::to_string(count) + ")";
      const DeviceMatrix view = full.Rows(begin, count);
      ASSERT_EQ(view.rows, count);
      const Product want = HostProduct(x.values.data(), m, ldx, w.values.data() + begin * ld, count, k, ld, 1);
      ASSERT_OK_AND_ASSIGN(DeviceBuffer<float> dy, DeviceBuffer<float>::FromHost(std::vector<float>(m * ldy, kNaN)));
      ASSERT_OK(MatMul(*blas, x_data, m, ldx, view, dy.data(), ldy));
      ASSERT_OK_AND_ASSIGN(std::vector<float> got, dy.ToHost());
      for (int64_t i = 0; i < m; ++i) {
        for (int64_t c = 0; c < count; ++c) {
          ExpectClose(got[i * ldy + c], want.value[i * count + c], want.scale[i * count + c],
                      bf16 ? kBf16Relative : kF32Relative, what, i, c);
        }
        EXPECT_TRUE(std::isnan(got[i * ldy + count])) << what << ": padding written";
      }
    }
  }
}

TEST(CudaGemmTest, MatMulOfNoRowsWritesNothing) {
  SKIP_WITHOUT_GPU();
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Blas> blas, Blas::Create());
  const int64_t k = 7, n = 5, m = 3;
  ASSERT_OK_AND_ASSIGN(DeviceBuffer<uint16_t> dx,
                       DeviceBuffer<uint16_t>::FromHost(RoundToBf16(Random(m * k, 900)).bits));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer<uint16_t> dw,
                       DeviceBuffer<uint16_t>::FromHost(RoundToBf16(Random(n * k, 901)).bits));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer<float> dy, DeviceBuffer<float>::FromHost(std::vector<float>(m * n, kNaN)));
  const DeviceMatrix w{DType::kBF16, dw.data(), n, k, k};
  ASSERT_OK(MatMul(*blas, dx.data(), 0, k, w, dy.data(), n));
  ASSERT_OK(MatMul(*blas, dx.data(), 0, k, w, dy.data(), n, /*accumulate=*/true));
  ASSERT_OK(MatMul(*blas, nullptr, 0, k, w, nullptr, n));  // nothing to do: pointers unread
  ASSERT_OK(MatMul(*blas, dx.data(), m, k, w.Rows(2, 0), dy.data(), n));  // no output columns
  ASSERT_OK_AND_ASSIGN(std::vector<float> got, dy.ToHost());
  for (size_t i = 0; i < got.size(); ++i) EXPECT_TRUE(std::isnan(got[i])) << "element " << i << " written";
}

// --- BatchedMatMul as MLA's absorbed form uses it ---------------------------------------

TEST(CudaGemmTest, BatchedMatMulRunsMlaPerHeadProducts) {
  SKIP_WITHOUT_GPU();
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Blas> blas, Blas::Create());
  // kv_b_proj [heads * (nope + vdim), lora]: per head nope rows of W_UK, then vdim of W_UV.
  const int64_t nope = 9, rope = 5, qhd = nope + rope, lora = 33, vdim = 11, kv_head = nope + vdim;
  for (int64_t heads : {3, 16}) {
    const Bf16Values kv = RoundToBf16(Random(heads * kv_head * lora, 1000 + heads));
    ASSERT_OK_AND_ASSIGN(DeviceBuffer<uint16_t> dkv, DeviceBuffer<uint16_t>::FromHost(kv.bits));
    const DeviceMatrix kv_b_proj{DType::kBF16, dkv.data(), heads * kv_head, lora, lora};
    for (int64_t tokens : {1, 5, 17}) {
      const std::string shape = std::to_string(heads) + " heads, " + std::to_string(tokens) + " tokens";

      // Fold, no transpose: q_latent[t, h] = q_nope[t, h] W_UK[h], q [tokens, heads, nope | rope].
      {
        const int64_t ldq = heads * qhd, ldy = heads * lora + 2;
        Bf16Values q = RoundToBf16(Random(tokens * ldq, 1100 + heads * 100 + tokens));
        for (int64_t t = 0; t < tokens; ++t) {  // the rope slices are no part of the product
          for (int64_t h = 0; h < heads; ++h) {
            for (int64_t i = nope; i < qhd; ++i) q.bits[t * ldq + h * qhd + i] = kBf16NaN;
          }
        }
        ASSERT_OK_AND_ASSIGN(DeviceBuffer<uint16_t> dq, DeviceBuffer<uint16_t>::FromHost(q.bits));
        ASSERT_OK_AND_ASSIGN(DeviceBuffer<float> dy,
                             DeviceBuffer<float>::FromHost(std::vector<float>(tokens * ldy, kNaN)));
        ASSERT_OK(FoldQuery(*blas, {kv_b_proj, heads, nope, vdim}, dq.data(), tokens, ldq, qhd, dy.data(), ldy));
        ASSERT_OK_AND_ASSIGN(std::vector<float> got, dy.ToHost());
        const std::string what = "fold through W_UK, " + shape;
        for (int64_t h = 0; h < heads; ++h) {
          const Product want =
              HostProduct(q.values.data() + h * qhd, tokens, ldq, kv.values.data() + h * kv_head * lora, lora, nope,
                          1, lora);
          for (int64_t t = 0; t < tokens; ++t) {
            for (int64_t c = 0; c < lora; ++c) {
              ExpectClose(got[t * ldy + h * lora + c], want.value[t * lora + c], want.scale[t * lora + c],
                          kBf16Relative, what + ", head " + std::to_string(h), t, c);
            }
          }
        }
        for (int64_t t = 0; t < tokens; ++t) {
          for (int64_t c = heads * lora; c < ldy; ++c) EXPECT_TRUE(std::isnan(got[t * ldy + c])) << "padding written";
        }
      }

      // Unfold, transposed: attn[t, h] = o_latent[t, h] W_UV[h]^T.
      {
        const int64_t ldo = heads * lora, ldy = heads * vdim + 1;
        const Bf16Values o = RoundToBf16(Random(tokens * ldo, 1200 + heads * 100 + tokens));
        ASSERT_OK_AND_ASSIGN(DeviceBuffer<uint16_t> dout_latent, DeviceBuffer<uint16_t>::FromHost(o.bits));
        ASSERT_OK_AND_ASSIGN(DeviceBuffer<float> dy,
                             DeviceBuffer<float>::FromHost(std::vector<float>(tokens * ldy, kNaN)));
        ASSERT_OK(UnfoldLatent(*blas, {kv_b_proj, heads, nope, vdim}, dout_latent.data(), tokens, ldo, dy.data(),
                               ldy));
        ASSERT_OK_AND_ASSIGN(std::vector<float> got, dy.ToHost());
        const std::string what = "unfold through W_UV, " + shape;
        for (int64_t h = 0; h < heads; ++h) {
          const Product want = HostProduct(o.values.data() + h * lora, tokens, ldo,
                                           kv.values.data() + (h * kv_head + nope) * lora, vdim, lora, lora, 1);
          for (int64_t t = 0; t < tokens; ++t) {
            for (int64_t c = 0; c < vdim; ++c) {
              ExpectClose(got[t * ldy + h * vdim + c], want.value[t * vdim + c], want.scale[t * vdim + c],
                          kBf16Relative, what + ", head " + std::to_string(h), t, c);
            }
          }
        }
        for (int64_t t = 0; t < tokens; ++t) EXPECT_TRUE(std::isnan(got[t * ldy + heads * vdim])) << "padding written";
      }
    }
  }
}

TEST(CudaGemmTest, MatMulAndBatchedMatMulRefuseBadSizes) {
  SKIP_WITHOUT_GPU();
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Blas> blas, Blas::Create());
  ASSERT_OK_AND_ASSIGN(DeviceBuffer<uint16_t> h, DeviceBuffer<uint16_t>::Allocate(1024));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer<float> f, DeviceBuffer<float>::Allocate(1024));
  auto invalid = [](const Status& s) { return s.code() == StatusCode::kInvalidArgument; };
  const DeviceMatrix w{DType::kBF16, h.data(), 5, 9, 9};  // [5, 9]
  EXPECT_TRUE(invalid(MatMul(*blas, h.data(), -1, 9, w, f.data(), 5)));
  EXPECT_TRUE(invalid(MatMul(*blas, h.data(), 2, 8, w, f.data(), 5)));  // ldx < cols
  EXPECT_TRUE(invalid(MatMul(*blas, h.data(), 2, 9, w, f.data(), 4)));  // ldy < rows
  EXPECT_TRUE(invalid(MatMul(*blas, h.data(), 2, 9, {DType::kBF16, h.data(), 5, 9, 8}, f.data(), 5)));  // ld < cols
  EXPECT_TRUE(invalid(MatMul(*blas, h.data(), int64_t{INT_MAX} + 1, 9, w, f.data(), 5)));  // past cuBLAS's int
  EXPECT_TRUE(invalid(MatMul(*blas, nullptr, 2, 9, w, f.data(), 5)));
  EXPECT_TRUE(invalid(MatMul(*blas, h.data(), 2, 9, {DType::kBF16, nullptr, 5, 9, 9}, f.data(), 5)));
  EXPECT_TRUE(invalid(MatMul(*blas, h.data(), 2, 9, w, nullptr, 5)));

  BatchedMatMulArgs good;
  good.x = h.data();
  good.m = 2;
  good.ldx = 9;
  good.w = w;
  good.transpose_w = true;
  good.y = f.data();
  good.ldy = 5;
  good.batches = 2;
  auto with = [&](auto change) {
    BatchedMatMulArgs a = good;
    change(a);
    return BatchedMatMul(*blas, a);
  };
  EXPECT_TRUE(invalid(with([&](BatchedMatMulArgs& a) { a.w.type = DType::kF32; })));
  EXPECT_TRUE(invalid(with([](BatchedMatMulArgs& a) { a.m = -1; })));
  EXPECT_TRUE(invalid(with([](BatchedMatMulArgs& a) { a.batches = -1; })));
  EXPECT_TRUE(invalid(with([](BatchedMatMulArgs& a) { a.ldx = 8; })));  // transposed: x rows are w's cols
  EXPECT_TRUE(invalid(with([](BatchedMatMulArgs& a) { a.ldy = 4; })));
  EXPECT_TRUE(invalid(with([](BatchedMatMulArgs& a) { a.w.ld = 8; })));
  EXPECT_TRUE(invalid(with([](BatchedMatMulArgs& a) { a.x = nullptr; })));
  EXPECT_TRUE(invalid(with([](BatchedMatMulArgs& a) { a.y = nullptr; })));
  // Without the transpose x rows are w.rows long and y rows w.cols.
  EXPECT_TRUE(invalid(with([](BatchedMatMulArgs& a) {
    a.transpose_w = false;
    a.ldx = 4;
    a.ldy = 9;
  })));
  EXPECT_TRUE(invalid(with([](BatchedMatMulArgs& a) {
    a.transpose_w = false;
    a.ldx = 5;
    a.ldy = 8;
  })));
  ASSERT_OK(with([](BatchedMatMulArgs& a) {
    a.transpose_w = false;
    a.ldx = 5;
    a.ldy = 9;
    a.x_stride = 0;
    a.y_stride = 9 * 2;
  }));
  // Nothing to do is fine even with null pointers: nothing is launched.
  ASSERT_OK(with([](BatchedMatMulArgs& a) {
    a.m = 0;
    a.x = nullptr;
    a.y = nullptr;
  }));
  ASSERT_OK(with([](BatchedMatMulArgs& a) {
    a.batches = 0;
    a.x = nullptr;
    a.y = nullptr;
  }));
}

// --- BF16 conversions ------------------------------------------------------------------

// F32 values whose rounding to BF16 is easy to get wrong, as bits.
const uint32_t kRoundingCases[] = {
    0x00000000u, 0x80000000u,  // +-0
    0x7f800000u, 0xff800000u,  // +-inf
    0x3f808000u,               // 1 + half a BF16 ulp: a tie, to the even 1
    0x3f818000u,               // a tie whose lower neighbour is odd: up
    0x3f808001u,               // just above a tie: up
    0xbf818000u,               // a negative tie: away from zero to the even value
    0x7f7f8000u,               // a tie at the largest finite BF16: up to infinity
    0x7f7fffffu,               // FLT_MAX: infinity
    0x7f7f7fffu,               // just below that tie: the largest finite BF16
    0x00000001u,               // the smallest subnormal: zero
    0x00008000u,               // a subnormal tie: to the even zero
    0x00018000u,               // a subnormal tie with an odd lower neighbour: up
    0x807fffffu,               // the largest negative subnormal: up to -FLT_MIN
    0x00800000u,               // FLT_MIN
};

TEST(CudaGemmTest, ToBf16RoundsAsTheHostDoesBitForBit) {
  SKIP_WITHOUT_GPU();
  for (int64_t rows : {0, 1, 3, 17}) {
    for (int64_t n : {1, 7, 129, 576}) {
      const int64_t ldx = n + 3, ldo = n + 2;
      std::vector<float> x = RandomBits(rows * ldx, 1300 + rows * 1000 + n);
      // The hard cases first, then also plain activations.
      for (size_t i = 0; i < std::size(kRoundingCases) && i < x.size(); ++i) x[i] = FromBits(kRoundingCases[i]);
      const std::vector<float> plain = Random(x.size(), 1400 + n);
      for (size_t i = std::size(kRoundingCases); i < x.size(); i += 2) x[i] = plain[i];
      ASSERT_OK_AND_ASSIGN(DeviceBuffer<float> dx, DeviceBuffer<float>::FromHost(x));
      ASSERT_OK_AND_ASSIGN(DeviceBuffer<uint16_t> dout,
                           DeviceBuffer<uint16_t>::FromHost(std::vector<uint16_t>(rows * ldo, kBf16Poison)));
      ASSERT_OK(ToBf16(dx.data(), rows, n, ldx, dout.data(), ldo));
      ASSERT_OK_AND_ASSIGN(std::vector<uint16_t> got, dout.ToHost());
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t i = 0; i < n; ++i) {
          const float v = x[r * ldx + i];
          uint32_t bits;
          std::memcpy(&bits, &v, sizeof bits);
          EXPECT_EQ(got[r * ldo + i], FloatToBf16(v))
              << "row " << r << " col " << i << ": F32 bits 0x" << std::hex << bits;
        }
        for (int64_t i = n; i < ldo; ++i) EXPECT_EQ(got[r * ldo + i], kBf16Poison) << "padding written";
      }
    }
  }
}

TEST(CudaGemmTest, ToBf16KeepsNaNsNaN) {
  SKIP_WITHOUT_GPU();
  // The device may return its canonical NaN rather than the host's payload: only NaN-ness counts.
  const std::vector<float> x = {kNaN, -kNaN, FromBits(0x7f800001u), FromBits(0xffbfffffu), 1.0f};
  ASSERT_OK_AND_ASSIGN(DeviceBuffer<float> dx, DeviceBuffer<float>::FromHost(x));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer<uint16_t> dout, DeviceBuffer<uint16_t>::FromHost(std::vector<uint16_t>(5, 0)));
  ASSERT_OK(ToBf16(dx.data(), 1, 5, 5, dout.data(), 5));
  ASSERT_OK_AND_ASSIGN(std::vector<uint16_t> got, dout.ToHost());
  for (int i = 0; i < 4; ++i) EXPECT_TRUE(IsBf16NaN(got[i])) << "element " << i << ": 0x" << std::hex << got[i];
  EXPECT_EQ(got[4], FloatToBf16(1.0f));
}

TEST(CudaGemmTest, GatherRowsToBf16StopsAtTheDeviceCount) {
  SKIP_WITHOUT_GPU();
  const int64_t source_rows = 41, max_rows = 23;
  std::mt19937_64 rng(1500);
  // nullopt: no count, every one of max_rows; 30: more than max_rows, which still bounds.
  const std::optional<int32_t> counts[] = {std::nullopt, 0, 1, 9, 23, 30};
  for (int64_t n : {1, 7, 129, 576}) {
    const int64_t ldx = n + 1, ldo = n + 3;
    std::vector<float> x = RandomBits(source_rows * ldx, 1600 + n);
    for (size_t i = 0; i < std::size(kRoundingCases); ++i) x[i * ldx % x.size()] = FromBits(kRoundingCases[i]);
    ASSERT_OK_AND_ASSIGN(DeviceBuffer<float> dx, DeviceBuffer<float>::FromHost(x));
    for (const std::optional<int32_t>& count : counts) {
      const int64_t filled = count.has_value() ? std::min<int64_t>(*count, max_rows) : max_rows;
      const std::string what = "width " + std::to_string(n) + ", count " +
                               (count.has_value() ? std::to_string(*count) : std::string("none"));
      std::vector<int32_t> rows(max_rows);
      for (int32_t& r : rows) r = static_cast<int32_t>(rng() % source_rows);
      rows[0] = static_cast<int32_t>(source_rows - 1);  // both ends of x
      rows[max_rows - 1] = 0;
      // Past the count the row numbers are stale (as PermuteByExpert leaves them): far
      // outside x, so that reading one faults.
      for (int64_t r = filled; r < max_rows; ++r) rows[r] = 1 << 30;
      ASSERT_OK_AND_ASSIGN(DeviceBuffer<int32_t> drows, DeviceBuffer<int32_t>::FromHost(rows));
      ASSERT_OK_AND_ASSIGN(DeviceBuffer<int32_t> dcount, DeviceBuffer<int32_t>::FromHost({count.value_or(0)}));
      ASSERT_OK_AND_ASSIGN(DeviceBuffer<uint16_t> dout,
                           DeviceBuffer<uint16_t>::FromHost(std::vector<uint16_t>(max_rows * ldo, kBf16Poison)));
      ASSERT_OK(GatherRowsToBf16(dx.data(), ldx, n, drows.data(), count.has_value() ? dcount.data() : nullptr,
                                 max_rows, dout.data(), ldo));
      ASSERT_OK_AND_ASSIGN(std::vector<uint16_t> got, dout.ToHost());
      for (int64_t r = 0; r < max_rows; ++r) {
        for (int64_t i = 0; i < ldo; ++i) {
          if (r < filled && i < n) {
            EXPECT_EQ(got[r * ldo + i], FloatToBf16(x[rows[r] * ldx + i])) << what << ": row " << r << " col " << i;
          } else {
            EXPECT_EQ(got[r * ldo + i], kBf16Poison) << what << ": row " << r << " col " << i << " written";
          }
        }
      }
    }
  }
}

// --- GroupedMatMul ----------------------------------------------------------------------

struct GroupedCase {
  std::string name;
  std::vector<int32_t> counts;  // rows per expert
  int64_t n = 0;
  int64_t k = 0;
  int64_t ldx_pad = 0;
  int64_t ld_pad = 0;
  int64_t ldy_pad = 0;
  int64_t spare_rows = 0;  // rows past offsets[experts]: never written
  int64_t x_offset = 0;    // elements: 4 leaves x only 8-byte aligned
};

// A grouped product's inputs on the host, padding columns poisoned.
struct GroupedProblem {
  std::vector<int32_t> offsets;  // [experts + 1]
  int64_t max_rows = 0, n = 0, k = 0, ldx = 0, ld = 0, ldy = 0, x_offset = 0;
  Bf16Values x;               // [max_rows, ldx]
  std::vector<Bf16Values> w;  // per expert [n, ld]
};

GroupedProblem MakeGroupedProblem(const GroupedCase& c, uint64_t seed) {
  GroupedProblem p;
  p.offsets.assign(1, 0);
  for (int32_t count : c.counts) p.offsets.push_back(p.offsets.back() + count);
  const int64_t routed = p.offsets.back();
  p.max_rows = routed + c.spare_rows;
  p.n = c.n;
  p.k = c.k;
  p.ldx = c.k + c.ldx_pad;
  p.ld = c.k + c.ld_pad;
  p.ldy = c.n + c.ldy_pad;
  p.x_offset = c.x_offset;
  p.x = RoundToBf16(Random(p.max_rows * p.ldx, seed));
  // The spare rows keep finite values: a tile written past its expert's end would put
  // numbers, not NaN, into y's spare rows.
  PoisonPadding(p.x.bits, p.k, p.ldx, kBf16NaN);
  for (size_t e = 0; e < c.counts.size(); ++e) {
    p.w.push_back(RoundToBf16(Random(p.n * p.ld, seed + 1 + e)));
    PoisonPadding(p.w.back().bits, p.k, p.ld, kBf16NaN);
  }
  return p;
}

// y [max_rows, ldy], poisoned with NaN before the product. Each expert's weights are a
// buffer of their own, as the model holds them.
StatusOr<std::vector<float>> RunGrouped(const GroupedProblem& p) {
  const int64_t experts = static_cast<int64_t>(p.w.size());
  std::vector<uint16_t> x(p.x_offset, kBf16NaN);
  x.insert(x.end(), p.x.bits.begin(), p.x.bits.end());
  EPIC_ASSIGN_OR_RETURN(DeviceBuffer<uint16_t> dx, DeviceBuffer<uint16_t>::FromHost(x));
  std::vector<DeviceBuffer<uint16_t>> dw(experts);
  std::vector<const uint16_t*> pointers(experts);
  for (int64_t e = 0; e < experts; ++e) {
    EPIC_ASSIGN_OR_RETURN(dw[e], DeviceBuffer<uint16_t>::FromHost(p.w[e].bits));
    pointers[e] = dw[e].data();
  }
  EPIC_ASSIGN_OR_RETURN(DeviceBuffer<const uint16_t*> dpointers, DeviceBuffer<const uint16_t*>::FromHost(pointers));
  EPIC_ASSIGN_OR_RETURN(DeviceBuffer<int32_t> doffsets, DeviceBuffer<int32_t>::FromHost(p.offsets));
  EPIC_ASSIGN_OR_RETURN(DeviceBuffer<float> dy,
                        DeviceBuffer<float>::FromHost(std::vector<float>(p.max_rows * p.ldy, kNaN)));
  const int64_t scratch_count = GroupedScratchCount(p.max_rows, experts);
  EPIC_ASSIGN_OR_RETURN(DeviceBuffer<int32_t> scratch,
                        DeviceBuffer<int32_t>::FromHost(std::vector<int32_t>(scratch_count, -7)));
  const GroupedWeights w{dpointers.data(), experts, p.n, p.k, p.ld};
  EPIC_RETURN_IF_ERROR(GroupedMatMul(dx.data() + p.x_offset, p.max_rows, p.ldx, doffsets.data(), w, dy.data(), p.ldy,
                                     scratch.data(), scratch_count));
  return dy.ToHost();
}

void ExpectGroupedMatchesHost(const GroupedProblem& p, const std::vector<float>& got, const std::string& what) {
  const int64_t experts = static_cast<int64_t>(p.w.size());
  for (int64_t e = 0; e < experts; ++e) {
    const int64_t begin = p.offsets[e], rows = p.offsets[e + 1] - begin;
    const Product want = HostProduct(p.x.values.data() + begin * p.ldx, rows, p.ldx, p.w[e].values.data(), p.n, p.k,
                                     p.ld, 1);
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t r = begin + i;
      for (int64_t c = 0; c < p.n; ++c) {
        ExpectClose(got[r * p.ldy + c], want.value[i * p.n + c], want.scale[i * p.n + c], kBf16Relative,
                    what + ", expert " + std::to_string(e), r, c);
      }
      for (int64_t c = p.n; c < p.ldy; ++c) EXPECT_TRUE(std::isnan(got[r * p.ldy + c])) << what << ": padding written";
    }
  }
  for (int64_t r = p.offsets[experts]; r < p.max_rows; ++r) {
    for (int64_t c = 0; c < p.ldy; ++c) {
      EXPECT_TRUE(std::isnan(got[r * p.ldy + c])) << what << ": row " << r << " past the routed ones written";
    }
  }
}

std::vector<GroupedCase> GroupedCases() {
  std::mt19937_64 rng(1700);
  std::vector<int32_t> random_counts(16);
  for (int32_t& c : random_counts) c = static_cast<int32_t>(rng() % 4 == 0 ? 0 : rng() % 90);
  random_counts[0] = 0;
  random_counts[15] = 0;
  std::vector<int32_t> all_to_last(15, 0);
  all_to_last.push_back(200);
  return {
      // Empty experts first, in the middle and last; one of 130 rows (three row tiles)
      // and 70 output columns (two column tiles).
      {"16-byte loads", {0, 3, 0, 130, 1, 0}, 70, 64, 0, 0, 0, 5, 0},
      {"odd k, element loads", {0, 3, 0, 130, 1, 0}, 70, 37, 0, 0, 0, 5, 0},
      // k = 200 ends in a partial 32-wide stage; padded strides that keep 16-byte loads.
      {"partial k stage, padded strides", {5, 0, 64, 65}, 129, 200, 8, 16, 3, 7, 0},
      {"k a multiple of 8, odd ldx", {2, 70, 0}, 33, 64, 3, 0, 1, 2, 0},
      {"k a multiple of 8, x 8-byte aligned", {2, 70, 0}, 33, 64, 0, 0, 0, 2, 4},
      {"one row, one column", {1}, 1, 8, 0, 0, 0, 0, 0},
      {"every row to the last of 16 experts", all_to_last, 70, 40, 0, 0, 2, 3, 0},
      {"random counts over 16 experts", random_counts, 70, 64, 0, 0, 0, 11, 0},
      {"no rows routed", {0, 0, 0}, 70, 64, 0, 0, 0, 4, 0},
  };
}

TEST(CudaGemmTest, GroupedMatMulMatchesAFloat64LoopPerExpert) {
  SKIP_WITHOUT_GPU();
  uint64_t seed = 1800;
  for (const GroupedCase& c : GroupedCases()) {
    const GroupedProblem p = MakeGroupedProblem(c, seed);
    seed += 100;
    ASSERT_OK_AND_ASSIGN(std::vector<float> got, RunGrouped(p));
    ExpectGroupedMatchesHost(p, got, c.name);
  }
}

TEST(CudaGemmTest, GroupedMatMulIsDeterministic) {
  SKIP_WITHOUT_GPU();
  for (const GroupedCase& c : GroupedCases()) {
    const GroupedProblem p = MakeGroupedProblem(c, 1900);
    ASSERT_OK_AND_ASSIGN(std::vector<float> first, RunGrouped(p));
    ASSERT_OK_AND_ASSIGN(std::vector<float> second, RunGrouped(p));
    ASSERT_EQ(first.size(), second.size());
    EXPECT_EQ(std::memcmp(first.data(), second.data(), first.size() * sizeof(float)), 0) << c.name;
  }
}

// --- Checks that return before any device work: these run without a GPU -------------------

TEST(CudaGemmTest, GroupedScratchCountHoldsEveryTiling) {
  // TileMapKernel stores sum_e ceil(rows_e / 64) tiles after the count: (count - 1) / 2 of them fit.
  auto tiles = [](const std::vector<int64_t>& counts) {
    int64_t t = 0;
    for (int64_t c : counts) t += (c + 63) / 64;
    return t;
  };
  std::mt19937_64 rng(2000);
  const int64_t scales[] = {1, 63, 64, 65, 200, 5000};
  for (int trial = 0; trial < 2000; ++trial) {
    const int64_t experts = 1 + static_cast<int64_t>(rng() % 300);
    const int64_t scale = scales[rng() % std::size(scales)];
    std::vector<int64_t> counts(experts);
    int64_t rows = 0;
    for (int64_t& c : counts) {
      c = rng() % 3 == 0 ? 0 : static_cast<int64_t>(rng() % (scale + 1));
      rows += c;
    }
    const int64_t max_rows = rows + static_cast<int64_t>(rng() % 3);
    const int64_t count = GroupedScratchCount(max_rows, experts);
    EXPECT_LE(tiles(counts), (count - 1) / 2) << experts << " experts, " << rows << " rows";
  }
  // The worst cases: every expert one row past a whole tile, or just short of two.
  for (int64_t experts : {1, 2, 7, 64, 256}) {
    for (int64_t per_expert : {1, 63, 64, 65, 127, 128, 129}) {
      const std::vector<int64_t> counts(experts, per_expert);
      const int64_t count = GroupedScratchCount(experts * per_expert, experts);
      EXPECT_LE(tiles(counts), (count - 1) / 2) << experts << " experts of " << per_expert << " rows";
    }
    EXPECT_GE(GroupedScratchCount(0, experts), 1) << "room for the tile count";
  }
}

TEST(CudaGemmTest, DeviceMatrixRowsOffsetsByWholeRows) {
  static char storage[100 * 9 * 4];  // stands in for device memory: only addresses are taken
  auto offset = [](const DeviceMatrix& m) { return static_cast<const char*>(m.data) - storage; };
  const DeviceMatrix bf16{DType::kBF16, storage, 100, 7, 9};
  const DeviceMatrix view = bf16.Rows(3, 20);
  EXPECT_EQ(offset(view), 3 * 9 * 2);
  EXPECT_EQ(view.type, DType::kBF16);
  EXPECT_EQ(view.rows, 20);
  EXPECT_EQ(view.cols, 7);
  EXPECT_EQ(view.ld, 9);
  const DeviceMatrix f32{DType::kF32, storage, 100, 7, 9};
  EXPECT_EQ(offset(f32.Rows(5, 1)), 5 * 9 * 4);
  EXPECT_EQ(offset(f32.Rows(0, 100)), 0);
  EXPECT_EQ(offset(f32.Rows(2, 3).Rows(4, 1)), 6 * 9 * 4);
}

TEST(CudaGemmTest, ConversionAndGroupedSizeChecksComeBeforeTheDevice) {
  // Host arrays stand in for device pointers: every call here must return before using them.
  float f[1] = {};
  uint16_t h[1] = {};
  int32_t i[1] = {};
  const uint16_t* experts[1] = {h};
  auto invalid = [](const Status& s) { return s.code() == StatusCode::kInvalidArgument; };

  EXPECT_TRUE(invalid(ToBf16(f, -1, 4, 4, h, 4)));
  EXPECT_TRUE(invalid(ToBf16(f, 2, -1, 4, h, 4)));
  EXPECT_TRUE(invalid(ToBf16(f, 2, 4, 3, h, 4)));  // ldx < n
  EXPECT_TRUE(invalid(ToBf16(f, 2, 4, 4, h, 3)));  // ldo < n
  EXPECT_TRUE(invalid(ToBf16(nullptr, 2, 4, 4, h, 4)));
  EXPECT_TRUE(invalid(ToBf16(f, 2, 4, 4, nullptr, 4)));
  ASSERT_OK(ToBf16(nullptr, 0, 4, 4, nullptr, 4));
  ASSERT_OK(ToBf16(nullptr, 2, 0, 0, nullptr, 0));

  EXPECT_TRUE(invalid(GatherRowsToBf16(f, 4, 4, i, i, -1, h, 4)));
  EXPECT_TRUE(invalid(GatherRowsToBf16(f, 4, 4, i, i, int64_t{INT_MAX} + 1, h, 4)));  // past one grid
  EXPECT_TRUE(invalid(GatherRowsToBf16(f, 4, -1, i, i, 2, h, 4)));
  EXPECT_TRUE(invalid(GatherRowsToBf16(f, 3, 4, i, i, 2, h, 4)));  // ldx < n
  EXPECT_TRUE(invalid(GatherRowsToBf16(f, 4, 4, i, i, 2, h, 3)));  // ldo < n
  EXPECT_TRUE(invalid(GatherRowsToBf16(nullptr, 4, 4, i, i, 2, h, 4)));
  EXPECT_TRUE(invalid(GatherRowsToBf16(f, 4, 4, nullptr, i, 2, h, 4)));
  EXPECT_TRUE(invalid(GatherRowsToBf16(f, 4, 4, i, i, 2, nullptr, 4)));
  ASSERT_OK(GatherRowsToBf16(nullptr, 4, 4, nullptr, nullptr, 0, nullptr, 4));
  ASSERT_OK(GatherRowsToBf16(nullptr, 0, 0, nullptr, nullptr, 2, nullptr, 0));

  const GroupedWeights w{experts, 1, 70, 37, 37};
  const int64_t rows = 130, enough = GroupedScratchCount(rows, 1);
  auto grouped = [&](const GroupedWeights& weights, int64_t max_rows, int64_t ldx, int64_t ldy, int64_t scratch) {
    return GroupedMatMul(h, max_rows, ldx, i, weights, f, ldy, i, scratch);
  };
  EXPECT_TRUE(invalid(grouped(w, -1, 37, 70, enough)));
  EXPECT_TRUE(invalid(grouped({experts, 0, 70, 37, 37}, rows, 37, 70, enough)));  // no experts
  EXPECT_TRUE(invalid(grouped({experts, 1, -1, 37, 37}, rows, 37, 70, enough)));
  EXPECT_TRUE(invalid(grouped({experts, 1, 70, -1, 37}, rows, 37, 70, enough)));
  EXPECT_TRUE(invalid(grouped(w, rows, 36, 70, enough)));                         // ldx < k
  EXPECT_TRUE(invalid(grouped({experts, 1, 70, 37, 36}, rows, 37, 70, enough)));  // ld < k
  EXPECT_TRUE(invalid(grouped(w, rows, 37, 69, enough)));                         // ldy < n
  const Status short_scratch = grouped(w, rows, 37, 70, enough - 1);
  EXPECT_TRUE(invalid(short_scratch)) << short_scratch.ToString();
  EXPECT_NE(short_scratch.message().find("needs " + std::to_string(enough)), std::string::npos)
      << short_scratch.message();
  // Even with nothing to do the scratch must hold the tile count.
  EXPECT_TRUE(invalid(grouped(w, 0, 37, 70, GroupedScratchCount(0, 1) - 1)));
  EXPECT_TRUE(invalid(GroupedMatMul(nullptr, rows, 37, i, w, f, 70, i, enough)));
  EXPECT_TRUE(invalid(GroupedMatMul(h, rows, 37, nullptr, w, f, 70, i, enough)));
  EXPECT_TRUE(invalid(GroupedMatMul(h, rows, 37, i, {nullptr, 1, 70, 37, 37}, f, 70, i, enough)));
  EXPECT_TRUE(invalid(GroupedMatMul(h, rows, 37, i, w, nullptr, 70, i, enough)));
  EXPECT_TRUE(invalid(GroupedMatMul(h, rows, 37, i, w, f, 70, nullptr, enough)));
  // More row tiles than one grid's y dimension (65535) holds.
  const int64_t huge = int64_t{64} * 70000;
  EXPECT_TRUE(invalid(grouped(w, huge, 37, 70, GroupedScratchCount(huge, 1))));
  // Nothing to do is fine even with null pointers: nothing is launched.
  ASSERT_OK(GroupedMatMul(nullptr, 0, 37, nullptr, {nullptr, 1, 70, 37, 37}, nullptr, 70, nullptr,
                          GroupedScratchCount(0, 1)));
  ASSERT_OK(GroupedMatMul(nullptr, rows, 37, nullptr, {nullptr, 1, 0, 37, 37}, nullptr, 0, nullptr, enough));
}

TEST(CudaGemmTest, BlasCreateNeedsAGpu) {
  // Runs everywhere: with a GPU the handle is made, without one the error says why.
  const bool have_gpu = DeviceCount().ok();
  const StatusOr<std::unique_ptr<Blas>> blas = Blas::Create();
  if (have_gpu) {
    ASSERT_TRUE(blas.ok()) << blas.status().ToString();
    EXPECT_NE(blas.value()->handle(), nullptr);
  } else {
    ASSERT_FALSE(blas.ok());
    EXPECT_EQ(blas.status().code(), StatusCode::kFailedPrecondition) << blas.status().ToString();
  }
}

}  // namespace
}  // namespace epic::cuda
