// The CUDA row kernels against their CPU counterparts on random inputs of odd sizes.
// Outputs are poisoned with NaN first, so a value the kernel never wrote shows. On a
// machine without a GPU every device test reports SKIPPED, never passed.
#include "kernels/cuda/ops.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "common/half.h"
#include "kernels/cpu/ops.h"
#include "kernels/cuda/buffer.h"
#include "kernels/cuda/device.h"
#include "tests/kernels/cuda_test_util.h"
#include "tests/testing/random_values.h"
#include "worker/model_config.h"
#include "worker/rope.h"
#include "worker/sampler.h"

namespace epic::cuda {
namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
// F32 element-wise results may differ from the CPU's by a few ulps (CUDA's expf and
// sincos, a different summation order in double): 1e-5 relative is far above that and
// far below any real mistake. The absolute floor only matters for results that cancel
// to almost zero, where a last-bit difference in double is a large relative one.
constexpr double kRelative = 1e-5;
constexpr double kAbsoluteFloor = 1e-12;

const int64_t kRows[] = {0, 1, 3, 17};
const int64_t kWidths[] = {1, 7, 129, 576};

using epic::testing::Random;

void ExpectRelative(float got, float want, const char* what, int64_t row, int64_t col) {
  const double tolerance = std::max(kRelative * std::fabs(static_cast<double>(want)), kAbsoluteFloor);
  EXPECT_NEAR(got, want, tolerance) << what << " row " << row << " col " << col;
}

template <typename T>
StatusOr<std::vector<T>> RoundTrip(const std::vector<T>& host) {
  EPIC_ASSIGN_OR_RETURN(DeviceBuffer<T> device, DeviceBuffer<T>::FromHost(host));
  return device.ToHost();
}

TEST(CudaOpsTest, DeviceBufferRoundTripsAndChecksSizes) {
  SKIP_WITHOUT_GPU();
  const std::vector<float> values = Random(1001, 1);
  ASSERT_OK_AND_ASSIGN(std::vector<float> back, RoundTrip(values));
  EXPECT_EQ(back, values);

  ASSERT_OK_AND_ASSIGN(DeviceBuffer<int32_t> empty, DeviceBuffer<int32_t>::Allocate(0));
  EXPECT_EQ(empty.size(), 0);
  ASSERT_OK(empty.CopyFromHost(nullptr, 0));

  ASSERT_OK_AND_ASSIGN(DeviceBuffer<int32_t> small, DeviceBuffer<int32_t>::Allocate(3));
  const int32_t four[4] = {1, 2, 3, 4};
  const Status too_many = small.CopyFromHost(four, 4);
  EXPECT_EQ(too_many.code(), StatusCode::kInvalidArgument) << too_many.ToString();
  EXPECT_NE(too_many.message().find("16 bytes"), std::string::npos) << too_many.message();

  // Far more than any GPU holds: the failure names the size and the CUDA error.
  const StatusOr<DeviceMemory> huge = DeviceMemory::Allocate(size_t{1} << 60);
  ASSERT_FALSE(huge.ok());
  EXPECT_EQ(huge.status().code(), StatusCode::kResourceExhausted) << huge.status().ToString();
  EXPECT_NE(huge.status().message().find(std::to_string(size_t{1} << 60) + " bytes"), std::string::npos)
      << huge.status().message();
}

TEST(CudaOpsTest, RmsNormMatchesCpu) {
  SKIP_WITHOUT_GPU();
  for (int64_t rows : kRows) {
    for (int64_t n : kWidths) {
      const int64_t ldx = n + 3, ldo = n + 2;  // padding that must stay untouched
      const std::vector<float> x = Random(rows * ldx, 10 + n), w = Random(n, 20 + n);
      std::vector<float> want(rows * ldo, kNaN);
      cpu::RmsNorm(x.data(), rows, n, ldx, w.data(), 1e-6f, want.data(), ldo);

      ASSERT_OK_AND_ASSIGN(DeviceBuffer<float> dx, DeviceBuffer<float>::FromHost(x));
      ASSERT_OK_AND_ASSIGN(DeviceBuffer<float> dw, DeviceBuffer<float>::FromHost(w));
      ASSERT_OK_AND_ASSIGN(DeviceBuffer<float> dout, DeviceBuffer<float>::FromHost(std::vector<float>(rows * ldo, kNaN)));
      ASSERT_OK(RmsNorm(dx.data(), rows, n, ldx, dw.data(), 1e-6f, dout.data(), ldo));
      ASSERT_OK_AND_ASSIGN(std::vector<float> got, dout.ToHost());
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t i = 0; i < n; ++i) ExpectRelative(got[r * ldo + i], want[r * ldo + i], "RmsNorm", r, i);
        for (int64_t i = n; i < ldo; ++i) EXPECT_TRUE(std::isnan(got[r * ldo + i])) << "padding written";
      }
    }
  }
}

TEST(CudaOpsTest, RmsNormInPlaceOverPartOfTheLatentRow) {
  SKIP_WITHOUT_GPU();
  // The latent row [c_kv | k_pe] is normalised only over c_kv, in place.
  const int64_t rows = 5, lora = 129, width = lora + 64;
  const std::vector<float> x = Random(rows * width, 30), w = Random(lora, 31);
  std::vector<float> want = x;
  cpu::RmsNorm(want.data(), rows, lora, width, w.data(), 1e-6f, want.data(), width);
  ASSERT_OK_AND_ASSIGN(DeviceBuffer<float> dx, DeviceBuffer<float>::FromHost(x));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer<float> dw, DeviceBuffer<float>::FromHost(w));
  ASSERT_OK(RmsNorm(dx.data(), rows, lora, width, dw.data(), 1e-6f, dx.data(), width));
  ASSERT_OK_AND_ASSIGN(std::vector<float> got, dx.ToHost());
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < lora; ++i) ExpectRelative(got[r * width + i], want[r * width + i], "RmsNorm", r, i);
    for (int64_t i = lora; i < width; ++i) EXPECT_EQ(got[r * width + i], x[r * width + i]) << "k_pe changed";
  }
}

// DeepSeek-V2's YaRN settings, with mscale != mscale_all_dim so that the scale is not 1.
RopeTable YarnTable(int64_t rope_dim) {
  ModelConfig config;
  config.qk_rope_head_dim = rope_dim;
  config.rope_theta = 10000.0;
  config.rope_scaling.type = RopeScaling::Type::kYarn;
  config.rope_scaling.factor = 40.0;
  config.rope_scaling.original_max_position_embeddings = 4096;
  config.rope_scaling.beta_fast = 32.0;
  config.rope_scaling.beta_slow = 1.0;
  config.rope_scaling.mscale = 1.0;
  config.rope_scaling.mscale_all_dim = 0.0;
  return MakeRopeTable(config);
}

TEST(CudaOpsTest, RopeMatchesCpuOnQueryHeadsAndLatent) {
  SKIP_WITHOUT_GPU();
  const int64_t nope = 7, rope = 64, heads = 3, qhd = nope + rope;
  const RopeTable table = YarnTable(rope);
  ASSERT_NE(table.mscale, 1.0);
  ASSERT_OK_AND_ASSIGN(RopeFrequencies freq, RopeFrequencies::FromHost(table.inv_freq, table.mscale));
  ASSERT_EQ(freq.pairs(), rope / 2);
  std::mt19937_64 rng(40);
  for (int64_t tokens : kRows) {
    std::vector<int64_t> positions(tokens);
    for (int64_t& p : positions) p = static_cast<int64_t>(rng() % 163840);  // up to V2's 160K context
    if (tokens > 0) positions[0] = 163839;
    ASSERT_OK_AND_ASSIGN(DeviceBuffer<int64_t> dpos, DeviceBuffer<int64_t>::FromHost(positions));

    // q: [tokens, heads, nope | rope], with one spare value a row.
    const int64_t ldq = heads * qhd + 1;
    const std::vector<float> q = Random(tokens * ldq, 41 + tokens);
    std::vector<float> want_q = q;
    // latent: [tokens, lora | rope] with an odd lora, so the rope part is not 8-byte aligned.
    const int64_t lora = 129, width = lora + rope;
    const std::vector<float> latent = Random(tokens * width, 42 + tokens);
    std::vector<float> want_latent = latent;
    for (int64_t t = 0; t < tokens; ++t) {
      for (int64_t h = 0; h < heads; ++h) {
        cpu::ApplyRope(want_q.data() + t * ldq + h * qhd + nope, positions[t], table.inv_freq.data(), rope / 2,
                       table.mscale);
      }
      cpu::ApplyRope(want_latent.data() + t * width + lora, positions[t], table.inv_freq.data(), rope / 2,
                     table.mscale);
    }

    ASSERT_OK_AND_ASSIGN(DeviceBuffer<float> dq, DeviceBuffer<float>::FromHost(q));
    ASSERT_OK_AND_ASSIGN(DeviceBuffer<float> dlatent, DeviceBuffer<float>::FromHost(latent));
    ASSERT_OK(ApplyRope({dq.data(), tokens, ldq, nope, heads, qhd}, dpos.data(), freq));
    ASSERT_OK(ApplyRope({dlatent.data(), tokens, width, lora, 1, 0}, dpos.data(), freq));
    ASSERT_OK_AND_ASSIGN(std::vector<float> got_q, dq.ToHost());
    ASSERT_OK_AND_ASSIGN(std::vector<float> got_latent, dlatent.ToHost());
    for (int64_t t = 0; t < tokens; ++t) {
      for (int64_t i = 0; i < ldq; ++i) {
        const int64_t in_head = i % qhd;
        if (i < heads * qhd && in_head >= nope) {
          ExpectRelative(got_q[t * ldq + i], want_q[t * ldq + i], "RoPE q", t, i);
        } else {
          EXPECT_EQ(got_q[t * ldq + i], q[t * ldq + i]) << "q outside the rope slices changed at " << t << ", " << i;
        }
      }
      for (int64_t i = 0; i < width; ++i) {
        if (i >= lora) {
          ExpectRelative(got_latent[t * width + i], want_latent[t * width + i], "RoPE k_pe", t, i);
        } else {
          EXPECT_EQ(got_latent[t * width + i], latent[t * width + i]) << "c_kv changed at " << t << ", " << i;
        }
      }
    }
  }
}

TEST(CudaOpsTest, SiluMulMatchesCpuOnAFusedGateUpBlock) {
  SKIP_WITHOUT_GPU();
  for (int64_t rows : kRows) {
    for (int64_t n : kWidths) {
      // [rows, gate | up | spare]: gate and up share one row stride, as in a fused projection.
      const int64_t ld = 2 * n + 1, ldo = n + 2;
      const std::vector<float> gate_up = Random(rows * ld, 50 + n, -12.0f, 12.0f);
      std::vector<float> want(rows * ldo, kNaN);
      for (int64_t r = 0; r < rows; ++r) {
        cpu::SiluMul(gate_up.data() + r * ld, gate_up.data() + r * ld + n, n, want.data() + r * ldo);
      }
      ASSERT_OK_AND_ASSIGN(DeviceBuffer<float> din, DeviceBuffer<float>::FromHost(gate_up));
      ASSERT_OK_AND_ASSIGN(DeviceBuffer<float> dout, DeviceBuffer<float>::FromHost(std::vector<float>(rows * ldo, kNaN)));
      ASSERT_OK(SiluMul(din.data(), din.data() + n, rows, n, ld, dout.data(), ldo));
      ASSERT_OK_AND_ASSIGN(std::vector<float> got, dout.ToHost());
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t i = 0; i < n; ++i) ExpectRelative(got[r * ldo + i], want[r * ldo + i], "SiluMul", r, i);
        for (int64_t i = n; i < ldo; ++i) EXPECT_TRUE(std::isnan(got[r * ldo + i])) << "padding written";
      }
    }
  }
}

TEST(CudaOpsTest, GatherRowsIsExactForF32AndBf16Tables) {
  SKIP_WITHOUT_GPU();
  const int64_t vocab = 1003;
  std::mt19937_64 rng(60);
  for (int64_t tokens : kRows) {
    for (int64_t n : kWidths) {
      std::vector<int32_t> ids(tokens);
      for (int32_t& id : ids) id = static_cast<int32_t>(rng() % vocab);
      if (tokens > 2) {  // both ends of the table
        ids[1] = 0;
        ids[2] = static_cast<int32_t>(vocab - 1);
      }
      const std::vector<float> table = Random(vocab * n, 61 + n, -100.0f, 100.0f);
      std::vector<uint16_t> table_bf16(table.size());
      for (size_t i = 0; i < table.size(); ++i) table_bf16[i] = FloatToBf16(table[i]);
      const int64_t ldo = n + 1;

      ASSERT_OK_AND_ASSIGN(DeviceBuffer<int32_t> did, DeviceBuffer<int32_t>::FromHost(ids));
      ASSERT_OK_AND_ASSIGN(DeviceBuffer<float> dtable, DeviceBuffer<float>::FromHost(table));
      ASSERT_OK_AND_ASSIGN(DeviceBuffer<uint16_t> dtable_bf16, DeviceBuffer<uint16_t>::FromHost(table_bf16));
      const std::vector<float> poison(tokens * ldo, kNaN);
      ASSERT_OK_AND_ASSIGN(DeviceBuffer<float> dout, DeviceBuffer<float>::FromHost(poison));
      ASSERT_OK_AND_ASSIGN(DeviceBuffer<float> dout_bf16, DeviceBuffer<float>::FromHost(poison));
      ASSERT_OK(GatherRows(did.data(), tokens, dtable.data(), vocab, n, dout.data(), ldo));
      ASSERT_OK(GatherRowsBf16(did.data(), tokens, dtable_bf16.data(), vocab, n, dout_bf16.data(), ldo));
      ASSERT_OK_AND_ASSIGN(std::vector<float> got, dout.ToHost());
      ASSERT_OK_AND_ASSIGN(std::vector<float> got_bf16, dout_bf16.ToHost());
      for (int64_t t = 0; t < tokens; ++t) {
        for (int64_t i = 0; i < n; ++i) {
          EXPECT_EQ(got[t * ldo + i], table[ids[t] * n + i]) << "token " << t << " col " << i;
          EXPECT_EQ(got_bf16[t * ldo + i], Bf16ToFloat(table_bf16[ids[t] * n + i])) << "token " << t << " col " << i;
        }
        EXPECT_TRUE(std::isnan(got[t * ldo + n])) << "padding written";
        EXPECT_TRUE(std::isnan(got_bf16[t * ldo + n])) << "padding written";
      }
    }
  }
}

TEST(CudaOpsTest, GatherRowsLeavesNaNForIdsOutsideTheTable) {
  SKIP_WITHOUT_GPU();
  const int64_t vocab = 4, n = 7;
  const std::vector<int32_t> ids = {-1, 2, 4};
  const std::vector<float> table = Random(vocab * n, 70);
  ASSERT_OK_AND_ASSIGN(DeviceBuffer<int32_t> did, DeviceBuffer<int32_t>::FromHost(ids));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer<float> dtable, DeviceBuffer<float>::FromHost(table));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer<float> dout, DeviceBuffer<float>::FromHost(std::vector<float>(3 * n, 0.0f)));
  ASSERT_OK(GatherRows(did.data(), 3, dtable.data(), vocab, n, dout.data(), n));
  ASSERT_OK_AND_ASSIGN(std::vector<float> got, dout.ToHost());
  for (int64_t i = 0; i < n; ++i) {
    EXPECT_TRUE(std::isnan(got[i]));
    EXPECT_EQ(got[n + i], table[2 * n + i]);
    EXPECT_TRUE(std::isnan(got[2 * n + i]));
  }
}

TEST(CudaOpsTest, ArgMaxRowsMatchesSequentialArgMaxWithTiesAndNaN) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(80);
  const int64_t widths[] = {1, 7, 129, 576, 4099};
  for (int64_t rows : kRows) {
    for (int64_t n : widths) {
      const int64_t ld = n + 5;
      // Few distinct values, so that most rows have ties for the maximum.
      std::vector<float> x(rows * ld);
      for (float& v : x) v = static_cast<float>(rng() % 5) - 2.0f;
      if (rows > 1) x[1 * ld + n - 1] = kNaN;  // skipped
      if (rows > 2) x[2 * ld] = kNaN;          // index 0: the sequential scan stays there
      if (rows > 2 && n > 1) x[2 * ld + 1] = 1e30f;
      std::vector<int32_t> want(rows);
      for (int64_t r = 0; r < rows; ++r) want[r] = ArgMax(x.data() + r * ld, n);
      if (rows > 2) {
        ASSERT_EQ(want[2], 0);
      }

      ASSERT_OK_AND_ASSIGN(DeviceBuffer<float> dx, DeviceBuffer<float>::FromHost(x));
      ASSERT_OK_AND_ASSIGN(DeviceBuffer<int32_t> dout, DeviceBuffer<int32_t>::FromHost(std::vector<int32_t>(rows, -7)));
      ASSERT_OK(ArgMaxRows(dx.data(), rows, n, ld, dout.data()));
      ASSERT_OK_AND_ASSIGN(std::vector<int32_t> got, dout.ToHost());
      EXPECT_EQ(got, want) << rows << " rows of width " << n;
    }
  }
}

TEST(CudaOpsTest, ArgMaxRowsPicksTheLowestOfTiesAcrossAVocabulary) {
  SKIP_WITHOUT_GPU();
  // The maximum at both ends and in the middle of a DeepSeek-sized vocabulary: the lowest wins.
  const int64_t n = 102400;
  std::vector<float> x = Random(3 * n, 90, -10.0f, 10.0f);
  x[0 * n + 77777] = x[0 * n + 5] = 50.0f;
  x[1 * n + n - 1] = 50.0f;
  x[2 * n + 0] = x[2 * n + n - 1] = 50.0f;
  ASSERT_OK_AND_ASSIGN(DeviceBuffer<float> dx, DeviceBuffer<float>::FromHost(x));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer<int32_t> dout, DeviceBuffer<int32_t>::Allocate(3));
  ASSERT_OK(ArgMaxRows(dx.data(), 3, n, n, dout.data()));
  ASSERT_OK_AND_ASSIGN(std::vector<int32_t> got, dout.ToHost());
  EXPECT_EQ(got, (std::vector<int32_t>{5, static_cast<int32_t>(n - 1), 0}));
}

TEST(CudaOpsTest, GatherRowBytesCopiesWholeRowsAtEveryAlignment) {
  SKIP_WITHOUT_GPU();
  // 64-byte rows take 16-byte copies, 12-byte rows 4-byte ones, 7-byte rows single bytes;
  // an offset source takes the narrower copy its alignment allows.
  for (int64_t row_bytes : {64, 12, 7}) {
    for (int64_t offset : {0, 4, 1}) {
      const int64_t source_rows = 11;
      std::vector<uint8_t> x(static_cast<size_t>(source_rows * row_bytes + offset));
      for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<uint8_t>(i * 31 + 7);
      const std::vector<int32_t> rows = {10, 0, 3, 3, 7};  // any order, repeats allowed
      ASSERT_OK_AND_ASSIGN(auto dx, DeviceBuffer<uint8_t>::FromHost(x));
      ASSERT_OK_AND_ASSIGN(auto drows, DeviceBuffer<int32_t>::FromHost(rows));
      const size_t out_bytes = rows.size() * static_cast<size_t>(row_bytes);
      ASSERT_OK_AND_ASSIGN(auto dout, DeviceBuffer<uint8_t>::FromHost(std::vector<uint8_t>(out_bytes + 5, 0xAB)));
      ASSERT_OK(GatherRowBytes(dx.data() + offset, row_bytes, drows.data(), static_cast<int64_t>(rows.size()),
                               dout.data()));
      ASSERT_OK_AND_ASSIGN(auto got, dout.ToHost());
      for (size_t i = 0; i < rows.size(); ++i) {
        for (int64_t b = 0; b < row_bytes; ++b) {
          ASSERT_EQ(got[i * row_bytes + b], x[offset + rows[i] * row_bytes + b])
              << "row " << i << " byte " << b << " (rows of " << row_bytes << ", offset " << offset << ")";
        }
      }
      for (size_t i = out_bytes; i < got.size(); ++i) EXPECT_EQ(got[i], 0xAB) << "written past the rows";
    }
  }
}

TEST(CudaOpsTest, GatherRowBytesChecksSizesOnTheHost) {
  int32_t rows = 0;
  char x = 0, out = 0;
  EXPECT_EQ(GatherRowBytes(&x, -1, &rows, 1, &out).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(GatherRowBytes(&x, 4, &rows, -1, &out).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(GatherRowBytes(nullptr, 4, &rows, 1, &out).code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(GatherRowBytes(nullptr, 4, nullptr, 0, nullptr).ok());  // nothing to gather
}

TEST(CudaOpsTest, BadSizesAreInvalidArguments) {
  SKIP_WITHOUT_GPU();
  ASSERT_OK_AND_ASSIGN(DeviceBuffer<float> d, DeviceBuffer<float>::Allocate(64));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer<int32_t> ids, DeviceBuffer<int32_t>::Allocate(4));
  const std::vector<double> inv_freq = {1.0, 0.5};
  ASSERT_OK_AND_ASSIGN(RopeFrequencies freq, RopeFrequencies::FromHost(inv_freq, 1.0));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer<int64_t> pos, DeviceBuffer<int64_t>::Allocate(2));
  float* p = d.data();
  auto invalid = [](const Status& s) { return s.code() == StatusCode::kInvalidArgument; };
  EXPECT_TRUE(invalid(RmsNorm(p, -1, 4, 4, p, 1e-6f, p, 4)));
  EXPECT_TRUE(invalid(RmsNorm(p, 2, 4, 3, p, 1e-6f, p + 32, 4)));  // ldx < n
  EXPECT_TRUE(invalid(RmsNorm(p, 2, 4, 4, p, 1e-6f, p, 5)));       // in place, strides differ
  EXPECT_TRUE(invalid(RmsNorm(nullptr, 2, 4, 4, p, 1e-6f, p, 4)));
  EXPECT_TRUE(invalid(ApplyRope({p, 2, 6, 3, 1, 0}, pos.data(), freq)));   // slice ends at 7 > ld 6
  EXPECT_TRUE(invalid(ApplyRope({p, 2, 16, 0, 2, 3}, pos.data(), freq)));  // slices overlap
  EXPECT_TRUE(invalid(SiluMul(p, p, 2, 8, 7, p + 32, 8)));
  EXPECT_TRUE(invalid(GatherRows(ids.data(), 2, p, -1, 4, p, 4)));
  EXPECT_TRUE(invalid(GatherRowsBf16(ids.data(), 2, nullptr, 4, 4, p, 3)));
  EXPECT_TRUE(invalid(ArgMaxRows(p, 2, 0, 4, ids.data())));
  // Zero rows are fine even with null pointers: nothing is launched.
  ASSERT_OK(RmsNorm(nullptr, 0, 4, 4, nullptr, 1e-6f, nullptr, 4));
  ASSERT_OK(ArgMaxRows(nullptr, 0, 0, 0, nullptr));
  ASSERT_OK(GatherRows(nullptr, 0, nullptr, 4, 4, nullptr, 4));
}

}  // namespace
}  // namespace epic::cuda
