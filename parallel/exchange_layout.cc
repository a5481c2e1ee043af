#include "parallel/exchange_layout.h"

#include <algorithm>

namespace epic::parallel {

namespace {

// The one grouping of received route entries by local slot (a counting sort: by slot,
// then received row, then entry), for the host's products and the device's alike.
// PLACE(entry, grouped row) is called for every entry that names a slot.
template <typename Offset, typename Place>
void GroupEntriesBySlot(std::span<const RouteEntry> routes, int64_t rows, int64_t top_k, int64_t num_slots,
                        std::vector<Offset>* offsets, std::vector<int32_t>* source, Place place) {
  offsets->assign(static_cast<size_t>(num_slots + 1), 0);
  const int64_t entries = rows * top_k;
  for (int64_t i = 0; i < entries; ++i) {
    if (routes[i].slot >= 0) ++(*offsets)[routes[i].slot + 1];
  }
  for (int64_t s = 0; s < num_slots; ++s) (*offsets)[s + 1] += (*offsets)[s];
  source->resize(static_cast<size_t>((*offsets)[num_slots]));
  std::vector<Offset> fill(offsets->begin(), offsets->end() - 1);
  for (int64_t i = 0; i < entries; ++i) {
    const RouteEntry& e = routes[i];
    if (e.slot < 0) continue;
    const Offset at = fill[e.slot]++;
    (*source)[at] = static_cast<int32_t>(i / top_k);
    place(i, at);
  }
}

}  // namespace

SlotBatches GroupBySlot(const ReceivedTokens& received, int64_t top_k, int64_t num_slots) {
  SlotBatches b;
  const std::span<const RouteEntry> routes = received.route;
  GroupEntriesBySlot(routes, received.rows(), top_k, num_slots, &b.offsets, &b.row, [&](int64_t entry, int64_t at) {
    if (b.weight.size() != b.row.size()) b.weight.resize(b.row.size());
    b.weight[at] = routes[entry].weight;
  });
  return b;
}

ExpertLayout MakeExpertLayout(std::span<const RouteEntry> routes, int64_t rows, int64_t top_k, int64_t num_slots) {
  ExpertLayout layout;
  layout.row_grouped.assign(static_cast<size_t>(rows * top_k), -1);
  layout.row_weight.assign(static_cast<size_t>(rows * top_k), 0.0f);
  GroupEntriesBySlot(routes, rows, top_k, num_slots, &layout.offsets, &layout.grouped_source,
                     [&](int64_t entry, int32_t at) {
                       layout.row_grouped[entry] = at;
                       layout.row_weight[entry] = routes[entry].weight;
                     });
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
