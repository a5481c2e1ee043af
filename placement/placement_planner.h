// The expert placement planner: from measured per-layer expert loads, which logical
// experts each rank's slots should hold. Replicates hot experts into the redundant
// slots (N * S - E of them), trying several splits of those slots between the hottest
// experts and the coldest, then packs the copies onto ranks, heaviest first, each to
// the least loaded rank with a free slot that does not hold that expert yet, and swaps
// copies off the most loaded rank while that helps. With nodes and routing groups,
// groups are first packed onto nodes whole, so that device-limited routing keeps each
// token's experts within few nodes, and replicas stay within their group's node.
// Given the current placement, copies stay where they are and groups on their nodes
// whenever the plan stays within 1% of the mean rank load of a fresh one, so that a new
// plan moves few weights. Deterministic. placement/eplb_baseline.h holds DeepSeek's
// published heuristics, against which planner_test and planner_bench measure it.
#pragma once

#include <cstdint>
#include <vector>

#include "common/status.h"
#include "placement/placement_table.h"

namespace epic::placement {

struct PlannerInput {
  std::vector<std::vector<double>> loads;  // [layer][expert] tokens (or any load measure)
  int num_ranks = 1;
  int slots_per_rank = 0;  // num_ranks * slots_per_rank >= experts
  int num_nodes = 1;       // ranks split evenly over nodes
  int num_groups = 1;      // contiguous routing groups (n_group); kept within one node
  const PlacementTable* current = nullptr;  // optional: prefer keeping experts in place
};

// INVALID_ARGUMENT naming the field for inputs that cannot be planned.
StatusOr<PlacementTable> PlanPlacement(const PlannerInput& input);

}  // namespace epic::placement
