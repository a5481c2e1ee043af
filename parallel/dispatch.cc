#include "parallel/dispatch.h"

#include <chrono>

namespace epic::parallel {
namespace {

using Clock = std::chrono::steady_clock;

std::vector<int64_t> Scaled(const std::vector<int64_t>& counts, int64_t bytes_each) {
  std::vector<int64_t> out(counts.size());
  for (size_t i = 0; i < counts.size(); ++i) out[i] = counts[i] * bytes_each;
  return out;
}

int64_t Sum(const std::vector<int64_t>& v) {
  int64_t s = 0;
  for (int64_t x : v) s += x;
  return s;
}

}  // namespace

int64_t ReceivedTokens::rows() const { return Sum(rows_from); }

DispatchPlan PlanDispatch(const ExpertPlacement& placement, int64_t layer, int rank,
                          const int32_t* ids, const float* weights, int64_t tokens, int64_t top_k,
                          int64_t first_token) {
  const int ranks = placement.num_ranks();
  DispatchPlan plan;
  plan.num_ranks = ranks;
  plan.num_tokens = tokens;
  plan.top_k = top_k;
  plan.send_rows.assign(static_cast<size_t>(ranks), 0);
  plan.slot_tokens.resize(static_cast<size_t>(ranks));
  for (int r = 0; r < ranks; ++r) plan.slot_tokens[r].assign(placement.slots(layer, r).size(), 0);

  // Per rank, the rows in token order; each token at most once per rank.
  std::vector<std::vector<int32_t>> rows(static_cast<size_t>(ranks));
  std::vector<std::vector<RouteEntry>> routes(static_cast<size_t>(ranks));
  std::vector<int64_t> row_of(static_cast<size_t>(ranks));  // this token's row on each rank, or -1
  for (int64_t t = 0; t < tokens; ++t) {
    std::fill(row_of.begin(), row_of.end(), -1);
    for (int64_t k = 0; k < top_k; ++k) {
      const ExpertSlot s = placement.Route(layer, ids[t * top_k + k], rank, first_token + t);
      auto& r_rows = rows[s.rank];
      auto& r_routes = routes[s.rank];
      if (row_of[s.rank] < 0) {
        row_of[s.rank] = static_cast<int64_t>(r_rows.size());
        r_rows.push_back(static_cast<int32_t>(t));
        r_routes.resize(r_routes.size() + static_cast<size_t>(top_k));
      }
      RouteEntry* entry = r_routes.data() + row_of[s.rank] * top_k;
      while (entry->slot >= 0) ++entry;  // the row's next free entry
      *entry = {s.slot, weights[t * top_k + k]};
      ++plan.slot_tokens[s.rank][s.slot];
    }
  }
  for (int r = 0; r < ranks; ++r) {
    plan.send_rows[r] = static_cast<int64_t>(rows[r].size());
    plan.send_token.insert(plan.send_token.end(), rows[r].begin(), rows[r].end());
    plan.send_route.insert(plan.send_route.end(), routes[r].begin(), routes[r].end());
  }
  return plan;
}

Status Dispatch(Communicator& comm, const DispatchPlan& plan, const float* x, int64_t hidden_size,
                ReceivedTokens* received, ExchangeStats* stats) {
  const auto start = Clock::now();
  received->rows_from.assign(static_cast<size_t>(plan.num_ranks), 0);
  EPIC_RETURN_IF_ERROR(comm.ExchangeCounts(plan.send_rows, received->rows_from));
  const int64_t recv_total = received->rows();

  // Rows go straight from X (no packed copy), each with its routes in the same exchange.
  received->hidden.resize(static_cast<size_t>(recv_total * hidden_size));
  received->route.resize(static_cast<size_t>(recv_total * plan.top_k));
  const int64_t row_bytes = hidden_size * static_cast<int64_t>(sizeof(float));
  const int64_t route_bytes = plan.top_k * static_cast<int64_t>(sizeof(RouteEntry));
  const std::vector<int64_t> send_hidden = Scaled(plan.send_rows, row_bytes);
  const std::vector<int64_t> recv_hidden = Scaled(received->rows_from, row_bytes);
  EPIC_RETURN_IF_ERROR(comm.AllToAllRowsWithTail(x, row_bytes, plan.send_token, plan.send_rows,
                                                 received->hidden.data(), received->rows_from,
                                                 plan.send_route.data(), route_bytes, received->route.data()));
  const std::vector<int64_t> send_route = Scaled(plan.send_rows, route_bytes);
  const std::vector<int64_t> recv_route = Scaled(received->rows_from, route_bytes);
  if (stats != nullptr) {
    stats->Add({Sum(send_hidden) + Sum(send_route), Sum(recv_hidden) + Sum(recv_route),
                std::chrono::duration<double>(Clock::now() - start).count()});
  }
  return OkStatus();
}

Status Combine(Communicator& comm, const DispatchPlan& plan, ReceivedTokens& received,
               const float* output, int64_t hidden_size, float* y, ExchangeStats* stats) {
  const auto start = Clock::now();
  const int64_t row_bytes = hidden_size * static_cast<int64_t>(sizeof(float));
  const int64_t send_total = static_cast<int64_t>(plan.send_token.size());
  std::vector<float>& back = received.staging;
  if (back.size() < static_cast<size_t>(send_total * hidden_size)) {
    back.resize(static_cast<size_t>(send_total * hidden_size));
  }
  // The reverse exchange: what was received goes back, what was sent returns. Rows a
  // rank served for itself skip the exchange and are added straight from OUTPUT.
  const int me = comm.rank();
  std::vector<int64_t> send_rows = received.rows_from;
  std::vector<int64_t> recv_rows = plan.send_rows;
  send_rows[me] = 0;
  recv_rows[me] = 0;
  int64_t self_rows = 0;  // OUTPUT row of the first row this rank served for itself
  for (int r = 0; r < me; ++r) self_rows += received.rows_from[r];
  std::vector<int32_t> rows;  // OUTPUT rows to send: all but the self block
  rows.reserve(static_cast<size_t>(received.rows() - received.rows_from[me]));
  for (int64_t i = 0; i < received.rows(); ++i) {
    if (i < self_rows || i >= self_rows + received.rows_from[me]) rows.push_back(static_cast<int32_t>(i));
  }
  EPIC_RETURN_IF_ERROR(comm.AllToAllRows(output, row_bytes, rows, send_rows, back.data(), recv_rows));
  const std::vector<int64_t> send_bytes = Scaled(send_rows, row_bytes);
  const std::vector<int64_t> recv_bytes = Scaled(recv_rows, row_bytes);
  auto add = [&](int64_t token, const float* src) {
    float* dst = y + token * hidden_size;
    for (int64_t j = 0; j < hidden_size; ++j) dst[j] += src[j];
  };
  int64_t sent = 0;      // row of the plan
  int64_t returned = 0;  // row of BACK
  for (int r = 0; r < plan.num_ranks; ++r) {
    for (int64_t i = 0; i < plan.send_rows[r]; ++i, ++sent) {
      if (r == me) {
        add(plan.send_token[sent], output + (self_rows + i) * hidden_size);
      } else {
        add(plan.send_token[sent], back.data() + returned++ * hidden_size);
      }
    }
  }
  if (stats != nullptr) {
    stats->Add({Sum(send_bytes), Sum(recv_bytes), std::chrono::duration<double>(Clock::now() - start).count()});
  }
  return OkStatus();
}

}  // namespace epic::parallel
