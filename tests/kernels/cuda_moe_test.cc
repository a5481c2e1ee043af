// The MoE gate, permutation and combine on the GPU against the CPU gating,
// parallel::GroupBySlot and plain host loops. Outputs are poisoned first, so a value the
// kernels never wrote shows. On a machine without a GPU every test reports SKIPPED.
#include "kernels/cuda/moe.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "kernels/cpu/gating.h"
#include "kernels/cuda/buffer.h"
#include "kernels/cuda/device.h"
#include "parallel/dispatch.h"
#include "tests/kernels/cuda_test_util.h"
#include "tests/testing/random_values.h"

namespace epic::cuda {
namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr int32_t kPoisonId = -7;
// Gate weights are a score times a double norm and scale: only the scores' last bits
// (CUDA's exp, the order of the softmax sum) can differ from the CPU's.
constexpr double kRelative = 1e-6;

const int64_t kTokens[] = {1, 5, 33};

using epic::testing::Random;

// Values from a handful of levels, so that experts, and whole groups, tie.
std::vector<float> Tied(size_t n, uint64_t seed, int levels, float step) {
  std::mt19937_64 rng(seed);
  std::vector<float> v(n);
  for (float& x : v) x = static_cast<float>(static_cast<int>(rng() % levels) - levels / 2) * step;
  return v;
}

struct GateCase {
  const char* name;
  cpu::GateParams params;
  bool with_bias;
};

cpu::GateParams V2GroupLimited() {
  cpu::GateParams p;
  p.num_experts = 160;
  p.top_k = 6;
  p.num_groups = 8;
  p.topk_groups = 3;
  p.ranking = cpu::GroupRanking::kMax;
  p.scale = 16.0f;
  return p;
}

cpu::GateParams V3NoauxTc() {
  cpu::GateParams p;
  p.num_experts = 256;
  p.top_k = 8;
  p.num_groups = 8;
  p.topk_groups = 4;
  p.ranking = cpu::GroupRanking::kTopTwoSum;
  p.sigmoid = true;
  p.normalize = true;
  p.scale = 2.5f;
  return p;
}

cpu::GateParams Greedy(int64_t experts, int64_t top_k, bool sigmoid, bool normalize) {
  cpu::GateParams p;
  p.num_experts = experts;
  p.top_k = top_k;
  p.sigmoid = sigmoid;
  p.normalize = normalize;
  return p;
}

std::vector<GateCase> GateCases() {
  return {
      {"V2 group-limited", V2GroupLimited(), false},
      {"V3 noaux_tc", V3NoauxTc(), true},
      {"greedy softmax (V2-Lite)", Greedy(64, 6, false, false), false},
      {"greedy sigmoid, every expert chosen", Greedy(7, 7, true, true), false},
  };
}

// Runs one gate on the device and compares it with cpu::SelectExperts.
void ExpectGateMatchesCpu(const GateCase& c, const std::vector<float>& logits, int64_t tokens,
                          const std::vector<float>& bias, const std::string& what) {
  const cpu::GateParams& device_params = c.params;
  cpu::GateParams host_params = c.params;
  host_params.choice_bias = c.with_bias ? bias.data() : nullptr;
  const int64_t k = c.params.top_k;
  std::vector<int32_t> want_ids(tokens * k, kPoisonId);
  std::vector<float> want_weights(tokens * k, kNaN);
  cpu::SelectExperts(logits.data(), tokens, host_params, want_ids.data(), want_weights.data());

  ASSERT_OK_AND_ASSIGN(DeviceBuffer<float> dlogits, DeviceBuffer<float>::FromHost(logits));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer<float> dbias, DeviceBuffer<float>::FromHost(bias));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer<int32_t> dids,
                       DeviceBuffer<int32_t>::FromHost(std::vector<int32_t>(tokens * k, kPoisonId)));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer<float> dweights, DeviceBuffer<float>::FromHost(std::vector<float>(tokens * k, kNaN)));
  ASSERT_OK(TopKGating(dlogits.data(), tokens, device_params, c.with_bias ? dbias.data() : nullptr, dids.data(),
                       dweights.data()));
  ASSERT_OK_AND_ASSIGN(std::vector<int32_t> got_ids, dids.ToHost());
  ASSERT_OK_AND_ASSIGN(std::vector<float> got_weights, dweights.ToHost());
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t j = 0; j < k; ++j) {
      const int64_t i = t * k + j;
      EXPECT_EQ(got_ids[i], want_ids[i]) << c.name << ", " << what << ": token " << t << " choice " << j;
      EXPECT_NEAR(got_weights[i], want_weights[i], kRelative * std::fabs(want_weights[i]))
          << c.name << ", " << what << ": token " << t << " choice " << j;
    }
  }
}

TEST(CudaMoeTest, TopKGatingMatchesCpuOnRandomLogits) {
  SKIP_WITHOUT_GPU();
  for (const GateCase& c : GateCases()) {
    const int64_t n = c.params.num_experts;
    // V3's e_score_correction_bias is of the order of the sigmoid scores themselves.
    const std::vector<float> bias = Random(n, 100 + n, -0.3f, 0.3f);
    for (int64_t tokens : kTokens) {
      const std::vector<float> logits = Random(tokens * n, 200 + tokens * n, -4.0f, 4.0f);
      ExpectGateMatchesCpu(c, logits, tokens, bias, "random logits, " + std::to_string(tokens) + " tokens");
    }
  }
}

TEST(CudaMoeTest, TopKGatingBreaksTiesAsTheCpuDoes) {
  SKIP_WITHOUT_GPU();
  for (const GateCase& c : GateCases()) {
    const int64_t n = c.params.num_experts;
    // Bias levels exact in F32, so tied logits with tied biases stay tied after the sum.
    const std::vector<float> bias = Tied(n, 300 + n, 3, 0.125f);
    for (int64_t tokens : kTokens) {
      std::vector<float> logits = Tied(tokens * n, 400 + tokens * n, 5, 0.75f);
      // Token 0: every expert equal, so every group ties too: the lowest ones win.
      std::fill(logits.begin(), logits.begin() + n, 0.5f);
      ExpectGateMatchesCpu(c, logits, tokens, bias, "tied logits, " + std::to_string(tokens) + " tokens");
    }
  }
}

TEST(CudaMoeTest, TopKGatingChoosesTheLowestGroupsAndExpertsOnAFlatRow) {
  SKIP_WITHOUT_GPU();
  // Spelled out rather than taken from the CPU: a flat row keeps groups 0..2 and, within
  // them, experts 0..5.
  const cpu::GateParams p = V2GroupLimited();
  const std::vector<float> logits(p.num_experts, 1.0f);
  ASSERT_OK_AND_ASSIGN(DeviceBuffer<float> dlogits, DeviceBuffer<float>::FromHost(logits));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer<int32_t> dids, DeviceBuffer<int32_t>::FromHost(std::vector<int32_t>(6, kPoisonId)));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer<float> dweights, DeviceBuffer<float>::FromHost(std::vector<float>(6, kNaN)));
  ASSERT_OK(TopKGating(dlogits.data(), 1, p, nullptr, dids.data(), dweights.data()));
  ASSERT_OK_AND_ASSIGN(std::vector<int32_t> ids, dids.ToHost());
  ASSERT_OK_AND_ASSIGN(std::vector<float> weights, dweights.ToHost());
  EXPECT_EQ(ids, (std::vector<int32_t>{0, 1, 2, 3, 4, 5}));
  for (float w : weights) EXPECT_NEAR(w, 16.0f / 160.0f, 1e-6 * 0.1);
}

// What PermuteByExpert must produce, by plain loops.
struct HostPermutation {
  std::vector<int32_t> counts;
  std::vector<int32_t> offsets;
  std::vector<int32_t> source_token;
  std::vector<float> weight;
  std::vector<int32_t> grouped_row;
};

HostPermutation PermuteOnHost(const std::vector<int32_t>& ids, const std::vector<float>& weights, int64_t tokens,
                              int64_t top_k, int64_t experts) {
  HostPermutation p;
  p.counts.assign(experts, 0);
  p.grouped_row.assign(tokens * top_k, -1);
  for (int32_t id : ids) {
    if (id >= 0 && id < experts) ++p.counts[id];
  }
  p.offsets.assign(experts + 1, 0);
  for (int64_t e = 0; e < experts; ++e) p.offsets[e + 1] = p.offsets[e] + p.counts[e];
  p.source_token.resize(p.offsets[experts]);
  p.weight.resize(p.offsets[experts]);
  std::vector<int32_t> fill(p.offsets.begin(), p.offsets.end() - 1);
  for (int64_t i = 0; i < tokens * top_k; ++i) {
    const int32_t id = ids[i];
    if (id < 0 || id >= experts) continue;
    const int32_t row = fill[id]++;
    p.source_token[row] = static_cast<int32_t>(i / top_k);
    p.weight[row] = weights[i];
    p.grouped_row[i] = row;
  }
  return p;
}

// Device buffers for ExpertRows, poisoned.
struct DeviceRows {
  DeviceBuffer<int32_t> counts, offsets, source_token, grouped_row, scratch;
  DeviceBuffer<float> weight;

  static StatusOr<DeviceRows> Allocate(int64_t tokens, int64_t top_k, int64_t experts) {
    DeviceRows d;
    const int64_t entries = tokens * top_k;
    EPIC_ASSIGN_OR_RETURN(d.counts, DeviceBuffer<int32_t>::FromHost(std::vector<int32_t>(experts, kPoisonId)));
    EPIC_ASSIGN_OR_RETURN(d.offsets, DeviceBuffer<int32_t>::FromHost(std::vector<int32_t>(experts + 1, kPoisonId)));
    EPIC_ASSIGN_OR_RETURN(d.source_token, DeviceBuffer<int32_t>::FromHost(std::vector<int32_t>(entries, kPoisonId)));
    EPIC_ASSIGN_OR_RETURN(d.grouped_row, DeviceBuffer<int32_t>::FromHost(std::vector<int32_t>(entries, kPoisonId)));
    EPIC_ASSIGN_OR_RETURN(d.weight, DeviceBuffer<float>::FromHost(std::vector<float>(entries, kNaN)));
    EPIC_ASSIGN_OR_RETURN(d.scratch, DeviceBuffer<int32_t>::Allocate(PermuteScratchCount(tokens, top_k, experts)));
    return StatusOr<DeviceRows>(std::move(d));
  }
  ExpertRows rows() {
    return {counts.data(), offsets.data(), source_token.data(), weight.data(), grouped_row.data(), scratch.data()};
  }
};

TEST(CudaMoeTest, PermuteByExpertGroupsStablyInTokenOrder) {
  SKIP_WITHOUT_GPU();
  const int64_t experts = 16, top_k = 6, idle = 3;
  std::mt19937_64 rng(500);
  // 700 tokens make 4200 choices: many chunks, so an expert's rows span chunk borders.
  const int64_t token_counts[] = {1, 5, 33, 700};
  for (int64_t tokens : token_counts) {
    std::vector<int32_t> ids(tokens * top_k);
    for (int32_t& id : ids) {
      do {
        id = static_cast<int32_t>(rng() % experts);
      } while (id == idle);  // one expert gets no token at all
    }
    if (tokens > 1) {
      ids[1] = -1;                                   // a pad, as parallel::RouteEntry's slot -1
      ids[top_k + 2] = ids[top_k + 1];               // one token choosing an expert twice: k order
      ids[top_k + 3] = static_cast<int32_t>(experts);  // out of range: not routed either
    }
    const std::vector<float> weights = Random(tokens * top_k, 600 + tokens, 0.0f, 3.0f);
    const HostPermutation want = PermuteOnHost(ids, weights, tokens, top_k, experts);
    ASSERT_EQ(want.counts[idle], 0);

    ASSERT_OK_AND_ASSIGN(DeviceBuffer<int32_t> dids, DeviceBuffer<int32_t>::FromHost(ids));
    ASSERT_OK_AND_ASSIGN(DeviceBuffer<float> dweights, DeviceBuffer<float>::FromHost(weights));
    ASSERT_OK_AND_ASSIGN(DeviceRows d, DeviceRows::Allocate(tokens, top_k, experts));
    ASSERT_OK(PermuteByExpert(dids.data(), dweights.data(), tokens, top_k, experts, d.rows()));
    ASSERT_OK_AND_ASSIGN(std::vector<int32_t> counts, d.counts.ToHost());
    ASSERT_OK_AND_ASSIGN(std::vector<int32_t> offsets, d.offsets.ToHost());
    ASSERT_OK_AND_ASSIGN(std::vector<int32_t> source_token, d.source_token.ToHost());
    ASSERT_OK_AND_ASSIGN(std::vector<float> weight, d.weight.ToHost());
    ASSERT_OK_AND_ASSIGN(std::vector<int32_t> grouped_row, d.grouped_row.ToHost());
    EXPECT_EQ(counts, want.counts) << tokens << " tokens";
    EXPECT_EQ(offsets, want.offsets) << tokens << " tokens";
    EXPECT_EQ(grouped_row, want.grouped_row) << tokens << " tokens";
    const int64_t routed = want.offsets[experts];
    for (int64_t r = 0; r < tokens * top_k; ++r) {
      if (r < routed) {
        EXPECT_EQ(source_token[r], want.source_token[r]) << tokens << " tokens, grouped row " << r;
        EXPECT_EQ(weight[r], want.weight[r]) << tokens << " tokens, grouped row " << r;
      } else {
        EXPECT_EQ(source_token[r], kPoisonId) << "grouped row " << r << " past the routed ones was written";
        EXPECT_TRUE(std::isnan(weight[r])) << "grouped row " << r << " past the routed ones was written";
      }
    }
    // Stable: within each expert the tokens never go backwards.
    for (int64_t e = 0; e < experts; ++e) {
      for (int32_t r = want.offsets[e] + 1; r < want.offsets[e + 1]; ++r) {
        EXPECT_LE(source_token[r - 1], source_token[r]) << "expert " << e << " row " << r;
      }
    }

    // The same order as parallel::GroupBySlot when the slots are the experts.
    parallel::ReceivedTokens received;
    received.rows_from = {tokens};
    received.route.resize(ids.size());
    for (size_t i = 0; i < ids.size(); ++i) {
      const bool in_range = ids[i] >= 0 && ids[i] < experts;
      received.route[i] = {in_range ? ids[i] : -1, weights[i]};
    }
    const parallel::SlotBatches batches = parallel::GroupBySlot(received, top_k, experts);
    ASSERT_EQ(static_cast<int64_t>(batches.row.size()), routed);
    for (int64_t e = 0; e <= experts; ++e) EXPECT_EQ(offsets[e], batches.offsets[e]) << "expert " << e;
    for (int64_t r = 0; r < routed; ++r) {
      EXPECT_EQ(source_token[r], batches.row[r]) << "grouped row " << r;
      EXPECT_EQ(weight[r], batches.weight[r]) << "grouped row " << r;
    }
  }
}

TEST(CudaMoeTest, PermuteByExpertOfNoTokensWritesZeroCounts) {
  SKIP_WITHOUT_GPU();
  const int64_t experts = 5;
  ASSERT_OK_AND_ASSIGN(DeviceRows d, DeviceRows::Allocate(0, 4, experts));
  ASSERT_OK(PermuteByExpert(nullptr, nullptr, 0, 4, experts, d.rows()));
  ASSERT_OK_AND_ASSIGN(std::vector<int32_t> counts, d.counts.ToHost());
  ASSERT_OK_AND_ASSIGN(std::vector<int32_t> offsets, d.offsets.ToHost());
  EXPECT_EQ(counts, std::vector<int32_t>(experts, 0));
  EXPECT_EQ(offsets, std::vector<int32_t>(experts + 1, 0));
}

TEST(CudaMoeTest, ScatterAddWeightedMatchesAHostLoop) {
  SKIP_WITHOUT_GPU();
  const int64_t experts = 9, top_k = 4;
  const int64_t widths[] = {1, 7, 129, 576};
  std::mt19937_64 rng(700);
  for (int64_t tokens : kTokens) {
    for (int64_t n : widths) {
      std::vector<int32_t> ids(tokens * top_k);
      for (int32_t& id : ids) id = static_cast<int32_t>(rng() % experts);
      // The last token routes nowhere (all pads): its row must stay exactly as it was.
      for (int64_t k = 0; k < top_k; ++k) ids[(tokens - 1) * top_k + k] = -1;
      if (tokens > 1) ids[1] = -1;  // one pad among real choices
      const std::vector<float> weights = Random(tokens * top_k, 800 + tokens, 0.0f, 2.0f);
      const HostPermutation perm = PermuteOnHost(ids, weights, tokens, top_k, experts);
      const int64_t rows = perm.offsets[experts];
      const int64_t ldx = n + 3, ldy = n + 1;
      const std::vector<float> expert_out = Random(std::max<int64_t>(rows, 1) * ldx, 900 + n, -5.0f, 5.0f);
      std::vector<float> y = Random(tokens * ldy, 1000 + n, -5.0f, 5.0f);
      for (int64_t t = 0; t < tokens; ++t) y[t * ldy + n] = kNaN;  // padding: never touched
      y[(tokens - 1) * ldy] = -0.0f;  // untouched means bit for bit, even a negative zero

      std::vector<float> want = y;
      std::vector<double> magnitude(tokens * ldy, 0.0);
      for (int64_t t = 0; t < tokens; ++t) {
        for (int64_t i = 0; i < n; ++i) {
          float sum = 0.0f;
          double size = std::fabs(y[t * ldy + i]);
          for (int64_t k = 0; k < top_k; ++k) {
            const int32_t r = perm.grouped_row[t * top_k + k];
            if (r < 0) continue;
            const float term = weights[t * top_k + k] * expert_out[r * ldx + i];
            sum += term;
            size += std::fabs(term);
          }
          want[t * ldy + i] += sum;
          magnitude[t * ldy + i] = size;
        }
      }

      ASSERT_OK_AND_ASSIGN(DeviceBuffer<float> dout, DeviceBuffer<float>::FromHost(expert_out));
      ASSERT_OK_AND_ASSIGN(DeviceBuffer<int32_t> droute, DeviceBuffer<int32_t>::FromHost(perm.grouped_row));
      ASSERT_OK_AND_ASSIGN(DeviceBuffer<float> dweights, DeviceBuffer<float>::FromHost(weights));
      ASSERT_OK_AND_ASSIGN(DeviceBuffer<float> dy, DeviceBuffer<float>::FromHost(y));
      ASSERT_OK(ScatterAddWeighted(dout.data(), rows, n, ldx, droute.data(), dweights.data(), tokens, top_k, dy.data(),
                                   ldy));
      ASSERT_OK_AND_ASSIGN(std::vector<float> got, dy.ToHost());
      for (int64_t t = 0; t < tokens; ++t) {
        for (int64_t i = 0; i < n; ++i) {
          const int64_t at = t * ldy + i;
          if (t == tokens - 1) {
            EXPECT_EQ(std::signbit(got[at]), std::signbit(y[at])) << "token " << t << " col " << i;
            EXPECT_EQ(got[at], y[at]) << "a token with no routed choice changed at col " << i;
          } else {
            // Relative to the size of the terms: a sum that cancels keeps their rounding.
            EXPECT_NEAR(got[at], want[at], kRelative * magnitude[at]) << "token " << t << " col " << i;
          }
        }
        EXPECT_TRUE(std::isnan(got[t * ldy + n])) << "padding written";
      }
    }
  }
}

TEST(CudaMoeTest, BadSizesAreInvalidArguments) {
  SKIP_WITHOUT_GPU();
  ASSERT_OK_AND_ASSIGN(DeviceBuffer<float> f, DeviceBuffer<float>::Allocate(1024));
  ASSERT_OK_AND_ASSIGN(DeviceBuffer<int32_t> i, DeviceBuffer<int32_t>::Allocate(1024));
  auto invalid = [](const Status& s) { return s.code() == StatusCode::kInvalidArgument; };
  const float host_bias[2] = {0.0f, 0.0f};

  cpu::GateParams p = V2GroupLimited();
  EXPECT_TRUE(invalid(TopKGating(f.data(), -1, p, nullptr, i.data(), f.data())));
  p.num_groups = 7;  // does not divide 160
  EXPECT_TRUE(invalid(TopKGating(f.data(), 1, p, nullptr, i.data(), f.data())));
  p = V2GroupLimited();
  p.topk_groups = 9;
  EXPECT_TRUE(invalid(TopKGating(f.data(), 1, p, nullptr, i.data(), f.data())));
  p = V2GroupLimited();
  p.top_k = 161;
  EXPECT_TRUE(invalid(TopKGating(f.data(), 1, p, nullptr, i.data(), f.data())));
  p = Greedy(kMaxGateExperts + 1, 2, false, false);
  EXPECT_TRUE(invalid(TopKGating(f.data(), 1, p, nullptr, i.data(), f.data())));
  p = V3NoauxTc();
  p.choice_bias = host_bias;  // a host bias with no device copy
  EXPECT_TRUE(invalid(TopKGating(f.data(), 1, p, nullptr, i.data(), f.data())));
  p = V3NoauxTc();
  p.num_groups = 256;  // groups of one have no top two
  p.topk_groups = 4;
  EXPECT_TRUE(invalid(TopKGating(f.data(), 1, p, f.data(), i.data(), f.data())));
  EXPECT_TRUE(invalid(TopKGating(nullptr, 1, V2GroupLimited(), nullptr, i.data(), f.data())));

  ExpertRows rows{i.data(), i.data(), i.data(), f.data(), i.data(), i.data()};
  EXPECT_TRUE(invalid(PermuteByExpert(i.data(), f.data(), 4, 2, 0, rows)));
  EXPECT_TRUE(invalid(PermuteByExpert(i.data(), f.data(), 4, 2, kMaxGateExperts + 1, rows)));
  EXPECT_TRUE(invalid(PermuteByExpert(i.data(), f.data(), int64_t{1} << 30, 8, 4, rows)));  // past int32 rows
  ExpertRows no_scratch = rows;
  no_scratch.scratch = nullptr;
  EXPECT_TRUE(invalid(PermuteByExpert(i.data(), f.data(), 4, 2, 4, no_scratch)));

  EXPECT_TRUE(invalid(ScatterAddWeighted(f.data(), 4, 8, 7, i.data(), f.data(), 2, 2, f.data(), 8)));  // ldx < n
  EXPECT_TRUE(invalid(ScatterAddWeighted(f.data(), 4, 8, 8, i.data(), f.data(), -1, 2, f.data(), 8)));
  EXPECT_TRUE(invalid(ScatterAddWeighted(f.data(), 4, 8, 8, nullptr, f.data(), 2, 2, f.data(), 8)));
  // Nothing to do is fine even with null pointers: nothing is launched.
  ASSERT_OK(TopKGating(nullptr, 0, V3NoauxTc(), nullptr, nullptr, nullptr));
  ASSERT_OK(ScatterAddWeighted(nullptr, 0, 8, 8, nullptr, nullptr, 0, 2, nullptr, 8));
}

}  // namespace
}  // namespace epic::cuda
