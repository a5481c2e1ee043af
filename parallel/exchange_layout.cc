#include "parallel/exchange_layout.h"

#include <algorithm>

namespace epic::parallel {

SlotBatches GroupBySlot(const ReceivedTokens& received, int64_t top_k, int64_t num_slots) {
  ExpertLayout layout = MakeExpertLayout(received.route, received.rows(), top_k, num_slots);
  SlotBatches b;
  b.offsets.assign(layout.offsets.begin(), layout.offsets.end());
  b.row = std::move(layout.grouped_source);
  b.weight = std::move(layout.grouped_weight);
  return b;
}

// A counting sort of the route entries by local slot: by slot, then received row, then entry.
ExpertLayout MakeExpertLayout(std::span<const RouteEntry> routes, int64_t rows, int64_t top_k, int64_t num_slots) {
  ExpertLayout layout;
  layout.row_grouped.assign(static_cast<size_t>(rows * top_k), -1);
  layout.row_weight.assign(static_cast<size_t>(rows * top_k), 0.0f);
  std::vector<int32_t>& offsets = layout.offsets;
  offsets.assign(static_cast<size_t>(num_slots + 1), 0);
  const int64_t entries = rows * top_k;
  for (int64_t i = 0; i < entries; ++i) {
    if (routes[i].slot >= 0) ++offsets[routes[i].slot + 1];
  }
  for (int64_t s = 0; s < num_slots; ++s) offsets[s + 1] += offsets[s];
  layout.grouped_source.resize(static_cast<size_t>(offsets[num_slots]));
  layout.grouped_weight.resize(static_cast<size_t>(offsets[num_slots]));
  std::vector<int32_t> fill(offsets.begin(), offsets.end() - 1);
  for (int64_t i = 0; i < entries; ++i) {
    const RouteEntry& e = routes[i];
    if (e.slot < 0) continue;
    const int32_t at = fill[e.slot]++;
    layout.grouped_source[at] = static_cast<int32_t>(i / top_k);
    layout.grouped_weight[at] = e.weight;
    layout.row_grouped[i] = at;
    layout.row_weight[i] = e.weight;
  }
  return layout;
}

CombineLayout MakeCombineLayout(const DispatchPlan& plan, std::span<const int64_t> rows_from, int rank) {
  CombineLayout c;
  const int ranks = plan.num_ranks;
  c.send_rows.assign(rows_from.begin(), rows_from.end());
  c.recv_rows = plan.send_rows;
  c.send_rows[rank] = 0;
  c.recv_rows[rank] = 0;
  int64_t received = 0;
  for (int r = 0; r < ranks; ++r) {
    if (r < rank) c.self_first += rows_from[r];
    received += rows_from[r];
  }
  c.self_rows = rows_from[rank];
  for (int64_t i = 0; i < received; ++i) {
    if (i < c.self_first || i >= c.self_first + c.self_rows) c.send_index.push_back(static_cast<int32_t>(i));
  }
  for (int r = 0; r < ranks; ++r) c.returned += c.recv_rows[r];

  // The combine buffer: returned rows in rank order, then the self block. A token was
  // sent to each rank at most once, so it has at most RANKS rows to add.
  c.sources = std::max(ranks, 1);
  c.token_source.assign(static_cast<size_t>(plan.num_tokens * c.sources), -1);
  std::vector<int32_t> used(static_cast<size_t>(plan.num_tokens), 0);
  int64_t sent = 0;      // row of the plan
  int64_t returned = 0;  // returned row
  for (int r = 0; r < ranks; ++r) {
    for (int64_t i = 0; i < plan.send_rows[r]; ++i, ++sent) {
      const int32_t token = plan.send_token[sent];
      const int64_t row = r == rank ? c.returned + i : returned++;
      c.token_source[token * c.sources + used[token]++] = static_cast<int32_t>(row);
    }
  }
  return c;
}

}  // namespace epic::parallel
