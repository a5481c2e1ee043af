// Placement planner: balance and planning time across sizes, next to DeepSeek's
// published EPLB heuristics (placement/eplb_baseline.h) and a lower bound; then the
// experts moved when loads drift and each window is re-planned from the last plan.
//
// Loads: Zipf(s) per layer (s = 1.1 unless --zipf), experts shuffled per layer, 60
// layers x 160 experts. Sizes: 8, 16, 32, 64 ranks x 0, 8, 32, 64 redundant slots in
// all (slots per rank = (160 + spare) / ranks; sizes where that is not whole are
// skipped). Nodes of 8 ranks, 8 routing groups of 20 experts.
//
// Columns:
//  - epic, EPLB global: one pool of ranks, groups ignored.
//  - epic nodes, EPLB hier.: groups kept whole within nodes, replicas within the node
//    of their group (one node at 8 ranks, where it only orders the experts).
//  - bound: no placement can do better. Per layer, the busiest rank carries at least
//    the mean, and at least the hottest expert's load over the most copies it can have,
//    min(ranks, spare + 1); with no spare slot, that rank also holds slots - 1 other
//    experts, at least the slots - 1 lightest.
// Imbalance over the layers is sum(max rank load) / sum(mean rank load), as the load
// report's "overall" (layers run one after another, so the step waits for the busiest
// rank of each); the bound is sum(layer bound) / sum(mean) alike. Times: best of 3.
//
// --svg FILE also writes the balance table as a self-contained SVG chart.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "placement/eplb_baseline.h"
#include "placement/placement_planner.h"

namespace {

using epic::placement::PlacementTable;
using epic::placement::PlannerInput;
using Loads = std::vector<std::vector<double>>;
using Clock = std::chrono::steady_clock;

constexpr int kLayers = 60;
constexpr int kExperts = 160;
constexpr int kGroups = 8;
constexpr int kRanksPerNode = 8;

Loads Zipf(double s, uint64_t seed) {
  std::mt19937_64 rng(seed);
  Loads loads(kLayers, std::vector<double>(kExperts));
  for (auto& layer : loads) {
    std::vector<int> order(kExperts);
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), rng);
    for (int i = 0; i < kExperts; ++i) layer[order[i]] = 1e4 / std::pow(i + 1, s);
  }
  return loads;
}

// Sum over layers of the busiest rank's load.
double MaxSum(const Loads& loads, const PlacementTable& plan) {
  double sum = 0;
  for (size_t l = 0; l < loads.size(); ++l) sum += epic::placement::PlacementStats(loads[l], plan[l]).max_rank_load;
  return sum;
}

double MeanSum(const Loads& loads, int ranks) {
  double sum = 0;
  for (const auto& layer : loads) sum += std::accumulate(layer.begin(), layer.end(), 0.0) / ranks;
  return sum;
}

double BoundSum(const Loads& loads, int ranks, int spare, int slots) {
  double sum = 0;
  for (const auto& layer : loads) {
    std::vector<double> sorted = layer;
    std::sort(sorted.begin(), sorted.end());
    double busiest = sorted.back() / std::min(ranks, spare + 1);
    if (spare == 0) busiest += std::accumulate(sorted.begin(), sorted.begin() + (slots - 1), 0.0);
    sum += std::max(busiest, std::accumulate(sorted.begin(), sorted.end(), 0.0) / ranks);
  }
  return sum;
}

PlacementTable Plan(const PlannerInput& in) {
  auto plan = epic::placement::PlanPlacement(in);
  if (!plan.ok()) {
    std::fprintf(stderr, "plan failed: %s\n", plan.status().ToString().c_str());
    std::exit(1);
  }
  return std::move(*plan);
}

// Best of 3 runs, in milliseconds; the plan of the last.
double TimePlan(const PlannerInput& in, PlacementTable* plan) {
  double best = 1e30;
  for (int i = 0; i < 3; ++i) {
    const auto t0 = Clock::now();
    *plan = Plan(in);
    best = std::min(best, std::chrono::duration<double>(Clock::now() - t0).count() * 1e3);
  }
  return best;
}

struct Row {
  int ranks, spare, slots, nodes;
  double epic, global, epic_nodes, hierarchical, bound;  // imbalance
  double epic_ms, epic_nodes_ms;
};

std::vector<Row> BalanceTable(const Loads& loads) {
  std::vector<Row> rows;
  for (int ranks : {8, 16, 32, 64}) {
    for (int spare : {0, 8, 32, 64}) {
      if ((kExperts + spare) % ranks != 0) continue;
      Row row{};
      row.ranks = ranks;
      row.spare = spare;
      row.slots = (kExperts + spare) / ranks;
      row.nodes = ranks / kRanksPerNode;
      const double mean = MeanSum(loads, ranks);
      PlannerInput in;
      in.loads = loads;
      in.num_ranks = ranks;
      in.slots_per_rank = row.slots;
      PlacementTable plan;
      row.epic_ms = TimePlan(in, &plan);
      row.epic = MaxSum(loads, plan) / mean;
      in.num_nodes = row.nodes;
      in.num_groups = kGroups;
      row.epic_nodes_ms = TimePlan(in, &plan);
      row.epic_nodes = MaxSum(loads, plan) / mean;
      row.global = MaxSum(loads, epic::placement::EplbGlobal(loads, ranks, row.slots)) / mean;
      row.hierarchical =
          MaxSum(loads, epic::placement::EplbHierarchical(loads, ranks, row.slots, row.nodes, kGroups)) / mean;
      row.bound = BoundSum(loads, ranks, spare, row.slots) / mean;
      rows.push_back(row);
    }
  }
  return rows;
}

// The hot spot of each layer moves around a ring of its experts (in random order) by
// 2 positions a window; load falls as Zipf(1.0) of the distance from it.
Loads Drifting(const std::vector<std::vector<int>>& rings, int window) {
  Loads loads;
  for (const auto& ring : rings) {
    const int centre = 2 * window % kExperts;
    std::vector<double> layer(kExperts);
    for (int i = 0; i < kExperts; ++i) {
      const int d = std::min(std::abs(i - centre), kExperts - std::abs(i - centre));
      layer[ring[i]] = 1e4 / (d + 1);
    }
    loads.push_back(layer);
  }
  return loads;
}

void DriftTable() {
  constexpr int kWindows = 10;
  std::mt19937_64 rng(7);
  std::vector<std::vector<int>> rings(kLayers, std::vector<int>(kExperts));
  for (auto& ring : rings) {
    std::iota(ring.begin(), ring.end(), 0);
    std::shuffle(ring.begin(), ring.end(), rng);
  }
  std::printf("\nDrifting loads: %d windows, %d layers x %d experts, re-planned each window\n", kWindows, kLayers,
              kExperts);
  std::printf("%5s %5s %5s | %9s %9s %9s | %12s %12s %12s\n", "ranks", "spare", "nodes", "kept", "fresh", "EPLB",
              "moved kept", "moved fresh", "moved EPLB");
  struct Shape {
    int ranks, spare, nodes;
  };
  for (const Shape& sh : {Shape{8, 0, 1}, Shape{16, 32, 1}, Shape{64, 32, 1}, Shape{32, 32, 4}, Shape{64, 32, 8}}) {
    const int slots = (kExperts + sh.spare) / sh.ranks;
    PlannerInput in;
    in.num_ranks = sh.ranks;
    in.slots_per_rank = slots;
    in.num_nodes = sh.nodes;
    in.num_groups = sh.nodes > 1 ? kGroups : 1;
    auto eplb = [&](const Loads& loads) {
      return sh.nodes > 1 ? epic::placement::EplbHierarchical(loads, sh.ranks, slots, sh.nodes, kGroups)
                          : epic::placement::EplbGlobal(loads, sh.ranks, slots);
    };
    in.loads = Drifting(rings, 0);
    PlacementTable kept = Plan(in), base = eplb(in.loads);
    int64_t kept_moves = 0, fresh_moves = 0, base_moves = 0;
    double kept_max = 0, fresh_max = 0, base_max = 0, mean = 0;
    for (int w = 1; w <= kWindows; ++w) {
      in.loads = Drifting(rings, w);
      in.current = &kept;
      PlacementTable next = Plan(in);
      in.current = nullptr;
      const PlacementTable fresh = Plan(in);
      const PlacementTable next_base = eplb(in.loads);
      kept_moves += epic::placement::ExpertsMoved(kept, next);
      fresh_moves += epic::placement::ExpertsMoved(kept, fresh);
      base_moves += epic::placement::ExpertsMoved(base, next_base);
      kept_max += MaxSum(in.loads, next);
      fresh_max += MaxSum(in.loads, fresh);
      base_max += MaxSum(in.loads, next_base);
      mean += MeanSum(in.loads, sh.ranks);
      kept = std::move(next);
      base = next_base;
    }
    std::printf("%5d %5d %5d | %9.4f %9.4f %9.4f | %12lld %12lld %12lld\n", sh.ranks, sh.spare, sh.nodes,
                kept_max / mean, fresh_max / mean, base_max / mean, static_cast<long long>(kept_moves),
                static_cast<long long>(fresh_moves), static_cast<long long>(base_moves));
  }
  std::printf("(kept: planned from the previous window's plan; fresh: planned from nothing; EPLB: global, or\n"
              " hierarchical with nodes; imbalance over all windows and layers; moved: expert copies that a rank\n"
              " newly holds, summed over the windows)\n");
}

// Grouped bars, one group per (ranks, spare): imbalance on a log scale with the bound
// marked, and below it how much more imbalance each EPLB policy leaves than epic.
std::string Chart(const std::vector<Row>& rows, double zipf) {
  const double left = 60, width = 860, group_w = width / rows.size(), bar_w = group_w / 6;
  const double top1 = 50, h1 = 260, top2 = top1 + h1 + 70, h2 = 150;
  const char* colors[] = {"#1f77b4", "#aec7e8", "#d62728", "#ff9896"};
  const char* names[] = {"epic", "EPLB global", "epic, nodes of 8 ranks", "EPLB hierarchical"};
  double max_imbalance = 1;
  for (const Row& r : rows) max_imbalance = std::max({max_imbalance, r.epic, r.global, r.epic_nodes, r.hierarchical});
  const double log_top = std::log(std::ceil(max_imbalance));
  auto y1 = [&](double v) { return top1 + h1 - h1 * std::log(v) / log_top; };
  double max_gap = 1;  // percent
  for (const Row& r : rows) {
    max_gap = std::max({max_gap, 100 * (r.global / r.epic - 1), 100 * (r.hierarchical / r.epic_nodes - 1)});
  }
  max_gap = std::ceil(max_gap / 5) * 5;
  auto y2 = [&](double pct) { return top2 + h2 - h2 * std::max(0.0, pct) / max_gap; };

  std::string s;
  char buf[512];
  auto add = [&](const char* fmt, auto... args) {
    std::snprintf(buf, sizeof buf, fmt, args...);
    s += buf;
  };
  add("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%.0f\" height=\"%.0f\" font-family=\"sans-serif\" "
      "font-size=\"11\">\n",
      left + width + 20, top2 + h2 + 60);
  s += "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";
  add("<text x=\"%.0f\" y=\"18\" font-size=\"14\">Placement planner: max rank load / mean, Zipf(%.1f) loads, %d "
      "layers x %d experts (build/bench/planner_bench)</text>\n",
      left, zipf, kLayers, kExperts);
  // Legend.
  for (int i = 0; i < 4; ++i) {
    add("<rect x=\"%.0f\" y=\"28\" width=\"10\" height=\"10\" fill=\"%s\"/><text x=\"%.0f\" y=\"37\">%s</text>\n",
        left + i * 170.0, colors[i], left + i * 170.0 + 14, names[i]);
  }
  add("<line x1=\"%.0f\" y1=\"33\" x2=\"%.0f\" y2=\"33\" stroke=\"black\" stroke-width=\"2\"/>"
      "<text x=\"%.0f\" y=\"37\">lower bound</text>\n",
      left + 680.0, left + 700.0, left + 704.0);
  // Panel 1 axis: log scale, ticks at whole numbers.
  for (int t = 1; t <= std::ceil(max_imbalance); ++t) {
    if (t > 2 && t % 2 == 1 && std::ceil(max_imbalance) > 5) continue;
    add("<line x1=\"%.0f\" y1=\"%.1f\" x2=\"%.0f\" y2=\"%.1f\" stroke=\"#ddd\"/><text x=\"%.0f\" y=\"%.1f\" "
        "text-anchor=\"end\">%d</text>\n",
        left, y1(t), left + width, y1(t), left - 6, y1(t) + 4, t);
  }
  add("<text x=\"14\" y=\"%.0f\" transform=\"rotate(-90 14 %.0f)\" text-anchor=\"middle\">imbalance (log)</text>\n",
      top1 + h1 / 2, top1 + h1 / 2);
  for (size_t g = 0; g < rows.size(); ++g) {
    const Row& r = rows[g];
    const double x0 = left + g * group_w + bar_w;
    const double values[] = {r.epic, r.global, r.epic_nodes, r.hierarchical};
    for (int i = 0; i < 4; ++i) {
      add("<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" fill=\"%s\"><title>%s: %.4f</title></rect>\n",
          x0 + i * bar_w, y1(values[i]), bar_w - 1, top1 + h1 - y1(values[i]), colors[i], names[i], values[i]);
    }
    add("<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"black\" stroke-width=\"2\"><title>bound: "
        "%.4f</title></line>\n",
        x0 - 2, y1(r.bound), x0 + 4 * bar_w + 1, y1(r.bound), r.bound);
    add("<text x=\"%.1f\" y=\"%.0f\" text-anchor=\"middle\">%d ranks</text>\n", x0 + 2 * bar_w, top1 + h1 + 14, r.ranks);
    add("<text x=\"%.1f\" y=\"%.0f\" text-anchor=\"middle\">%d spare</text>\n", x0 + 2 * bar_w, top1 + h1 + 27, r.spare);
  }
  // Panel 2: EPLB's extra imbalance over epic's, in percent.
  add("<text x=\"%.0f\" y=\"%.0f\" font-size=\"13\">How much more imbalance EPLB leaves: EPLB / epic - 1 "
      "(global vs epic; hierarchical vs epic with nodes)</text>\n",
      left, top2 - 12);
  for (double t = 0; t <= max_gap + 1e-9; t += max_gap / 5) {
    add("<line x1=\"%.0f\" y1=\"%.1f\" x2=\"%.0f\" y2=\"%.1f\" stroke=\"#ddd\"/><text x=\"%.0f\" y=\"%.1f\" "
        "text-anchor=\"end\">%.0f%%</text>\n",
        left, y2(t), left + width, y2(t), left - 6, y2(t) + 4, t);
  }
  for (size_t g = 0; g < rows.size(); ++g) {
    const Row& r = rows[g];
    const double x0 = left + g * group_w + bar_w;
    const double gaps[] = {100 * (r.global / r.epic - 1), 100 * (r.hierarchical / r.epic_nodes - 1)};
    const int color_of[] = {1, 3};
    for (int i = 0; i < 2; ++i) {
      add("<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" fill=\"%s\"><title>%s: %+.2f%%</title></rect>\n",
          x0 + (2 * i + 0.5) * bar_w, y2(gaps[i]), 1.5 * bar_w, top2 + h2 - y2(gaps[i]), colors[color_of[i]],
          names[color_of[i]], gaps[i]);
      add("<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\" font-size=\"9\">%.1f</text>\n",
          x0 + (2 * i + 1.25) * bar_w, y2(gaps[i]) - 3, gaps[i]);
    }
    add("<text x=\"%.1f\" y=\"%.0f\" text-anchor=\"middle\">%d/%d</text>\n", x0 + 2 * bar_w, top2 + h2 + 14, r.ranks,
        r.spare);
  }
  add("<text x=\"%.0f\" y=\"%.0f\">ranks/spare slots; the figure over each bar in %%, a negative one (no bar) "
      "where EPLB balances better.</text>\n",
      left, top2 + h2 + 34);
  s += "</svg>\n";
  return s;
}

}  // namespace

int main(int argc, char** argv) {
  const char* svg = nullptr;
  double zipf = 1.1;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--svg") == 0 && i + 1 < argc) {
      svg = argv[++i];
    } else if (std::strcmp(argv[i], "--zipf") == 0 && i + 1 < argc) {
      zipf = std::atof(argv[++i]);
    } else {
      std::fprintf(stderr, "usage: %s [--svg FILE] [--zipf S]\n", argv[0]);
      return 2;
    }
  }
  const Loads loads = Zipf(zipf, 42);
  const std::vector<Row> rows = BalanceTable(loads);
  std::printf("Zipf(%.2f) loads, %d layers x %d experts; imbalance = sum(max rank load) / sum(mean); "
              "lower is better\n",
              zipf, kLayers, kExperts);
  std::printf("%5s %5s %5s %5s | %8s %8s | %8s %8s | %8s | %9s %9s\n", "ranks", "spare", "slots", "nodes", "epic",
              "EPLB glb", "epic nod", "EPLB hie", "bound", "epic ms", "nodes ms");
  for (const Row& r : rows) {
    std::printf("%5d %5d %5d %5d | %8.4f %8.4f | %8.4f %8.4f | %8.4f | %9.2f %9.2f\n", r.ranks, r.spare, r.slots,
                r.nodes, r.epic, r.global, r.epic_nodes, r.hierarchical, r.bound, r.epic_ms, r.epic_nodes_ms);
  }
  std::printf("(spare: redundant slots in all; nodes of %d ranks with %d routing groups kept whole on a node; "
              "bound: no placement does better; ms: epic planning all %d layers, best of 3)\n",
              kRanksPerNode, kGroups, kLayers);
  DriftTable();
  if (svg != nullptr) {
    FILE* f = std::fopen(svg, "w");
    if (f == nullptr) {
      std::perror(svg);
      return 1;
    }
    const std::string chart = Chart(rows, zipf);
    std::fwrite(chart.data(), 1, chart.size(), f);
    std::fclose(f);
    std::printf("chart written to %s\n", svg);
  }
  return 0;
}
