#include "coordinator/load_report.h"

#include <algorithm>
#include <numeric>

namespace epic::coordinator {

namespace {

using nlohmann::json;

json Side(const std::vector<std::vector<int32_t>>& placement, const std::vector<double>& rank_load) {
  const placement::LayerStats b = placement::StatsOfRankLoads(rank_load);
  return {{"placement", placement}, {"rank_load", rank_load}, {"imbalance", b.imbalance()},
          {"balancedness", b.balancedness()}};
}

}  // namespace

StatusOr<PlannedPlacement> PlanFromReport(const ReportInput& in) {
  const size_t layers = in.layers.size();
  if (in.expert_tokens.size() != layers || in.placement.size() != layers) {
    return InvalidArgumentError("load report: " + std::to_string(layers) + " layers, but loads for " +
                                std::to_string(in.expert_tokens.size()) + " and placements for " +
                                std::to_string(in.placement.size()));
  }
  if (!in.rank_tokens.empty() && in.rank_tokens.size() != layers) {
    return InvalidArgumentError("load report: measured rank loads for " + std::to_string(in.rank_tokens.size()) +
                                " layers, not " + std::to_string(layers));
  }
  if (in.num_ranks < 1) return InvalidArgumentError("load report: num_ranks must be >= 1");
  size_t experts = layers > 0 ? in.expert_tokens[0].size() : 0;
  if (!in.expert_ema.empty() && in.expert_ema.size() != layers) {
    return InvalidArgumentError("load report: moving averages for " + std::to_string(in.expert_ema.size()) +
                                " layers, not " + std::to_string(layers));
  }
  for (size_t l = 0; l < layers; ++l) {
    if (!in.rank_tokens.empty() && in.rank_tokens[l].size() != static_cast<size_t>(in.num_ranks)) {
      return InvalidArgumentError("load report: layer " + std::to_string(in.layers[l]) + " has measured loads for " +
                                  std::to_string(in.rank_tokens[l].size()) + " ranks, not " +
                                  std::to_string(in.num_ranks));
    }
    if (!in.expert_ema.empty() && in.expert_ema[l].size() != experts) {
      return InvalidArgumentError("load report: layer " + std::to_string(in.layers[l]) +
                                  " has a moving average of the wrong size");
    }
    if (in.expert_tokens[l].size() != experts || in.placement[l].size() != static_cast<size_t>(in.num_ranks)) {
      return InvalidArgumentError("load report: layer " + std::to_string(in.layers[l]) +
                                  " has loads or a placement of the wrong size");
    }
    for (const auto& slots : in.placement[l]) {
      for (int32_t e : slots) {
        if (e < 0 || static_cast<size_t>(e) >= experts) {
          return InvalidArgumentError("load report: layer " + std::to_string(in.layers[l]) + " places expert " +
                                      std::to_string(e) + " of " + std::to_string(experts));
        }
      }
    }
  }

  // The plan the coordinator would apply now, from the same loads.
  placement::PlannerInput plan_in;
  plan_in.loads = in.expert_tokens;
  plan_in.num_ranks = in.num_ranks;
  const int base_slots = static_cast<int>((experts + static_cast<size_t>(in.num_ranks) - 1) / static_cast<size_t>(in.num_ranks));
  plan_in.slots_per_rank = base_slots + std::max(0, in.redundant_slots_per_rank);
  plan_in.num_nodes = in.num_nodes;
  plan_in.num_groups = in.num_groups;
  plan_in.current = &in.placement;
  PlannedPlacement out;
  out.slots_per_rank = plan_in.slots_per_rank;
  if (layers > 0) {
    EPIC_ASSIGN_OR_RETURN(out.placement, placement::PlanPlacement(plan_in));
  }
  placement::LayerStats current, planned;
  for (size_t l = 0; l < layers; ++l) {
    const std::vector<double>& tokens = in.expert_tokens[l];
    out.current_load.push_back(in.rank_tokens.empty() ? placement::RankLoads(tokens, in.placement[l]) : in.rank_tokens[l]);
    out.planned_load.push_back(placement::RankLoads(tokens, out.placement[l]));
    const placement::LayerStats c = placement::StatsOfRankLoads(out.current_load.back());
    const placement::LayerStats p = placement::StatsOfRankLoads(out.planned_load.back());
    current.max_rank_load += c.max_rank_load;
    current.mean_rank_load += c.mean_rank_load;
    planned.max_rank_load += p.max_rank_load;
    planned.mean_rank_load += p.mean_rank_load;
    out.tokens += std::accumulate(tokens.begin(), tokens.end(), 0.0);
  }
  out.imbalance_before = current.imbalance();
  out.imbalance_after = planned.imbalance();
  out.balancedness_before = current.balancedness();
  out.balancedness_after = planned.balancedness();
  out.experts_moved = layers > 0 ? placement::ExpertsMoved(in.placement, out.placement) : 0;
  return out;
}

StatusOr<json> BuildLoadReport(const ReportInput& in) {
  EPIC_ASSIGN_OR_RETURN(const PlannedPlacement plan, PlanFromReport(in));
  const size_t layers = in.layers.size();
  const size_t experts = layers > 0 ? in.expert_tokens[0].size() : 0;
  size_t max_slots = 0;
  for (const auto& layer : in.placement) {
    for (const auto& slots : layer) max_slots = std::max(max_slots, slots.size());
  }

  json out;
  out["schema"] = "epic.load_report/1";
  out["model_type"] = in.model_type;
  out["ranks"] = in.num_ranks;
  out["experts"] = experts;
  out["slots_per_rank"] = {{"current", max_slots}, {"planned", plan.slots_per_rank}};
  out["window"] = {{"steps", in.window_steps},     {"first_step", in.first_step},
                   {"last_step", in.last_step},    {"seconds", in.window_seconds},
                   {"ema_alpha", in.ema_alpha},    {"measured", !in.rank_tokens.empty()}};
  json layer_list = json::array();
  for (size_t l = 0; l < layers; ++l) {
    const std::vector<double>& tokens = in.expert_tokens[l];
    const double sum = std::accumulate(tokens.begin(), tokens.end(), 0.0);
    std::vector<size_t> order(tokens.size());
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return tokens[a] > tokens[b]; });
    json hottest = json::array();
    for (size_t i = 0; i < std::min<size_t>(5, order.size()); ++i) {
      hottest.push_back({{"expert", order[i]}, {"tokens", tokens[order[i]]},
                         {"share", sum > 0 ? tokens[order[i]] / sum : 0.0}});
    }
    json layer = {{"layer", in.layers[l]},
                  {"expert_tokens", tokens},
                  {"current", Side(in.placement[l], plan.current_load[l])},
                  {"planned", Side(plan.placement[l], plan.planned_load[l])},
                  {"hottest", hottest}};
    if (l < in.expert_ema.size()) layer["expert_ema"] = in.expert_ema[l];
    if (l < in.rank_ema.size() && in.rank_ema[l].size() == static_cast<size_t>(in.num_ranks)) {
      layer["current"]["rank_load_ema"] = in.rank_ema[l];
    }
    layer_list.push_back(std::move(layer));
  }
  out["layers"] = std::move(layer_list);
  out["overall"] = {
      {"tokens", plan.tokens},
      {"current", {{"imbalance", plan.imbalance_before}, {"balancedness", plan.balancedness_before}}},
      {"planned", {{"imbalance", plan.imbalance_after}, {"balancedness", plan.balancedness_after}}},
      {"experts_moved", plan.experts_moved}};
  json a2a = json::array();
  for (size_t r = 0; r < in.all_to_all.size(); ++r) {
    const AllToAllTotals& t = in.all_to_all[r];
    a2a.push_back({{"rank", r},
                   {"dispatch_bytes_sent", t.dispatch_bytes_sent},
                   {"dispatch_bytes_received", t.dispatch_bytes_received},
                   {"combine_bytes_sent", t.combine_bytes_sent},
                   {"combine_bytes_received", t.combine_bytes_received},
                   {"dispatch_seconds", t.dispatch_seconds},
                   {"combine_seconds", t.combine_seconds}});
  }
  out["all_to_all"] = std::move(a2a);
  json history = json::array();
  for (const HistoryPoint& h : in.history) history.push_back({{"step", h.step}, {"imbalance", h.imbalance}});
  out["history"] = std::move(history);
  json rebalances = json::array();
  for (const RebalanceRecord& r : in.rebalances) {
    rebalances.push_back({{"step", r.step},
                          {"experts_moved", r.experts_moved},
                          {"bytes_loaded", r.bytes_loaded},
                          {"seconds", r.seconds},
                          {"imbalance_before", r.imbalance_before},
                          {"imbalance_after", r.imbalance_after}});
  }
  out["rebalances"] = std::move(rebalances);
  if (!in.cache.is_null()) out["cache"] = in.cache;
  return out;
}

StatusOr<ReportInput> ReportInputFromLoads(const json& j, int num_ranks, int redundant_slots_per_rank, int num_groups) {
  if (!j.is_object() || !j.contains("loads") || !j["loads"].is_array()) {
    return InvalidArgumentError("expected {\"loads\": [[tokens per expert] per layer]}");
  }
  if (num_ranks < 1) return InvalidArgumentError("--ranks must be >= 1");
  ReportInput in;
  in.num_ranks = num_ranks;
  in.redundant_slots_per_rank = redundant_slots_per_rank;
  in.num_groups = num_groups;
  const bool named = j.contains("layers");
  if (named && (!j["layers"].is_array() || j["layers"].size() != j["loads"].size())) {
    return InvalidArgumentError("\"layers\" must list one layer id per row of \"loads\"");
  }
  size_t experts = 0;
  for (size_t l = 0; l < j["loads"].size(); ++l) {
    const json& row = j["loads"][l];
    if (!row.is_array() || row.empty()) return InvalidArgumentError("loads[" + std::to_string(l) + "] is not a list of numbers");
    std::vector<double> tokens;
    for (const json& v : row) {
      if (!v.is_number() || v.get<double>() < 0) {
        return InvalidArgumentError("loads[" + std::to_string(l) + "] holds " + v.dump() + ", not a count >= 0");
      }
      tokens.push_back(v.get<double>());
    }
    if (l == 0) experts = tokens.size();
    if (tokens.size() != experts) return InvalidArgumentError("loads: layers have different expert counts");
    in.expert_tokens.push_back(std::move(tokens));
    int32_t id = static_cast<int32_t>(l);
    if (named) {
      if (!j["layers"][l].is_number_integer()) return InvalidArgumentError("layers[" + std::to_string(l) + "] is not an integer");
      id = j["layers"][l].get<int32_t>();
    }
    in.layers.push_back(id);
  }
  if (static_cast<size_t>(num_ranks) > experts && experts > 0) {
    return InvalidArgumentError("--ranks " + std::to_string(num_ranks) + " is more than the " +
                                std::to_string(experts) + " experts");
  }
  const placement::PlacementTable contiguous = placement::ContiguousPlacement(static_cast<int64_t>(in.layers.size()),
                                                        static_cast<int64_t>(experts), num_ranks);
  in.placement = contiguous;
  return in;
}

}  // namespace epic::coordinator
