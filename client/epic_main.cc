// epic: the command-line client: `epic plan` (offline placement planner) and, when
// built with serving, the gRPC commands (generate, health, info, load, report, rebalance).
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "placement/placement_planner.h"
#include "client/text_commands.h"
#ifdef EPIC_WITH_SERVING
#include "client/client_commands.h"
#endif

namespace {

using nlohmann::json;
using epic::placement::PlacementTable;

epic::StatusOr<json> ReadJson(const std::string& path) {
  std::ifstream in(path);
  if (!in) return epic::NotFoundError(path + ": cannot open");
  try {
    return json::parse(in);
  } catch (const json::exception& e) {
    return epic::InvalidArgumentError(path + ": not valid JSON: " + e.what());
  }
}

epic::StatusOr<std::vector<std::vector<double>>> ParseLoads(const json& j, const std::string& path) {
  if (!j.is_object() || !j.contains("loads") || !j["loads"].is_array()) {
    return epic::InvalidArgumentError(path + ": expected {\"loads\": [[tokens per expert] per layer]}");
  }
  std::vector<std::vector<double>> loads;
  for (const json& layer : j["loads"]) {
    if (!layer.is_array()) return epic::InvalidArgumentError(path + ": each layer's loads must be a list");
    std::vector<double> row;
    for (const json& v : layer) {
      if (!v.is_number()) return epic::InvalidArgumentError(path + ": loads must be numbers, not " + v.dump());
      row.push_back(v.get<double>());
    }
    loads.push_back(std::move(row));
  }
  return loads;
}

epic::StatusOr<PlacementTable> ParsePlacement(const json& j, const std::string& path) {
  if (!j.is_object() || !j.contains("placement")) return epic::InvalidArgumentError(path + ": no \"placement\"");
  try {
    return j["placement"].get<PlacementTable>();
  } catch (const json::exception& e) {
    return epic::InvalidArgumentError(path + ": \"placement\" is not [layer][rank][experts]: " + e.what());
  }
}

int Fail(const epic::Status& s) {
  std::fprintf(stderr, "epic plan: %s\n", s.ToString().c_str());
  return 1;
}

int Plan(const std::string& loads_path, const std::string& current_path, const std::string& out_path,
         epic::placement::PlannerInput input) {
  auto loads_json = ReadJson(loads_path);
  if (!loads_json.ok()) return Fail(loads_json.status());
  auto loads = ParseLoads(*loads_json, loads_path);
  if (!loads.ok()) return Fail(loads.status());
  input.loads = *loads;
  const int64_t experts = input.loads.empty() ? 0 : static_cast<int64_t>(input.loads[0].size());
  PlacementTable before = epic::placement::ContiguousPlacement(static_cast<int64_t>(input.loads.size()),
                                                                  experts, input.num_ranks);
  if (!current_path.empty()) {
    auto current_json = ReadJson(current_path);
    if (!current_json.ok()) return Fail(current_json.status());
    auto current = ParsePlacement(*current_json, current_path);
    if (!current.ok()) return Fail(current.status());
    before = *current;
    input.current = &before;
  }
  auto plan = epic::placement::PlanPlacement(input);
  if (!plan.ok()) return Fail(plan.status());

  json layers = json::array();
  double max_before = 0, max_after = 0, mean_sum = 0;
  for (size_t l = 0; l < plan->size(); ++l) {
    const auto b = epic::placement::PlacementStats(input.loads[l], before[l]);
    const auto a = epic::placement::PlacementStats(input.loads[l], (*plan)[l]);
    layers.push_back({{"imbalance_before", b.imbalance()}, {"imbalance_after", a.imbalance()},
                      {"balancedness_before", b.balancedness()}, {"balancedness_after", a.balancedness()}});
    max_before += b.max_rank_load;
    max_after += a.max_rank_load;
    mean_sum += a.mean_rank_load;
  }
  json out = {{"placement", *plan},
              {"ranks", input.num_ranks},
              {"slots_per_rank", input.slots_per_rank},
              {"nodes", input.num_nodes},
              {"groups", input.num_groups},
              // Over all layers: summed max rank load over summed mean rank load.
              {"imbalance_before", mean_sum > 0 ? max_before / mean_sum : 1.0},
              {"imbalance_after", mean_sum > 0 ? max_after / mean_sum : 1.0},
              {"experts_moved", epic::placement::ExpertsMoved(before, *plan)},
              {"layers", layers}};
  std::ofstream f(out_path);
  f << out.dump(1) << "\n";
  if (!f) return Fail(epic::DataLossError(out_path + ": write failed"));
  std::fprintf(stderr, "epic plan: %zu layers, %d ranks x %d slots: imbalance %.3f -> %.3f, %lld expert copies to move\n",
               plan->size(), input.num_ranks, input.slots_per_rank, out["imbalance_before"].get<double>(),
               out["imbalance_after"].get<double>(), static_cast<long long>(out["experts_moved"].get<int64_t>()));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"epic: the epic command-line client"};
  app.require_subcommand(1);
  CLI::App* plan = app.add_subcommand(
      "plan", "plan an expert placement offline from measured loads (balance ranks, replicate hot experts)");
  std::string loads_path, current_path, out_path;
  epic::placement::PlannerInput input;
  plan->add_option("--loads", loads_path, "LOADS.json: {\"loads\": [[tokens per expert] per layer]}")->required();
  plan->add_option("--ranks", input.num_ranks, "ranks (workers)")->required()->check(CLI::PositiveNumber);
  plan->add_option("--slots-per-rank", input.slots_per_rank,
                   "expert slots per rank; ranks x slots - experts of them hold replicas of hot experts")
      ->required()->check(CLI::PositiveNumber);
  plan->add_option("--nodes", input.num_nodes, "nodes the ranks are spread over (routing groups kept within one)")
      ->capture_default_str()->check(CLI::PositiveNumber);
  plan->add_option("--groups", input.num_groups, "routing groups (config.json n_group), contiguous experts")
      ->capture_default_str()->check(CLI::PositiveNumber);
  plan->add_option("--current", current_path,
                   "PLAN.json of the placement now in use: imbalance_before refers to it, and the plan keeps "
                   "experts where they are when that costs little balance");
  plan->add_option("--out", out_path, "PLAN.json to write: \"placement\" [layer][rank][experts], imbalance "
                                      "before and after, expert copies to move")->required();
  auto text = epic::coordinator::AddTextCommands(app);
#ifdef EPIC_WITH_SERVING
  auto client = epic::coordinator::AddClientCommands(app);
#endif
  CLI11_PARSE(app, argc, argv);
  if (plan->parsed()) return Plan(loads_path, current_path, out_path, input);
  if (const int code = text(); code >= 0) return code;
#ifdef EPIC_WITH_SERVING
  if (const int code = client(); code >= 0) return code;
#endif
  return 2;
}
