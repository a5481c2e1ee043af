#include "placement/placement_planner.h"

#include <algorithm>
#include <functional>
#include <numeric>
#include <optional>
#include <string>

namespace epic::placement {
namespace {

// Within this share of the mean rank load, a plan that keeps experts where they are
// wins over a better balanced one that moves more.
constexpr double kKeepTolerance = 0.01;

// Splits of the spare slots packed, and of those refined besides the all-hot one (see
// PlanGroup).
constexpr int64_t kSplits = 16;
constexpr size_t kRefinedSplits = 3;

struct Item {
  int32_t expert;
  double load;  // this copy's share
};

// The ranks being filled (one node's, or all of them): the copies each holds.
struct Bins {
  explicit Bins(size_t n) : items(n), load(n, 0.0) {}
  void Add(size_t r, const Item& it) {
    items[r].push_back(it);
    load[r] += it.load;
  }
  double Peak() const { return *std::max_element(load.begin(), load.end()); }
  std::vector<std::vector<Item>> items;
  std::vector<double> load;
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
// swap that lowers the larger of the two loads most, until none helps or the most
// loaded rank is within TARGET. Given HOME ([rank] -> experts it holds now, sorted),
// the swap that adds the fewest moves comes first, and only then the largest drop.
void Refine(Bins* bins, double target = 0, const std::vector<std::vector<int32_t>>* home = nullptr) {
  const size_t n = bins->items.size();
  auto& placed = bins->items;
  auto& load = bins->load;
  auto away = [&](size_t r, int32_t e) { return !std::binary_search((*home)[r].begin(), (*home)[r].end(), e); };
  for (int round = 0; round < 1000; ++round) {
    size_t top = 0;
    for (size_t r = 1; r < n; ++r) {
      if (load[r] > load[top]) top = r;
    }
    if (load[top] <= target) return;
    double best_peak = load[top];
    int best_cost = 3;  // more than any swap adds
    size_t best_rank = n, best_a = 0, best_b = 0;
    for (size_t r = 0; r < n; ++r) {
      if (r == top) continue;
      const auto& other = placed[r];
      for (size_t a = 0; a < placed[top].size(); ++a) {
        const Item& ia = placed[top][a];
        for (size_t b = 0; b < other.size(); ++b) {
          const Item& ib = other[b];
          if (ib.load >= ia.load) continue;
          const double delta = ia.load - ib.load;
          const double peak = std::max(load[top] - delta, load[r] + delta);
          if (peak >= load[top] * (1 - 1e-12)) continue;
          const int cost = home == nullptr ? 0
                                           : away(r, ia.expert) - away(top, ia.expert) + away(top, ib.expert) -
                                                 away(r, ib.expert);
          if (cost > best_cost || (cost == best_cost && peak >= best_peak - 1e-12 * best_peak)) continue;
          if (Holds(placed[top], ib.expert) || Holds(other, ia.expert)) continue;
          best_peak = peak;
          best_cost = cost;
          best_rank = r;
          best_a = a;
          best_b = b;
        }
      }
    }
    if (best_rank == n) return;
    Item& ia = placed[top][best_a];
    Item& ib = placed[best_rank][best_b];
    const double delta = ia.load - ib.load;
    load[top] -= delta;
    load[best_rank] += delta;
    std::swap(ia, ib);
  }
}

// Puts IT on the least loaded rank with a free slot that does not hold its expert
// (HOLDING[r]: rank r holds it). When every rank with a free slot holds it already, a
// rank without it first hands one of its copies to such a rank (one always can: the
// full rank has a copy that the other, with fewer, lacks). False only if every rank
// holds the expert.
bool Place(const Item& it, int slots, std::vector<char>* holding, Bins* bins) {
  const size_t n = bins->items.size();
  size_t best = n;
  for (size_t r = 0; r < n; ++r) {
    if (static_cast<int>(bins->items[r].size()) >= slots || (*holding)[r]) continue;
    if (best == n || bins->load[r] < bins->load[best]) best = r;
  }
  if (best < n) {
    bins->Add(best, it);
    (*holding)[best] = 1;
    return true;
  }
  for (size_t full = 0; full < n; ++full) {
    if ((*holding)[full]) continue;
    for (size_t open = 0; open < n; ++open) {
      if (static_cast<int>(bins->items[open].size()) >= slots) continue;
      auto& from = bins->items[full];
      for (size_t i = 0; i < from.size(); ++i) {
        if (Holds(bins->items[open], from[i].expert)) continue;
        const Item moved = from[i];
        from.erase(from.begin() + static_cast<std::ptrdiff_t>(i));
        bins->load[full] -= moved.load;
        bins->Add(open, moved);
        bins->Add(full, it);
        (*holding)[full] = 1;
        return true;
      }
    }
  }
  return false;
}

// The copies of COUNTS ([local expert] -> copies) of EXPERTS, heaviest first; the
// copies of one expert are adjacent.
std::vector<Item> Copies(const std::vector<double>& loads, const std::vector<int32_t>& experts,
                         const std::vector<int>& counts) {
  std::vector<Item> items;
  for (size_t i = 0; i < experts.size(); ++i) {
    for (int c = 0; c < counts[i]; ++c) items.push_back({experts[i], loads[experts[i]] / counts[i]});
  }
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) {
    return a.load > b.load || (a.load == b.load && a.expert < b.expert);
  });
  return items;
}

// Heaviest first, each onto the least loaded rank with room that lacks its expert: the
// choice Place makes, from a heap of the ranks with room, by (load, rank).
bool PackFresh(const std::vector<Item>& items, int slots, Bins* bins) {
  const size_t n = bins->items.size();
  using Entry = std::pair<double, size_t>;
  const auto later = std::greater<Entry>();
  std::vector<Entry> heap;
  auto rebuild = [&] {
    heap.clear();
    for (size_t r = 0; r < n; ++r) {
      if (static_cast<int>(bins->items[r].size()) < slots) heap.push_back({bins->load[r], r});
    }
    std::make_heap(heap.begin(), heap.end(), later);
  };
  rebuild();
  std::vector<char> holding(n, 0);
  std::vector<Entry> aside;  // ranks with room that hold the current expert
  for (size_t i = 0; i < items.size(); ++i) {
    const Item& it = items[i];
    if (i > 0 && it.expert != items[i - 1].expert) std::fill(holding.begin(), holding.end(), 0);
    aside.clear();
    while (!heap.empty() && holding[heap.front().second]) {
      std::pop_heap(heap.begin(), heap.end(), later);
      aside.push_back(heap.back());
      heap.pop_back();
    }
    if (heap.empty()) {
      if (!Place(it, slots, &holding, bins)) return false;
      rebuild();
      continue;
    }
    std::pop_heap(heap.begin(), heap.end(), later);
    const size_t r = heap.back().second;
    heap.pop_back();
    bins->Add(r, it);
    holding[r] = 1;
    if (static_cast<int>(bins->items[r].size()) < slots) aside.push_back({bins->load[r], r});
    for (const Entry& e : aside) {
      heap.push_back(e);
      std::push_heap(heap.begin(), heap.end(), later);
    }
  }
  return true;
}

// Copies stay on ranks that hold their expert now (the least loaded such rank when
// there are more holders than copies); the rest are packed as fresh ones.
// NOW: [local expert] -> local ranks holding it now.
bool PackKeeping(const std::vector<Item>& items, const std::vector<int32_t>& experts,
                 const std::vector<std::vector<int>>& now, int slots, Bins* bins) {
  std::vector<Item> moving;
  for (const Item& it : items) {
    const size_t i = static_cast<size_t>(std::lower_bound(experts.begin(), experts.end(), it.expert) - experts.begin());
    int best = -1;
    for (int r : now[i]) {
      if (static_cast<int>(bins->items[r].size()) >= slots || Holds(bins->items[r], it.expert)) continue;
      if (best < 0 || bins->load[r] < bins->load[best]) best = r;
    }
    if (best < 0) {
      moving.push_back(it);
    } else {
      bins->Add(static_cast<size_t>(best), it);
    }
  }
  std::vector<char> holding(bins->items.size());
  for (const Item& it : moving) {
    for (size_t r = 0; r < holding.size(); ++r) holding[r] = Holds(bins->items[r], it.expert);
    if (!Place(it, slots, &holding, bins)) return false;
  }
  return true;
}

// A one-to-one match of N bins to N places, largest OVERLAP ([bin][place]) first, so
// that a fresh plan's interchangeable bins land where their experts already are.
std::vector<size_t> MatchByOverlap(const std::vector<std::vector<int>>& overlap) {
  const size_t n = overlap.size();
  std::vector<std::pair<size_t, size_t>> pairs;
  for (size_t b = 0; b < n; ++b) {
    for (size_t p = 0; p < n; ++p) {
      if (overlap[b][p] > 0) pairs.push_back({b, p});
    }
  }
  std::stable_sort(pairs.begin(), pairs.end(), [&](const auto& x, const auto& y) {
    return overlap[x.first][x.second] > overlap[y.first][y.second];
  });
  std::vector<size_t> place_of(n, n);
  std::vector<bool> taken(n, false);
  for (const auto& [b, p] : pairs) {
    if (place_of[b] < n || taken[p]) continue;
    place_of[b] = p;
    taken[p] = true;
  }
  size_t next = 0;
  for (size_t b = 0; b < n; ++b) {
    if (place_of[b] < n) continue;
    while (taken[next]) ++next;
    place_of[b] = next;
    taken[next] = true;
  }
  return place_of;
}

// Plans one layer over RANKS (global rank ids) for EXPERTS (ascending), with SLOTS per
// rank. CURRENT (may be null): [rank] -> experts it holds now.
//
// Replicas: the spare slots go one at a time to the expert with the most load per
// copy, which makes the largest copy as small as it can be. With many spare slots that
// leaves many copies just over half the mean rank load, two of which no rank can take;
// fewer replicas of the hot experts can pack better. So splits of the spare slots
// between the hot experts (in that order) and the coldest ones (where an extra copy
// weighs nothing) are tried, from all to the hot down, until the largest copy alone
// outweighs the best plan found.
//
// Given CURRENT, the copies first stay where they are and only the rest are placed,
// then swaps bring the plan within the tolerance of the best fresh one; failing that,
// the fresh plan's ranks (interchangeable) are matched to where their experts are.
void PlanGroup(const std::vector<double>& loads, const std::vector<int32_t>& experts, const std::vector<int>& ranks,
               int slots, const std::vector<std::vector<int32_t>>* current, std::vector<std::vector<int32_t>>* out) {
  const size_t m = experts.size();
  const size_t n = ranks.size();
  const int cap = static_cast<int>(n);  // at most one copy a rank
  const int64_t spare = static_cast<int64_t>(n) * slots - static_cast<int64_t>(m);
  double total = 0;
  for (int32_t e : experts) total += loads[e];
  const double mean = total / static_cast<double>(n);

  std::vector<size_t> hot;  // who gets each spare slot, in turn
  {
    std::vector<int> counts(m, 1);
    for (int64_t s = 0; s < spare; ++s) {
      size_t best = m;
      for (size_t i = 0; i < m; ++i) {
        if (counts[i] >= cap) continue;
        if (best == m || loads[experts[i]] / counts[i] > loads[experts[best]] / counts[best]) best = i;
      }
      if (best == m) break;
      ++counts[best];
      hot.push_back(best);
    }
  }
  std::vector<size_t> cold(m);
  std::iota(cold.begin(), cold.end(), 0);
  std::stable_sort(cold.begin(), cold.end(), [&](size_t a, size_t b) { return loads[experts[a]] < loads[experts[b]]; });

  // LEFT more copies, one each to the coldest experts in turn.
  auto fill_cold = [&](std::vector<int>* counts, int64_t left) {
    while (left > 0) {
      const int64_t before = left;
      for (size_t i : cold) {
        if (left == 0) break;
        if ((*counts)[i] >= cap) continue;
        ++(*counts)[i];
        --left;
      }
      if (left == before) break;
    }
  };
  struct Split {
    double greedy_peak;
    std::vector<int> counts;
  };
  std::vector<Split> splits;
  auto try_split = [&](std::vector<int> counts) {
    Bins bins(n);
    if (!PackFresh(Copies(loads, experts, counts), slots, &bins)) return false;
    splits.push_back({bins.Peak(), std::move(counts)});
    return bins.Peak() <= mean * (1 + 1e-12);  // no plan does better
  };
  // Up to kSplits splits, from all spare slots to the hot experts (K of them) down, are
  // packed greedily; only the few best and the all-hot one are refined, which costs far
  // more. The largest copy bounds a split's plan from below and only grows as K falls,
  // so the search stops once it reaches the best greedy plan.
  std::vector<int> counts(m, 1);
  for (size_t i : hot) ++counts[i];
  const int64_t all_hot = static_cast<int64_t>(hot.size());
  const int64_t step = std::max<int64_t>(1, (all_hot + kSplits - 1) / kSplits);
  bool done = false;
  for (int64_t k = all_hot; k >= 0 && !done; k -= step) {
    for (int64_t s = k; s < std::min(k + step, all_hot); ++s) --counts[hot[s]];
    double largest = 0;
    for (size_t i = 0; i < m; ++i) largest = std::max(largest, loads[experts[i]] / counts[i]);
    if (!splits.empty() && largest >= std::min_element(splits.begin(), splits.end(), [](const Split& x, const Split& y) {
                                        return x.greedy_peak < y.greedy_peak;
                                      })->greedy_peak) {
      break;
    }
    std::vector<int> split = counts;
    fill_cold(&split, all_hot - k);
    done = try_split(std::move(split));
  }
  std::stable_sort(splits.begin() + (splits.empty() ? 0 : 1), splits.end(),
                   [](const Split& x, const Split& y) { return x.greedy_peak < y.greedy_peak; });
  Bins best(n);
  std::vector<int> best_counts;
  double best_peak = 0;
  for (size_t c = 0; c < std::min<size_t>(splits.size(), kRefinedSplits + 1); ++c) {
    Bins bins(n);
    PackFresh(Copies(loads, experts, splits[c].counts), slots, &bins);
    Refine(&bins);
    if (best_counts.empty() || bins.Peak() < best_peak) {
      best_peak = bins.Peak();
      best = std::move(bins);
      best_counts = splits[c].counts;
    }
  }

  std::vector<size_t> rank_of(n);
  std::iota(rank_of.begin(), rank_of.end(), 0);
  if (current != nullptr) {
    std::vector<std::vector<int>> now(m);  // [local expert] -> local ranks holding it
    for (size_t r = 0; r < n; ++r) {
      for (int32_t e : (*current)[ranks[r]]) {
        const auto it = std::lower_bound(experts.begin(), experts.end(), e);
        if (it != experts.end() && *it == e) now[static_cast<size_t>(it - experts.begin())].push_back(static_cast<int>(r));
      }
    }
    // Copies a plan puts on a rank that does not hold their expert now.
    auto moves = [&](const Bins& bins) {
      int64_t moved = 0;
      for (size_t r = 0; r < n; ++r) {
        for (const Item& it : bins.items[r]) {
          const auto& holders = now[std::lower_bound(experts.begin(), experts.end(), it.expert) - experts.begin()];
          moved += std::find(holders.begin(), holders.end(), static_cast<int>(r)) == holders.end();
        }
      }
      return moved;
    };
    // Two ways to keep experts in place: with the copy counts just chosen, or with the
    // counts as they are now (trimmed or topped up, by load per copy, to the slots).
    std::vector<std::vector<int>> keep_counts = {best_counts};
    std::vector<int> as_now(m);
    int64_t total_copies = 0, now_copies = 0;
    for (size_t i = 0; i < m; ++i) {
      as_now[i] = std::clamp(static_cast<int>(now[i].size()), 1, cap);
      total_copies += best_counts[i];
      now_copies += as_now[i];
    }
    for (; now_copies < total_copies; ++now_copies) {
      size_t top = m;
      for (size_t i = 0; i < m; ++i) {
        if (as_now[i] < cap && (top == m || loads[experts[i]] / as_now[i] > loads[experts[top]] / as_now[top])) top = i;
      }
      ++as_now[top];
    }
    for (; now_copies > total_copies; --now_copies) {
      size_t low = m;
      for (size_t i = 0; i < m; ++i) {
        if (as_now[i] > 1 && (low == m || loads[experts[i]] / as_now[i] < loads[experts[low]] / as_now[low])) low = i;
      }
      --as_now[low];
    }
    if (as_now != best_counts) keep_counts.push_back(as_now);
    const double limit = best_peak + kKeepTolerance * mean;
    std::vector<std::vector<int32_t>> home(n);  // [local rank] -> experts it holds now, sorted
    for (size_t i = 0; i < m; ++i) {
      for (int r : now[i]) home[r].push_back(experts[i]);
    }
    std::optional<Bins> kept;
    int64_t kept_moves = 0;
    for (const auto& keep_count : keep_counts) {
      Bins bins(n);
      if (!PackKeeping(Copies(loads, experts, keep_count), experts, now, slots, &bins)) continue;
      // Only as many swaps as it takes to come within the tolerance.
      Refine(&bins, limit, &home);
      if (bins.Peak() > limit) continue;
      const int64_t moved = moves(bins);
      if (!kept || moved < kept_moves) {
        kept = std::move(bins);
        kept_moves = moved;
      }
    }
    if (kept) {
      best = std::move(*kept);  // its ranks are already the real ones
    } else {
      std::vector<std::vector<int>> overlap(n, std::vector<int>(n, 0));
      for (size_t b = 0; b < n; ++b) {
        for (const Item& it : best.items[b]) {
          const auto i = std::lower_bound(experts.begin(), experts.end(), it.expert) - experts.begin();
          for (int r : now[static_cast<size_t>(i)]) ++overlap[b][static_cast<size_t>(r)];
        }
      }
      rank_of = MatchByOverlap(overlap);
    }
  }
  for (size_t b = 0; b < n; ++b) {
    for (const Item& it : best.items[b]) (*out)[ranks[rank_of[b]]].push_back(it.expert);
  }
}

// Node of each routing group: heaviest group first, to the lightest node with room for
// a group. Given CURRENT, the groups stay on the nodes they lie on now, with as few
// swaps of groups as bring the nodes within the tolerance of the fresh assignment;
// failing that, the fresh assignment's nodes are matched to where their groups' copies
// already are.
std::vector<int> GroupsToNodes(const std::vector<double>& loads, int num_groups, int num_nodes, int per_node,
                               int slots, const std::vector<std::vector<int32_t>>* current) {
  const size_t group_size = loads.size() / static_cast<size_t>(num_groups);
  const int groups_per_node = num_groups / num_nodes;
  std::vector<double> group_load(static_cast<size_t>(num_groups), 0);
  for (size_t e = 0; e < loads.size(); ++e) group_load[e / group_size] += loads[e];
  std::vector<int> order(static_cast<size_t>(num_groups));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return group_load[a] > group_load[b]; });
  std::vector<int> node_of(static_cast<size_t>(num_groups), -1);
  std::vector<double> node_load(static_cast<size_t>(num_nodes), 0);
  std::vector<int> node_groups(static_cast<size_t>(num_nodes), 0);
  for (int g : order) {
    int best = -1;
    for (int k = 0; k < num_nodes; ++k) {
      if (node_groups[k] >= groups_per_node) continue;
      if (best < 0 || node_load[k] < node_load[best]) best = k;
    }
    node_of[g] = best;
    node_load[best] += group_load[g];
    ++node_groups[best];
  }
  if (current == nullptr) return node_of;

  // [group][node] -> copies of the group's experts the node holds now.
  std::vector<std::vector<int>> copies(static_cast<size_t>(num_groups), std::vector<int>(num_nodes, 0));
  for (size_t r = 0; r < current->size(); ++r) {
    for (int32_t e : (*current)[r]) {
      if (e >= 0 && static_cast<size_t>(e) < loads.size()) ++copies[e / group_size][r / per_node];
    }
  }
  std::vector<int> now(static_cast<size_t>(num_groups));
  std::vector<int> now_groups(static_cast<size_t>(num_nodes), 0);
  for (int g = 0; g < num_groups; ++g) {
    now[g] = static_cast<int>(std::max_element(copies[g].begin(), copies[g].end()) - copies[g].begin());
    ++now_groups[now[g]];
  }
  // What a node's groups force on its busiest rank: their load spread evenly, or the
  // hottest expert's share when it has a copy on as many ranks as the spare slots allow.
  std::vector<double> group_hottest(static_cast<size_t>(num_groups), 0);
  for (size_t e = 0; e < loads.size(); ++e) group_hottest[e / group_size] = std::max(group_hottest[e / group_size], loads[e]);
  const int64_t spare = static_cast<int64_t>(per_node) * slots - static_cast<int64_t>(group_size) * groups_per_node;
  const double most_copies = static_cast<double>(std::min<int64_t>(per_node, spare + 1));
  auto bound = [&](const std::vector<int>& node_of_group, int node) {
    double load = 0, hottest = 0;
    for (int g = 0; g < num_groups; ++g) {
      if (node_of_group[g] != node) continue;
      load += group_load[g];
      hottest = std::max(hottest, group_hottest[g]);
    }
    return std::max(load / per_node, hottest / most_copies);
  };
  auto peak = [&](const std::vector<int>& node_of_group) {
    double worst = 0;
    for (int k = 0; k < num_nodes; ++k) worst = std::max(worst, bound(node_of_group, k));
    return worst;
  };
  const double total = std::accumulate(group_load.begin(), group_load.end(), 0.0);
  const double target = peak(node_of) + kKeepTolerance * total / (static_cast<double>(num_nodes) * per_node);
  const bool whole = std::all_of(now_groups.begin(), now_groups.end(), [&](int c) { return c == groups_per_node; });
  // From where the groups are, swap a group of the node with the highest bound with one
  // elsewhere, the swap that lowers the larger bound of the two most, until within the
  // target.
  for (int round = 0; whole && round < num_groups; ++round) {
    int top = 0;
    for (int k = 1; k < num_nodes; ++k) {
      if (bound(now, k) > bound(now, top)) top = k;
    }
    const double top_bound = bound(now, top);
    if (top_bound <= target) return now;
    double best_peak = top_bound;
    int best_a = -1, best_b = -1;
    for (int a = 0; a < num_groups; ++a) {
      if (now[a] != top) continue;
      for (int b = 0; b < num_groups; ++b) {
        if (now[b] == top) continue;
        std::vector<int> next = now;
        std::swap(next[a], next[b]);
        const double p = std::max(bound(next, top), bound(next, now[b]));
        if (p < best_peak) {
          best_peak = p;
          best_a = a;
          best_b = b;
        }
      }
    }
    if (best_a < 0) break;
    std::swap(now[best_a], now[best_b]);
  }
  std::vector<std::vector<int>> overlap(static_cast<size_t>(num_nodes), std::vector<int>(num_nodes, 0));
  for (int g = 0; g < num_groups; ++g) {
    for (int k = 0; k < num_nodes; ++k) overlap[node_of[g]][k] += copies[g][k];
  }
  const std::vector<size_t> place = MatchByOverlap(overlap);
  for (int& k : node_of) k = static_cast<int>(place[k]);
  return node_of;
}

}  // namespace

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
  if (in.current != nullptr &&
      (in.current->size() != in.loads.size() ||
       std::any_of(in.current->begin(), in.current->end(),
                   [&](const auto& layer) { return layer.size() != static_cast<size_t>(in.num_ranks); }))) {
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
    const std::vector<int> node_of = GroupsToNodes(loads, in.num_groups, in.num_nodes, per_node, in.slots_per_rank, current);
    std::vector<std::vector<int32_t>> node_experts(static_cast<size_t>(in.num_nodes));
    for (int64_t e = 0; e < experts; ++e) node_experts[node_of[e / group_size]].push_back(static_cast<int32_t>(e));
    for (int k = 0; k < in.num_nodes; ++k) {
      std::vector<int> ranks(static_cast<size_t>(per_node));
      std::iota(ranks.begin(), ranks.end(), k * per_node);
      PlanGroup(loads, node_experts[k], ranks, in.slots_per_rank, current, &plan[l]);
    }
  }
  return plan;
}

}  // namespace epic::placement
