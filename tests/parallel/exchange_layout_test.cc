// The device step's exchange layouts against GroupBySlot and against a job of N ranks
// simulated in one process: every rank plans its dispatch, the exchanges are played by
// concatenating blocks in rank order (what AllToAllRows delivers), each received row's
// output is a value that names it, and each token must get back exactly the rows its
// experts' ranks produced for it, summed once each.
#include "parallel/exchange_layout.h"

#include <algorithm>
#include <random>
#include <vector>

#include <gtest/gtest.h>

#include "parallel/dispatch.h"
#include "parallel/expert_placement.h"

namespace epic::parallel {
namespace {

constexpr int64_t kTopK = 3;
constexpr int64_t kExperts = 12;

struct Rank {
  int64_t tokens = 0;
  std::vector<int32_t> ids;
  std::vector<float> weights;
  DispatchPlan plan;
  std::vector<int64_t> rows_from;       // what Dispatch received from each rank
  std::vector<RouteEntry> routes;       // [received rows, top_k]
  std::vector<int32_t> source_rank;     // [received rows] who sent each row
  std::vector<int32_t> source_token;    // [received rows] the sender's token
};

// N ranks with random tokens and choices, planned and "dispatched".
std::vector<Rank> Simulate(const ExpertPlacement& placement, int ranks, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<Rank> job(static_cast<size_t>(ranks));
  int64_t first = 0;
  for (int r = 0; r < ranks; ++r) {
    Rank& me = job[r];
    me.tokens = static_cast<int64_t>(rng() % 7);  // some ranks have none
    for (int64_t t = 0; t < me.tokens; ++t) {
      std::vector<int32_t> pool(kExperts);
      for (int32_t e = 0; e < kExperts; ++e) pool[e] = e;
      std::shuffle(pool.begin(), pool.end(), rng);
      for (int64_t k = 0; k < kTopK; ++k) {
        me.ids.push_back(pool[k]);
        me.weights.push_back(std::uniform_real_distribution<float>(0.1f, 1.0f)(rng));
      }
    }
    me.plan = PlanDispatch(placement, 0, r, me.ids.data(), me.weights.data(), me.tokens, kTopK, first);
    first += me.tokens;
  }
  // The exchange: rank d receives, from each source s in order, s's block for d.
  for (int d = 0; d < ranks; ++d) {
    Rank& dst = job[d];
    dst.rows_from.assign(static_cast<size_t>(ranks), 0);
    for (int s = 0; s < ranks; ++s) {
      const DispatchPlan& p = job[s].plan;
      int64_t start = 0;
      for (int r = 0; r < d; ++r) start += p.send_rows[r];
      for (int64_t i = 0; i < p.send_rows[d]; ++i) {
        dst.source_rank.push_back(s);
        dst.source_token.push_back(p.send_token[start + i]);
        for (int64_t k = 0; k < kTopK; ++k) dst.routes.push_back(p.send_route[(start + i) * kTopK + k]);
      }
      dst.rows_from[s] = p.send_rows[d];
    }
  }
  return job;
}

class ExchangeLayoutTest : public ::testing::TestWithParam<int> {};

TEST_P(ExchangeLayoutTest, ExpertLayoutGroupsAsGroupBySlot) {
  const int ranks = GetParam();
  for (int redundant : {0, 2}) {
    const ExpertPlacement placement = ExpertPlacement::Contiguous(1, {true}, kExperts, ranks, redundant);
    for (uint64_t seed = 0; seed < 20; ++seed) {
      const std::vector<Rank> job = Simulate(placement, ranks, seed);
      for (int r = 0; r < ranks; ++r) {
        const Rank& me = job[r];
        const int64_t rows = static_cast<int64_t>(me.source_rank.size());
        const int64_t slots = static_cast<int64_t>(placement.slots(0, r).size());
        ReceivedTokens received;
        received.rows_from = me.rows_from;
        received.route = me.routes;
        const SlotBatches want = GroupBySlot(received, kTopK, slots);
        const ExpertLayout got = MakeExpertLayout(me.routes, rows, kTopK, slots);
        ASSERT_EQ(got.offsets.size(), want.offsets.size());
        for (size_t s = 0; s < want.offsets.size(); ++s) EXPECT_EQ(got.offsets[s], want.offsets[s]);
        ASSERT_EQ(got.grouped_source.size(), want.row.size());
        for (size_t g = 0; g < want.row.size(); ++g) EXPECT_EQ(got.grouped_source[g], want.row[g]);
        // The way back: each routed entry points at a grouped row of its own row, with its weight.
        std::vector<int> hits(want.row.size(), 0);
        for (int64_t i = 0; i < rows * kTopK; ++i) {
          if (me.routes[i].slot < 0) {
            EXPECT_EQ(got.row_grouped[i], -1);
            EXPECT_EQ(got.row_weight[i], 0.0f);
            continue;
          }
          const int32_t g = got.row_grouped[i];
          ASSERT_GE(g, 0);
          EXPECT_EQ(got.grouped_source[g], i / kTopK);
          EXPECT_EQ(got.row_weight[i], want.weight[g]);
          EXPECT_GE(g, want.offsets[me.routes[i].slot]);
          EXPECT_LT(g, want.offsets[me.routes[i].slot + 1]);
          ++hits[g];
        }
        for (int h : hits) EXPECT_EQ(h, 1);
      }
    }
  }
}

TEST_P(ExchangeLayoutTest, CombineReturnsEveryRowToItsToken) {
  const int ranks = GetParam();
  const ExpertPlacement placement = ExpertPlacement::Contiguous(1, {true}, kExperts, ranks, ranks > 1 ? 1 : 0);
  for (uint64_t seed = 0; seed < 30; ++seed) {
    const std::vector<Rank> job = Simulate(placement, ranks, seed + 100);
    // Each received row's "output" names it: (serving rank, received row).
    auto output = [](int rank, int64_t row) { return 1000.0 * rank + static_cast<double>(row); };
    std::vector<CombineLayout> layouts;
    for (int r = 0; r < ranks; ++r) layouts.push_back(MakeCombineLayout(job[r].plan, job[r].rows_from, r));
    for (int r = 0; r < ranks; ++r) {
      const Rank& me = job[r];
      const CombineLayout& c = layouts[r];
      // What the reverse exchange delivers to r: from each rank d (not r), in order, the
      // rows d sends back to r, which are d's send_index entries of its block for r.
      std::vector<double> buffer;
      for (int d = 0; d < ranks; ++d) {
        if (d == r) continue;
        const CombineLayout& cd = layouts[d];
        EXPECT_EQ(cd.send_rows[r], c.recv_rows[d]);
        int64_t start = 0;
        for (int q = 0; q < r; ++q) start += cd.send_rows[q];
        for (int64_t i = 0; i < cd.send_rows[r]; ++i) buffer.push_back(output(d, cd.send_index[start + i]));
      }
      ASSERT_EQ(static_cast<int64_t>(buffer.size()), c.returned);
      for (int64_t i = 0; i < c.self_rows; ++i) buffer.push_back(output(r, c.self_first + i));
      // Expected: every rank d that served token t adds the output of the row it got for t.
      std::vector<double> want(static_cast<size_t>(me.tokens), 0.0), got(want.size(), 0.0);
      for (int d = 0; d < ranks; ++d) {
        const Rank& server = job[d];
        for (size_t row = 0; row < server.source_rank.size(); ++row) {
          if (server.source_rank[row] == r) want[server.source_token[row]] += output(d, static_cast<int64_t>(row));
        }
      }
      for (int64_t t = 0; t < me.tokens; ++t) {
        for (int64_t s = 0; s < c.sources; ++s) {
          const int32_t row = c.token_source[t * c.sources + s];
          if (row < 0) continue;
          ASSERT_LT(row, static_cast<int32_t>(buffer.size()));
          got[t] += buffer[row];
        }
      }
      for (int64_t t = 0; t < me.tokens; ++t) EXPECT_EQ(got[t], want[t]) << "rank " << r << " token " << t;
      // The rows sent back are exactly the received rows outside the self block.
      int64_t received = 0;
      for (int64_t n : me.rows_from) received += n;
      EXPECT_EQ(static_cast<int64_t>(c.send_index.size()) + c.self_rows, received);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Ranks, ExchangeLayoutTest, ::testing::Values(1, 2, 3, 4, 8));

}  // namespace
}  // namespace epic::parallel
