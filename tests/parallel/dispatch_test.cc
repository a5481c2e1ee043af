// Dispatch, local experts and combine across real mpirun ranks against the same MoE
// computed in one place. Each "expert" e maps a row x to (e + 1) * x + e, so every
// rank can compute the expected output of any token on its own.
#include "parallel/dispatch.h"

#include <cstring>
#include <limits>
#include <map>

#include <cmath>
#include <random>
#include <set>

#include <gtest/gtest.h>

#include "parallel/moe_exchange.h"

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

// Memory apart from the host's, as a device's is: staged data is a copy, fetched data
// comes back through a copy, fresh buffers hold NaN, and the adds read one contiguous
// buffer (the self block copied after the returned rows, into the room the exchange
// must have left). What the exchange does right here, it does right over NCCL.
class SeparateRowSpace final : public RowSpace {
 public:
  StatusOr<void*> Buffer(int id, int64_t bytes) override {
    std::vector<float>& b = buffers_[id];
    const size_t n = static_cast<size_t>((bytes + 3) / 4);
    if (b.size() < n) b.assign(n, std::numeric_limits<float>::quiet_NaN());
    return static_cast<void*>(b.data());
  }
  StatusOr<const void*> Stage(const void* host, int64_t bytes, int id) override {
    EPIC_ASSIGN_OR_RETURN(void* d, Buffer(id + 100, bytes));
    if (bytes > 0) std::memcpy(d, host, static_cast<size_t>(bytes));
    ++staged;
    return static_cast<const void*>(d);
  }
  StatusOr<const void*> Fetch(const void* src, int64_t bytes, void* host) override {
    if (bytes > 0) std::memcpy(host, src, static_cast<size_t>(bytes));
    ++fetched;
    return static_cast<const void*>(host);
  }
  Status AddRows(float* back, int64_t returned, const float* self, int64_t self_rows, int64_t width,
                 const int32_t* source, int64_t tokens, int64_t sources, float* y) override {
    const float* rows = self;
    if (returned > 0) {
      std::memcpy(back + returned * width, self, static_cast<size_t>(self_rows * width) * sizeof(float));
      rows = back;
    }
    for (int64_t t = 0; t < tokens; ++t) {
      for (int64_t j = 0; j < sources; ++j) {
        const int32_t i = source[t * sources + j];
        if (i < 0) continue;
        for (int64_t c = 0; c < width; ++c) y[t * width + c] += rows[i * width + c];
      }
    }
    return OkStatus();
  }
  int staged = 0, fetched = 0;

 private:
  std::map<int, std::vector<float>> buffers_;
};

TEST_F(DispatchTest, AnExchangeOverSeparateMemoryGivesTheSameSums) {
  const int64_t experts = 24, top_k = 3;
  const int64_t count = 4 + 3 * comm_->rank();
  const Tokens t = MakeTokens(comm_->rank(), count, experts, top_k);
  const auto placement = ExpertPlacement::Contiguous(1, {true}, experts, comm_->size(), 2);
  SeparateRowSpace space;
  MoeExchange exchange(comm_.get(), &space, comm_->rank());
  const auto& slots = placement.slots(0, comm_->rank());
  for (int round = 0; round < 2; ++round) {  // the second reuses every buffer
    const DispatchPlan plan = PlanDispatch(placement, 0, comm_->rank(), t.ids.data(), t.weights.data(), count,
                                           top_k, comm_->rank() * 1000);
    auto handle = exchange.Dispatch(plan, t.x.data(), kHidden);
    ASSERT_TRUE(handle.ok()) << handle.status().ToString();
    const MoeHandle& h = **handle;
    // The experts over the handle's layout: per slot its grouped rows and their weights.
    std::vector<float> out(static_cast<size_t>(std::max<int64_t>(h.received, 1) * kHidden), 0.0f);
    ASSERT_EQ(h.layout.offsets.size(), slots.size() + 1);
    for (size_t s = 0; s < slots.size(); ++s) {
      const float e = static_cast<float>(slots[s]);
      for (int32_t i = h.layout.offsets[s]; i < h.layout.offsets[s + 1]; ++i) {
        const int64_t row = h.layout.grouped_source[i];
        for (int64_t j = 0; j < kHidden; ++j) {
          out[row * kHidden + j] += h.layout.grouped_weight[i] * ((e + 1) * h.rows[row * kHidden + j] + e);
        }
      }
    }
    std::vector<float> y(static_cast<size_t>(count * kHidden), 0.0f);
    ExchangeStats stats;
    ASSERT_TRUE(exchange.Combine(h, out.data(), kHidden, y.data(), &stats).ok());
    ExpectMatchesLocal(t, count, top_k, y);
  }
  // One rank's rows stay where they are; several ranks' routes go out and come back.
  EXPECT_EQ(space.fetched > 0, comm_->size() > 1);
}

}  // namespace
}  // namespace epic::parallel
