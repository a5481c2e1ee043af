#include "parallel/dispatch.h"

#include "parallel/exchange_layout.h"
#include "parallel/moe_exchange.h"

namespace epic::parallel {
namespace {

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

// The host forms over MoeExchange (the one exchange), keeping what arrived in RECEIVED.
Status Dispatch(Communicator& comm, const DispatchPlan& plan, const float* x, int64_t hidden_size,
                ReceivedTokens* received, ExchangeStats* stats) {
  HostRowSpace space;
  MoeExchange exchange(&comm, &space, comm.rank());
  EPIC_ASSIGN_OR_RETURN(const MoeHandle* h, exchange.Dispatch(plan, x, hidden_size));
  received->rows_from = h->rows_from;
  received->hidden.assign(h->rows, h->rows + h->received * hidden_size);
  received->route.assign(h->routes.begin(), h->routes.end());
  if (stats != nullptr) stats->Add(h->stats);
  return OkStatus();
}

Status Combine(Communicator& comm, const DispatchPlan& plan, ReceivedTokens& received,
               const float* output, int64_t hidden_size, float* y, ExchangeStats* stats) {
  HostRowSpace space;
  MoeExchange exchange(&comm, &space, comm.rank());
  MoeHandle h;
  h.plan = &plan;
  h.rows_from = received.rows_from;
  h.received = received.rows();
  h.back = MakeCombineLayout(plan, received.rows_from, comm.rank());
  return exchange.Combine(h, output, hidden_size, y, stats);
}

}  // namespace epic::parallel
