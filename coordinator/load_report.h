// Load-balance reports: what the experts and ranks carried over a window of steps, how
// uneven it was, and what the planner would do about it. One JSON document (schema
// "epic.load_report/1", docs/load_balance.md), built here from measured statistics
// (the coordinator) or from a loads file (offline); rendered as text or HTML by
// client/report_render.h.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/status.h"
#include "placement/placement_planner.h"
#include "placement/placement_table.h"

namespace epic::coordinator {

struct AllToAllTotals {
  double dispatch_bytes_sent = 0, dispatch_bytes_received = 0;
  double combine_bytes_sent = 0, combine_bytes_received = 0;
  double dispatch_seconds = 0, combine_seconds = 0;
};

struct HistoryPoint {
  int64_t step = 0;
  double imbalance = 1;  // max/mean rank load of that step, summed over layers
};

struct RebalanceRecord {
  int64_t step = 0;
  int64_t experts_moved = 0;
  int64_t bytes_loaded = 0;
  double seconds = 0;
  double imbalance_before = 1;
  double imbalance_after = 1;  // predicted when applied
};

struct ReportInput {
  std::string model_type;
  int num_ranks = 1;
  int num_groups = 1;  // routing groups (n_group)
  int num_nodes = 1;
  std::vector<int32_t> layers;                    // the MoE layers' indices
  std::vector<std::vector<double>> expert_tokens; // [moe layer][expert]: over the window
  std::vector<std::vector<double>> expert_ema;    // [moe layer][expert]; empty: none kept
  // [moe layer][rank] tokens the rank's slots ran, as measured; empty: predicted from
  // the placement (a replicated expert's tokens split evenly among its replicas).
  std::vector<std::vector<double>> rank_tokens;
  std::vector<std::vector<double>> rank_ema;      // [moe layer][rank]: moving average; empty: none kept
  placement::PlacementTable placement;                       // [moe layer][rank][experts]: current
  int redundant_slots_per_rank = 0;               // for the planned placement
  std::vector<AllToAllTotals> all_to_all;         // [rank]; empty: not measured
  std::vector<HistoryPoint> history;
  std::vector<RebalanceRecord> rebalances;
  int64_t window_steps = 0, first_step = 0, last_step = 0;
  double window_seconds = 0;
  double ema_alpha = 0;
  nlohmann::json cache;  // the report's "cache" section (CacheReport); null: none (offline)
};

// What the planner would do now with a report's input, and what it predicts: the one
// computation behind the report's "planned" side and the coordinator's rebalancing.
struct PlannedPlacement {
  placement::PlacementTable placement;                      // [moe layer][rank][experts]
  int slots_per_rank = 0;
  std::vector<std::vector<double>> current_load;  // [moe layer][rank]: measured, or predicted
  std::vector<std::vector<double>> planned_load;  // [moe layer][rank]: predicted
  double tokens = 0;                              // over the window, all MoE layers
  double imbalance_before = 1, imbalance_after = 1;        // Σ max / Σ mean rank load
  double balancedness_before = 1, balancedness_after = 1;  // Σ mean / Σ max
  int64_t experts_moved = 0;                      // expert copies ranks newly hold
};
// INVALID_ARGUMENT when the input's shapes disagree.
StatusOr<PlannedPlacement> PlanFromReport(const ReportInput& input);

// The report. INVALID_ARGUMENT when the input's shapes disagree.
StatusOr<nlohmann::json> BuildLoadReport(const ReportInput& input);

// ReportInput from a loads file ({"loads": [[tokens per expert] per layer], optional
// "layers": [ids]}, as `epic-run --loads-out` writes): the current placement is the
// contiguous one over NUM_RANKS.
StatusOr<ReportInput> ReportInputFromLoads(const nlohmann::json& loads, int num_ranks, int redundant_slots_per_rank,
                                           int num_groups);

}  // namespace epic::coordinator
