// The placement vocabulary every part of epic speaks: which logical experts each rank's
// slots hold, per MoE layer, and how evenly a placement spreads measured loads. The
// workers' routing (parallel::ExpertPlacement), the planner, the load reports and the
// coordinator all use these; nothing here depends on anything but the standard library.
#pragma once

#include <cstdint>
#include <vector>

namespace epic::placement {

// [layer][rank] -> the logical expert in each of the rank's slots. A layer whose ranks
// hold no slots is not an MoE layer.
using PlacementTable = std::vector<std::vector<std::vector<int32_t>>>;

// The default placement of LAYERS layers: rank r of NUM_RANKS holds the contiguous
// block of experts [E*r/N, E*(r+1)/N), so that contiguous routing groups stay together
// (8 groups on 8 ranks: group g on rank g), and then REDUNDANT_PER_RANK replicas of the
// experts that follow its block (cyclically, never one it holds).
PlacementTable ContiguousPlacement(int64_t layers, int64_t experts, int num_ranks, int redundant_per_rank = 0);

// Each rank's load under LOADS ([expert]) when it holds RANKS[r]'s experts: a replicated
// expert's load is shared equally by its replicas.
std::vector<double> RankLoads(const std::vector<double>& loads, const std::vector<std::vector<int32_t>>& ranks);

// How even a layer's rank loads are.
struct LayerStats {
  double max_rank_load = 0;
  double mean_rank_load = 0;
  double imbalance() const { return mean_rank_load > 0 ? max_rank_load / mean_rank_load : 1.0; }
  double balancedness() const { return max_rank_load > 0 ? mean_rank_load / max_rank_load : 1.0; }
};
LayerStats StatsOfRankLoads(const std::vector<double>& rank_loads);
// StatsOfRankLoads(RankLoads(LOADS, RANKS)).
LayerStats PlacementStats(const std::vector<double>& loads, const std::vector<std::vector<int32_t>>& ranks);

// The MoE layers of TABLE alone ([moe layer][rank][experts]), and their ids in LAYERS;
// WithAllLayers puts such a table back among NUM_LAYERS layers.
PlacementTable MoeLayers(const PlacementTable& table, std::vector<int32_t>* layers);
PlacementTable WithAllLayers(const PlacementTable& moe, const std::vector<int32_t>& layers, int64_t num_layers);

// Weights that move from CURRENT to NEXT, in expert copies (a rank gaining an expert).
int64_t ExpertsMoved(const PlacementTable& current, const PlacementTable& next);

}  // namespace epic::placement
