#include "coordinator/placement_planner.h"

#include <algorithm>
#include <numeric>
#include <set>
#include <string>

namespace epic::coordinator {
namespace {

// Relative tolerance within which a rank that already holds the expert wins.
constexpr double kKeepTolerance = 0.01;

struct Item {
  int32_t expert;
  double load;  // this replica's share
};

bool Holds(const std::vector<Item>& rank, int32_t expert) {
  for (const Item& it : rank) {
    if (it.expert == expert) return true;
  }
  return false;
}

// Greedy packing leaves the most loaded rank above what a swap could fix, above all
// when there are no spare slots (every rank's slot count is fixed). Repeatedly swap
// one replica of the most loaded rank with a lighter one of another rank, taking the
// swap that lowers the larger of the two loads most, until none helps.
void Refine(std::vector<std::vector<Item>>* placed, std::vector<double>* load) {
  const size_t n = placed->size();
  for (int round = 0; round < 1000; ++round) {
    size_t top = 0;
    for (size_t r = 1; r < n; ++r) {
      if ((*load)[r] > (*load)[top]) top = r;
    }
    double best_peak = (*load)[top];
    size_t best_rank = n, best_a = 0, best_b = 0;
    for (size_t r = 0; r < n; ++r) {
      if (r == top) continue;
      const auto& other = (*placed)[r];
      for (size_t a = 0; a < (*placed)[top].size(); ++a) {
        const Item& ia = (*placed)[top][a];
        for (size_t b = 0; b < other.size(); ++b) {
          const Item& ib = other[b];
          if (ib.load >= ia.load) continue;
          const double delta = ia.load - ib.load;
          const double peak = std::max((*load)[top] - delta, (*load)[r] + delta);
          if (peak >= best_peak - 1e-12 * best_peak) continue;
          if (Holds((*placed)[top], ib.expert) || Holds(other, ia.expert)) continue;
          best_peak = peak;
          best_rank = r;
          best_a = a;
          best_b = b;
        }
      }
    }
    if (best_rank == n) return;
    Item& ia = (*placed)[top][best_a];
    Item& ib = (*placed)[best_rank][best_b];
    const double delta = ia.load - ib.load;
    (*load)[top] -= delta;
    (*load)[best_rank] += delta;
    std::swap(ia, ib);
  }
}

// Plans one layer over RANKS (global rank ids) for EXPERTS, with SLOTS per rank.
// CURRENT (may be null): [rank] -> experts it holds now.
void PlanGroup(const std::vector<double>& loads, const std::vector<int32_t>& experts,
               const std::vector<int>& ranks, int slots, const std::vector<std::vector<int32_t>>* current,
               std::vector<std::vector<int32_t>>* out) {
  const int64_t n = static_cast<int64_t>(ranks.size());
  // Replicas: each spare slot goes to the expert with the largest load per replica.
  std::vector<int> replicas(experts.size(), 1);
  int64_t spare = n * slots - static_cast<int64_t>(experts.size());
  while (spare-- > 0) {
    size_t best = experts.size();
    for (size_t i = 0; i < experts.size(); ++i) {
      if (replicas[i] >= n) continue;  // at most one copy a rank
      if (best == experts.size() || loads[experts[i]] / replicas[i] > loads[experts[best]] / replicas[best]) best = i;
    }
    if (best == experts.size()) break;
    ++replicas[best];
  }
  std::vector<Item> items;
  for (size_t i = 0; i < experts.size(); ++i) {
    for (int r = 0; r < replicas[i]; ++r) items.push_back({experts[i], loads[experts[i]] / replicas[i]});
  }
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) {
    return a.load > b.load || (a.load == b.load && a.expert < b.expert);
  });
  std::vector<double> rank_load(static_cast<size_t>(n), 0.0);
  std::vector<std::set<int32_t>> held(static_cast<size_t>(n));
  std::vector<std::vector<Item>> placed(static_cast<size_t>(n));
  double total = 0;
  for (const Item& it : items) total += it.load;
  const double tolerance = kKeepTolerance * total / static_cast<double>(n);
  for (const Item& it : items) {
    int best = -1;
    for (int r = 0; r < n; ++r) {
      if (static_cast<int>(held[r].size()) >= slots || held[r].count(it.expert)) continue;
      if (best < 0 || rank_load[r] < rank_load[best]) best = r;
    }
    if (best < 0) continue;  // cannot happen while slots suffice; PlanPlacement checks
    if (current != nullptr) {
      // Among ranks within the tolerance of the least loaded, keep the expert where it is.
      for (int r = 0; r < n; ++r) {
        if (static_cast<int>(held[r].size()) >= slots || held[r].count(it.expert)) continue;
        if (rank_load[r] > rank_load[best] + tolerance) continue;
        const auto& now = (*current)[ranks[r]];
        if (std::find(now.begin(), now.end(), it.expert) != now.end()) {
          best = r;
          break;
        }
      }
    }
    held[best].insert(it.expert);
    rank_load[best] += it.load;
    placed[best].push_back(it);
  }
  Refine(&placed, &rank_load);
  for (int r = 0; r < n; ++r) {
    for (const Item& it : placed[r]) (*out)[ranks[r]].push_back(it.expert);
  }
}

}  // namespace

LayerStats PlacementStats(const std::vector<double>& loads, const std::vector<std::vector<int32_t>>& ranks) {
  std::vector<int> copies(loads.size(), 0);
  for (const auto& r : ranks) {
    for (int32_t e : r) ++copies[e];
  }
  LayerStats s;
  double total = 0;
  for (const auto& r : ranks) {
    double load = 0;
    for (int32_t e : r) load += loads[e] / copies[e];
    s.max_rank_load = std::max(s.max_rank_load, load);
    total += load;
  }
  s.mean_rank_load = ranks.empty() ? 0 : total / static_cast<double>(ranks.size());
  return s;
}

PlacementTable ContiguousPlacement(int64_t layers, int64_t experts, int num_ranks) {
  PlacementTable t(static_cast<size_t>(layers), std::vector<std::vector<int32_t>>(num_ranks));
  for (auto& layer : t) {
    for (int r = 0; r < num_ranks; ++r) {
      for (int64_t e = experts * r / num_ranks; e < experts * (r + 1) / num_ranks; ++e) {
        layer[r].push_back(static_cast<int32_t>(e));
      }
    }
  }
  return t;
}

StatusOr<PlacementTable> PlanPlacement(const PlannerInput& in) {
  if (in.loads.empty()) return InvalidArgumentError("loads: no layers");
  const int64_t experts = static_cast<int64_t>(in.loads[0].size());
  if (experts == 0) return InvalidArgumentError("loads: layer 0 has no experts");
  for (size_t l = 0; l < in.loads.size(); ++l) {
    if (static_cast<int64_t>(in.loads[l].size()) != experts) {
      return InvalidArgumentError("loads: layer " + std::to_string(l) + " has " +
                                  std::to_string(in.loads[l].size()) + " experts, layer 0 has " +
                                  std::to_string(experts));
    }
    for (double v : in.loads[l]) {
      if (!(v >= 0)) return InvalidArgumentError("loads: layer " + std::to_string(l) + " has a negative or NaN load");
    }
  }
  if (in.num_ranks < 1) return InvalidArgumentError("ranks must be at least 1");
  if (in.num_nodes < 1 || in.num_ranks % in.num_nodes != 0) {
    return InvalidArgumentError("nodes (" + std::to_string(in.num_nodes) + ") must divide ranks (" +
                                std::to_string(in.num_ranks) + ")");
  }
  if (in.num_groups < 1 || experts % in.num_groups != 0) {
    return InvalidArgumentError("groups (" + std::to_string(in.num_groups) + ") must divide the " +
                                std::to_string(experts) + " experts");
  }
  if (static_cast<int64_t>(in.num_ranks) * in.slots_per_rank < experts) {
    return InvalidArgumentError(std::to_string(in.num_ranks) + " ranks x " + std::to_string(in.slots_per_rank) +
                                " slots cannot hold " + std::to_string(experts) + " experts");
  }
  if (in.current != nullptr && (in.current->size() != in.loads.size() ||
                                (!in.current->empty() && (*in.current)[0].size() != static_cast<size_t>(in.num_ranks)))) {
    return InvalidArgumentError("current placement does not match the layers and ranks");
  }
  const bool hierarchical = in.num_nodes > 1 && in.num_groups > 1;
  if (hierarchical && in.num_groups % in.num_nodes != 0) {
    return InvalidArgumentError("groups (" + std::to_string(in.num_groups) + ") must be a multiple of nodes (" +
                                std::to_string(in.num_nodes) + ") to keep groups whole on nodes");
  }
  const int per_node = in.num_ranks / in.num_nodes;
  const int64_t group_size = experts / in.num_groups;
  if (hierarchical && static_cast<int64_t>(per_node) * in.slots_per_rank < group_size * (in.num_groups / in.num_nodes)) {
    return InvalidArgumentError("a node's slots cannot hold its share of the groups");
  }

  PlacementTable plan(in.loads.size(), std::vector<std::vector<int32_t>>(in.num_ranks));
  for (size_t l = 0; l < in.loads.size(); ++l) {
    const std::vector<double>& loads = in.loads[l];
    const auto* current = in.current ? &(*in.current)[l] : nullptr;
    if (!hierarchical) {
      std::vector<int32_t> all(static_cast<size_t>(experts));
      std::iota(all.begin(), all.end(), 0);
      std::vector<int> ranks(static_cast<size_t>(in.num_ranks));
      std::iota(ranks.begin(), ranks.end(), 0);
      PlanGroup(loads, all, ranks, in.slots_per_rank, current, &plan[l]);
      continue;
    }
    // Groups to nodes: heaviest group first, to the lightest node with room.
    std::vector<std::pair<double, int>> groups;
    for (int g = 0; g < in.num_groups; ++g) {
      double load = 0;
      for (int64_t e = g * group_size; e < (g + 1) * group_size; ++e) load += loads[e];
      groups.push_back({load, g});
    }
    std::stable_sort(groups.begin(), groups.end(), [](const auto& a, const auto& b) {
      return a.first > b.first || (a.first == b.first && a.second < b.second);
    });
    const int groups_per_node = in.num_groups / in.num_nodes;
    std::vector<double> node_load(static_cast<size_t>(in.num_nodes), 0);
    std::vector<std::vector<int32_t>> node_experts(static_cast<size_t>(in.num_nodes));
    std::vector<int> node_groups(static_cast<size_t>(in.num_nodes), 0);
    for (const auto& [load, g] : groups) {
      int best = -1;
      for (int k = 0; k < in.num_nodes; ++k) {
        if (node_groups[k] >= groups_per_node) continue;
        if (best < 0 || node_load[k] < node_load[best]) best = k;
      }
      node_load[best] += load;
      ++node_groups[best];
      for (int64_t e = g * group_size; e < (g + 1) * group_size; ++e) node_experts[best].push_back(static_cast<int32_t>(e));
    }
    for (int k = 0; k < in.num_nodes; ++k) {
      std::sort(node_experts[k].begin(), node_experts[k].end());
      std::vector<int> ranks(static_cast<size_t>(per_node));
      std::iota(ranks.begin(), ranks.end(), k * per_node);
      PlanGroup(loads, node_experts[k], ranks, in.slots_per_rank, current, &plan[l]);
    }
  }
  return plan;
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

}  // namespace epic::coordinator
