// The index lists a device step needs around an MoE exchange, worked out on the host
// from the dispatch plan and the routes that arrived: what GroupBySlot and Combine do
// with host rows, expressed as gathers and per-row weighted sums, so that the rows
// themselves stay on the GPU and no two threads ever add into one row. GroupBySlot and
// MakeExpertLayout share one grouping (exchange_layout.cc).
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "parallel/dispatch.h"

namespace epic::parallel {

// Received rows regrouped by local slot for one product per expert, and the way back.
struct ExpertLayout {
  std::vector<int32_t> offsets;         // [slots + 1] grouped rows of each slot (GroupBySlot's offsets)
  std::vector<int32_t> grouped_source;  // [grouped rows] the received row each grouped row copies
  std::vector<float> grouped_weight;    // [grouped rows] its gate weight
  std::vector<int32_t> row_grouped;     // [rows, top_k] each route entry's grouped row; -1 for pads
  std::vector<float> row_weight;        // [rows, top_k] each route entry's gate weight; 0 for pads
};

// ROUTES: [rows, top_k] as Dispatch delivers them. Grouped rows are in GroupBySlot's
// order (by slot, then received row, then entry), so the products see the same rows as
// the host path does.
ExpertLayout MakeExpertLayout(std::span<const RouteEntry> routes, int64_t rows, int64_t top_k, int64_t num_slots);

// Combine on the device: every received row's output goes back to its sender (the
// rows this rank served for itself stay), and each local token adds the rows it gets
// back, in rank order.
struct CombineLayout {
  std::vector<int32_t> send_index;   // OUTPUT rows to send, all but the self block, in order
  std::vector<int64_t> send_rows;    // [rank] rows sent back to each rank (0 for this one)
  std::vector<int64_t> recv_rows;    // [rank] rows returned by each rank (0 for this one)
  int64_t returned = 0;              // rows arriving back: they land first in the combine buffer
  int64_t self_first = 0;            // OUTPUT's first row this rank served for itself
  int64_t self_rows = 0;             // ... and how many: copied after the returned rows
  int64_t sources = 0;               // per token, at most this many rows to add (the ranks)
  std::vector<int32_t> token_source; // [tokens, sources] combine-buffer rows per token; -1 pads
};

// PLAN: this rank's dispatch; ROWS_FROM: what Dispatch received from each rank.
CombineLayout MakeCombineLayout(const DispatchPlan& plan, std::span<const int64_t> rows_from, int rank);

}  // namespace epic::parallel
