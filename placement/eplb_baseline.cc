#include "placement/eplb_baseline.h"

#include <algorithm>
#include <cstdint>
#include <numeric>

namespace epic::placement {
namespace {

// Bin of each item: heaviest first onto the lightest bin with room, BINS bins of
// items.size() / BINS items each.
std::vector<int> BalancedPacking(const std::vector<double>& weights, int bins) {
  const int64_t n = static_cast<int64_t>(weights.size());
  const int64_t capacity = n / bins;
  std::vector<int64_t> order(static_cast<size_t>(n));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return weights[a] > weights[b]; });
  std::vector<double> bin_load(static_cast<size_t>(bins), 0);
  std::vector<int64_t> bin_items(static_cast<size_t>(bins), 0);
  std::vector<int> bin_of(static_cast<size_t>(n), -1);
  for (int64_t i : order) {
    int best = -1;
    for (int b = 0; b < bins; ++b) {
      if (bin_items[b] >= capacity) continue;
      if (best < 0 || bin_load[b] < bin_load[best]) best = b;
    }
    bin_of[i] = best;
    bin_load[best] += weights[i];
    ++bin_items[best];
  }
  return bin_of;
}

// Replicates EXPERTS into PHYSICAL copies and packs them onto RANKS (global rank ids),
// writing each rank's experts into OUT.
void ReplicateAndPack(const std::vector<double>& loads, const std::vector<int32_t>& experts, int64_t physical,
                      const std::vector<int>& ranks, std::vector<std::vector<int32_t>>* out) {
  const size_t n = experts.size();
  std::vector<int> copies(n, 1);
  // Copies in creation order: every expert once, then each replica as it is added.
  std::vector<size_t> copy_of(n);
  std::iota(copy_of.begin(), copy_of.end(), 0);
  for (int64_t spare = physical - static_cast<int64_t>(n); spare > 0; --spare) {
    size_t best = 0;
    for (size_t i = 1; i < n; ++i) {
      if (loads[experts[i]] / copies[i] > loads[experts[best]] / copies[best]) best = i;
    }
    ++copies[best];
    copy_of.push_back(best);
  }
  std::vector<double> weights;
  weights.reserve(copy_of.size());
  for (size_t i : copy_of) weights.push_back(loads[experts[i]] / copies[i]);
  const std::vector<int> rank_of = BalancedPacking(weights, static_cast<int>(ranks.size()));
  for (size_t c = 0; c < copy_of.size(); ++c) (*out)[ranks[rank_of[c]]].push_back(experts[copy_of[c]]);
}

}  // namespace

PlacementTable EplbGlobal(const std::vector<std::vector<double>>& loads, int num_ranks, int slots_per_rank) {
  return EplbHierarchical(loads, num_ranks, slots_per_rank, 1, 1);
}

PlacementTable EplbHierarchical(const std::vector<std::vector<double>>& loads, int num_ranks, int slots_per_rank,
                                int num_nodes, int num_groups) {
  if (num_groups % num_nodes != 0) num_nodes = num_groups = 1;
  PlacementTable plan(loads.size(), std::vector<std::vector<int32_t>>(static_cast<size_t>(num_ranks)));
  const int per_node = num_ranks / num_nodes;
  const int64_t physical_per_node = static_cast<int64_t>(per_node) * slots_per_rank;
  for (size_t l = 0; l < loads.size(); ++l) {
    const std::vector<double>& layer = loads[l];
    const int64_t group_size = static_cast<int64_t>(layer.size()) / num_groups;
    std::vector<double> group_load(static_cast<size_t>(num_groups), 0);
    for (size_t e = 0; e < layer.size(); ++e) group_load[e / group_size] += layer[e];
    const std::vector<int> node_of = BalancedPacking(group_load, num_nodes);
    for (int k = 0; k < num_nodes; ++k) {
      std::vector<int32_t> experts;
      for (int g = 0; g < num_groups; ++g) {
        if (node_of[g] != k) continue;
        for (int64_t e = g * group_size; e < (g + 1) * group_size; ++e) experts.push_back(static_cast<int32_t>(e));
      }
      std::vector<int> ranks(static_cast<size_t>(per_node));
      std::iota(ranks.begin(), ranks.end(), k * per_node);
      ReplicateAndPack(layer, experts, physical_per_node, ranks, &plan[l]);
    }
  }
  return plan;
}

}  // namespace epic::placement
