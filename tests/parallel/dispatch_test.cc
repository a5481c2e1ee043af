// Dispatch, local experts and combine across real mpirun ranks against the same MoE
// computed in one place. Each "expert" e maps a row x to (e + 1) * x + e, so every
// rank can compute the expected output of any token on its own.
#include "parallel/dispatch.h"

#include <cmath>
#include <random>
#include <set>

#include <gtest/gtest.h>

namespace epic::parallel {
namespace {

constexpr int64_t kHidden = 24;

struct Tokens {
  std::vector<float> x;
  std::vector<int32_t> ids;
  std::vector<float> weights;
};

// Tokens of RANK: count and values depend on the rank (rank 1 may have none).
Tokens MakeTokens(int rank, int64_t count, int64_t experts, int64_t top_k) {
  std::mt19937 rng(1234 + rank);
  std::uniform_real_distribution<float> u(-1, 1);
  Tokens t;
  t.x.resize(static_cast<size_t>(count * kHidden));
  for (float& v : t.x) v = u(rng);
  for (int64_t i = 0; i < count; ++i) {
    std::set<int32_t> chosen;
    while (static_cast<int64_t>(chosen.size()) < top_k) chosen.insert(static_cast<int32_t>(rng() % experts));
    for (int32_t e : chosen) {
      t.ids.push_back(e);
      t.weights.push_back(u(rng));
    }
  }
  return t;
}

void RunMoe(Communicator& comm, const ExpertPlacement& placement, const Tokens& t, int64_t count,
            int64_t top_k, std::vector<float>* y, DispatchPlan* plan_out = nullptr) {
  const int rank = comm.rank();
  DispatchPlan plan = PlanDispatch(placement, 0, rank, t.ids.data(), t.weights.data(), count, top_k,
                                   /*first_token=*/rank * 1000);
  ReceivedTokens received;
  ExchangeStats stats;
  ASSERT_TRUE(Dispatch(comm, plan, t.x.data(), kHidden, &received, &stats).ok());
  const auto& slots = placement.slots(0, rank);
  const SlotBatches batches = GroupBySlot(received, top_k, static_cast<int64_t>(slots.size()));
  std::vector<float> out(static_cast<size_t>(received.rows() * kHidden), 0.0f);
  for (size_t s = 0; s < slots.size(); ++s) {
    const float e = static_cast<float>(slots[s]);
    for (int64_t i = batches.offsets[s]; i < batches.offsets[s + 1]; ++i) {
      const int64_t row = batches.row[i];
      for (int64_t j = 0; j < kHidden; ++j) {
        out[row * kHidden + j] += batches.weight[i] * ((e + 1) * received.hidden[row * kHidden + j] + e);
      }
    }
  }
  y->assign(static_cast<size_t>(count * kHidden), 0.0f);
  ASSERT_TRUE(Combine(comm, plan, received, out.data(), kHidden, y->data(), &stats).ok());
  EXPECT_EQ(stats.bytes_sent > 0, !plan.send_token.empty() || received.rows() > 0);
  if (plan_out) *plan_out = plan;
}

void ExpectMatchesLocal(const Tokens& t, int64_t count, int64_t top_k, const std::vector<float>& y) {
  for (int64_t i = 0; i < count; ++i) {
    for (int64_t j = 0; j < kHidden; ++j) {
      double want = 0;
      for (int64_t k = 0; k < top_k; ++k) {
        const double e = t.ids[i * top_k + k];
        want += t.weights[i * top_k + k] * ((e + 1) * t.x[i * kHidden + j] + e);
      }
      ASSERT_NEAR(y[i * kHidden + j], want, 1e-4 * (1 + std::fabs(want))) << "token " << i;
    }
  }
}

class DispatchTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto c = MakeMpiCommunicator();
    ASSERT_TRUE(c.ok()) << c.status().ToString();
    comm_ = std::move(*c);
  }
  std::unique_ptr<Communicator> comm_;
};

TEST_F(DispatchTest, MatchesTheLocalMoeWithUnevenTokenCounts) {
  const int64_t experts = 160, top_k = 6;
  const int64_t count = comm_->rank() == 1 ? 0 : 5 + 7 * comm_->rank();  // rank 1 has no tokens
  const Tokens t = MakeTokens(comm_->rank(), count, experts, top_k);
  const auto placement = ExpertPlacement::Contiguous(1, {true}, experts, comm_->size());
  std::vector<float> y;
  DispatchPlan plan;
  RunMoe(*comm_, placement, t, count, top_k, &y, &plan);
  ExpectMatchesLocal(t, count, top_k, y);
  // A token crosses to each rank at most once; rows per rank never exceed tokens.
  for (int r = 0; r < comm_->size(); ++r) EXPECT_LE(plan.send_rows[r], count);
  int64_t routed = 0;
  for (const auto& per_rank : plan.slot_tokens) {
    for (int64_t n : per_rank) routed += n;
  }
  EXPECT_EQ(routed, count * top_k);
}

TEST_F(DispatchTest, ReplicasGiveTheSameResult) {
  const int64_t experts = 32, top_k = 4, count = 40;
  const Tokens t = MakeTokens(comm_->rank(), count, experts, top_k);
  std::vector<float> plain, replicated;
  RunMoe(*comm_, ExpertPlacement::Contiguous(1, {true}, experts, comm_->size()), t, count, top_k, &plain);
  RunMoe(*comm_, ExpertPlacement::Contiguous(1, {true}, experts, comm_->size(), 5), t, count, top_k,
         &replicated);
  ExpectMatchesLocal(t, count, top_k, replicated);
  for (size_t i = 0; i < plain.size(); ++i) ASSERT_NEAR(plain[i], replicated[i], 1e-4 * (1 + std::fabs(plain[i])));
}

TEST_F(DispatchTest, EveryTokenToOneRank) {
  // All experts on the last rank: every other rank sends everything there.
  const int64_t experts = 8, top_k = 2, count = 9;
  ExpertPlacement::Table table(1, std::vector<std::vector<int32_t>>(comm_->size()));
  for (int e = 0; e < experts; ++e) table[0][comm_->size() - 1].push_back(e);
  auto placement = ExpertPlacement::Create(table, experts);
  ASSERT_TRUE(placement.ok());
  const Tokens t = MakeTokens(comm_->rank(), count, experts, top_k);
  std::vector<float> y;
  DispatchPlan plan;
  RunMoe(*comm_, *placement, t, count, top_k, &y, &plan);
  ExpectMatchesLocal(t, count, top_k, y);
  EXPECT_EQ(plan.send_rows[comm_->size() - 1], count);  // each token once, not top_k times
}

}  // namespace
}  // namespace epic::parallel
