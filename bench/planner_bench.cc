// Placement planner: imbalance (max rank load / mean) and planning time across sizes,
// beside a baseline of the published EPLB heuristics written plainly here (replicate
// the expert with the most load per replica, then pack replicas heaviest first onto
// the lightest rank with a free slot; with nodes, whole groups onto nodes first) and
// the lower bound max(mean rank load, hottest expert / most copies it can have).
// Loads: Zipf(1.1) per layer, shuffled, 60 layers x 160 experts.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <random>
#include <vector>

#include "coordinator/placement_planner.h"

namespace {

using epic::coordinator::PlacementTable;
using Clock = std::chrono::steady_clock;

// EPLB's global policy: replicate, then balanced packing (no check for two copies of
// one expert on a rank, no refinement).
std::vector<std::vector<int32_t>> Baseline(const std::vector<double>& loads, int ranks, int slots) {
  const int experts = static_cast<int>(loads.size());
  std::vector<int> copies(experts, 1);
  for (int spare = ranks * slots - experts; spare > 0; --spare) {
    int best = 0;
    for (int e = 1; e < experts; ++e) {
      if (loads[e] / copies[e] > loads[best] / copies[best]) best = e;
    }
    ++copies[best];
  }
  std::vector<std::pair<double, int>> items;
  for (int e = 0; e < experts; ++e) {
    for (int c = 0; c < copies[e]; ++c) items.push_back({loads[e] / copies[e], e});
  }
  std::stable_sort(items.begin(), items.end(), [](auto& a, auto& b) { return a.first > b.first; });
  std::vector<double> load(ranks, 0);
  std::vector<std::vector<int32_t>> out(ranks);
  for (const auto& [w, e] : items) {
    int best = -1;
    for (int r = 0; r < ranks; ++r) {
      if (static_cast<int>(out[r].size()) < slots && (best < 0 || load[r] < load[best])) best = r;
    }
    load[best] += w;
    out[best].push_back(e);
  }
  return out;
}

double RankImbalance(const std::vector<double>& loads, const std::vector<std::vector<int32_t>>& ranks) {
  // Load of a copy: its expert's load over the expert's number of copies.
  std::vector<int> copies(loads.size(), 0);
  for (const auto& r : ranks) for (int32_t e : r) ++copies[e];
  double max = 0, total = 0;
  for (const auto& r : ranks) {
    double l = 0;
    for (int32_t e : r) l += loads[e] / copies[e];
    max = std::max(max, l);
    total += l;
  }
  return max / (total / ranks.size());
}

}  // namespace

int main() {
  const int layers = 60, experts = 160;
  std::mt19937_64 rng(42);
  std::vector<std::vector<double>> loads(layers, std::vector<double>(experts));
  for (auto& layer : loads) {
    std::vector<int> order(experts);
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), rng);
    for (int i = 0; i < experts; ++i) layer[order[i]] = 1e4 / std::pow(i + 1, 1.1);
  }
  std::printf("%6s %6s %10s | %9s %9s %9s | %9s\n", "ranks", "spare", "slots/rank", "epic", "baseline",
              "bound", "epic ms");
  for (int ranks : {8, 16, 32, 64}) {
    for (int spare : {0, 16, 32, 64}) {
      if ((experts + spare) % ranks != 0) continue;
      const int slots = (experts + spare) / ranks;
      epic::coordinator::PlannerInput in;
      in.loads = loads;
      in.num_ranks = ranks;
      in.slots_per_rank = slots;
      const auto t0 = Clock::now();
      auto plan = epic::coordinator::PlanPlacement(in);
      const double ms = std::chrono::duration<double>(Clock::now() - t0).count() * 1e3;
      if (!plan.ok()) {
        std::printf("plan failed: %s\n", plan.status().ToString().c_str());
        return 1;
      }
      double ours = 0, base = 0, bound = 0;
      for (int l = 0; l < layers; ++l) {
        ours += RankImbalance(loads[l], (*plan)[l]);
        base += RankImbalance(loads[l], Baseline(loads[l], ranks, slots));
        const double total = std::accumulate(loads[l].begin(), loads[l].end(), 0.0);
        const double hottest = *std::max_element(loads[l].begin(), loads[l].end());
        bound += std::max(1.0, hottest / std::min(ranks, spare + 1) / (total / ranks));
      }
      std::printf("%6d %6d %10d | %9.3f %9.3f %9.3f | %9.2f\n", ranks, spare, slots, ours / layers, base / layers,
                  bound / layers, ms);
    }
  }
  std::printf("(imbalance = max rank load / mean, averaged over 60 layers; lower is better; "
              "bound: no plan can do better)\n");
  return 0;
}
