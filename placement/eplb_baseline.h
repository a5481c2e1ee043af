// Baselines for the placement planner: plain implementations of the two policies that
// DeepSeek published with its expert-parallel load balancer (EPLB), so that epic's
// planner can be measured against them on the same loads. They return epic's
// PlacementTable, so PlacementStats and ExpertsMoved apply to them unchanged. Neither
// knows the current placement: every call plans from scratch.
//
// Both policies are built from two steps:
//  - replication: every expert starts with one copy; each spare slot in turn goes to
//    the expert whose copies carry the most load each. The number of copies is not
//    capped by the number of ranks.
//  - balanced packing: items are taken heaviest first, each onto the lightest bin that
//    still has room, every bin receiving the same number of items. Nothing stops two
//    copies of one expert from landing in the same bin, and nothing revisits a choice.
//
// EplbGlobal ignores routing groups: it replicates over all experts, then packs every
// copy (its expert's load over its copy count) onto the ranks. As published, a rank may
// end up holding two copies of one expert; that is kept here, and PlacementStats counts
// both shares on that rank.
//
// EplbHierarchical keeps each routing group within one node: it packs whole groups onto
// nodes by group load (the same number of groups per node), then, inside every node,
// replicates among that node's experts into the node's share of the slots and packs the
// copies onto the node's ranks. Replicas therefore never leave their node. As published,
// when the groups cannot be split evenly over the nodes it falls back to the global
// policy.
//
// Ties are broken by the lower index (expert, rank, node), so both are deterministic.
#pragma once

#include <vector>

#include "placement/placement_planner.h"

namespace epic::placement {

// LOADS: [layer][expert]. REQUIRES: num_ranks >= 1, num_ranks * slots_per_rank >= experts.
PlacementTable EplbGlobal(const std::vector<std::vector<double>>& loads, int num_ranks, int slots_per_rank);

// REQUIRES: as EplbGlobal; num_nodes divides num_ranks; num_groups divides the experts.
// Ranks [k * num_ranks / num_nodes, (k + 1) * num_ranks / num_nodes) form node k.
PlacementTable EplbHierarchical(const std::vector<std::vector<double>>& loads, int num_ranks, int slots_per_rank,
                                int num_nodes, int num_groups);

}  // namespace epic::placement
