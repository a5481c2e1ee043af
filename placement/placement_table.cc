#include "placement/placement_table.h"

#include <algorithm>
#include <numeric>

namespace epic::placement {

PlacementTable ContiguousPlacement(int64_t layers, int64_t experts, int num_ranks, int redundant_per_rank) {
  PlacementTable t(static_cast<size_t>(layers), std::vector<std::vector<int32_t>>(num_ranks));
  for (auto& layer : t) {
    for (int r = 0; r < num_ranks; ++r) {
      const int64_t begin = experts * r / num_ranks;
      const int64_t end = experts * (r + 1) / num_ranks;
      for (int64_t e = begin; e < end; ++e) layer[r].push_back(static_cast<int32_t>(e));
      for (int64_t i = 0; i < redundant_per_rank && i < experts - (end - begin); ++i) {
        layer[r].push_back(static_cast<int32_t>((end + i) % experts));
      }
    }
  }
  return t;
}

std::vector<double> RankLoads(const std::vector<double>& loads, const std::vector<std::vector<int32_t>>& ranks) {
  std::vector<int> copies(loads.size(), 0);
  for (const auto& r : ranks) {
    for (int32_t e : r) ++copies[static_cast<size_t>(e)];
  }
  std::vector<double> out;
  out.reserve(ranks.size());
  for (const auto& r : ranks) {
    double load = 0;
    for (int32_t e : r) load += loads[static_cast<size_t>(e)] / copies[static_cast<size_t>(e)];
    out.push_back(load);
  }
  return out;
}

LayerStats StatsOfRankLoads(const std::vector<double>& rank_loads) {
  LayerStats s;
  if (rank_loads.empty()) return s;
  s.max_rank_load = *std::max_element(rank_loads.begin(), rank_loads.end());
  s.mean_rank_load = std::accumulate(rank_loads.begin(), rank_loads.end(), 0.0) / static_cast<double>(rank_loads.size());
  return s;
}

LayerStats PlacementStats(const std::vector<double>& loads, const std::vector<std::vector<int32_t>>& ranks) {
  return StatsOfRankLoads(RankLoads(loads, ranks));
}

PlacementTable MoeLayers(const PlacementTable& table, std::vector<int32_t>* layers) {
  PlacementTable moe;
  for (size_t l = 0; l < table.size(); ++l) {
    bool held = false;
    for (const auto& slots : table[l]) held = held || !slots.empty();
    if (!held) continue;
    moe.push_back(table[l]);
    if (layers) layers->push_back(static_cast<int32_t>(l));
  }
  return moe;
}

PlacementTable WithAllLayers(const PlacementTable& moe, const std::vector<int32_t>& layers, int64_t num_layers) {
  const size_t ranks = moe.empty() ? 0 : moe[0].size();
  PlacementTable table(static_cast<size_t>(num_layers), std::vector<std::vector<int32_t>>(ranks));
  for (size_t i = 0; i < moe.size() && i < layers.size(); ++i) table[static_cast<size_t>(layers[i])] = moe[i];
  return table;
}

int64_t ExpertsMoved(const PlacementTable& current, const PlacementTable& next) {
  int64_t moved = 0;
  for (size_t l = 0; l < next.size(); ++l) {
    for (size_t r = 0; r < next[l].size(); ++r) {
      const auto& now = current[l][r];
      for (int32_t e : next[l][r]) {
        if (std::find(now.begin(), now.end(), e) == now.end()) ++moved;
      }
    }
  }
  return moved;
}

}  // namespace epic::placement
