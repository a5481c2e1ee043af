// Load reports: the numbers BuildLoadReport computes, checked against hand-computed
// ones; the schema docs/load_balance.md promises; and the text and HTML renderers,
// including on documents that do not follow the schema.
#include <algorithm>
#include <cmath>
#include <fstream>
#include <random>
#include <regex>
#include <set>
#include <sstream>

#include <gtest/gtest.h>

#include "coordinator/load_report.h"
#include "client/report_render.h"
#include "tests/placement/zipf_loads.h"

namespace epic::coordinator {
namespace {

using placement::ContiguousPlacement;
using placement::ZipfLoads;

using nlohmann::json;

// Two layers (ids 7 and 12), four experts, two ranks, contiguous placement:
// rank 0 holds experts {0, 1}, rank 1 holds {2, 3}.
//   layer 7:  tokens [10, 30, 40, 20] -> rank loads [40, 60]: max 60, mean 50
//   layer 12: tokens [5, 5, 0, 50]    -> rank loads [10, 50]: max 50, mean 30
ReportInput SmallInput() {
  ReportInput in;
  in.model_type = "deepseek_v2";
  in.num_ranks = 2;
  in.layers = {7, 12};
  in.expert_tokens = {{10, 30, 40, 20}, {5, 5, 0, 50}};
  in.placement = ContiguousPlacement(2, 4, 2);
  return in;
}

// Rank loads of PLACEMENT, a replicated expert's tokens split evenly among its copies;
// written out here rather than taken from the planner so that the test checks it.
std::vector<double> RankLoads(const std::vector<double>& tokens, const std::vector<std::vector<int32_t>>& placement) {
  std::vector<int> copies(tokens.size(), 0);
  for (const auto& rank : placement) {
    for (int32_t e : rank) ++copies[e];
  }
  std::vector<double> out;
  for (const auto& rank : placement) {
    double sum = 0;
    for (int32_t e : rank) sum += tokens[e] / copies[e];
    out.push_back(sum);
  }
  return out;
}

double Max(const std::vector<double>& v) { return *std::max_element(v.begin(), v.end()); }
double Mean(const std::vector<double>& v) {
  double sum = 0;
  for (double x : v) sum += x;
  return sum / static_cast<double>(v.size());
}

std::vector<std::vector<double>> Zipf(int layers, int experts, double s, uint64_t seed) {
  return ZipfLoads(layers, experts, s, seed, 20000.0, /*whole=*/true);
}

json Build(const ReportInput& in) {
  auto report = BuildLoadReport(in);
  EXPECT_TRUE(report.ok()) << report.status().ToString();
  return report.ok() ? *report : json();
}

// A report with every optional section filled: EMA, all-to-all, history, rebalances.
json FullReport() {
  ReportInput in = SmallInput();
  in.expert_ema = {{0.5, 1.5, 2, 1}, {0.25, 0.25, 0, 2.5}};
  in.rank_ema = {{4.5, 5.5}, {2.5, 3.5}};
  in.rank_tokens = {{45, 55}, {25, 35}};
  in.all_to_all = {{1048576, 2097152, 1048576, 1048576, 0.25, 0.125}, {524288, 524288, 524288, 524288, 0.5, 0.375}};
  in.history = {{101, 1.62}, {102, 1.55}, {103, 1.48}, {104, 1.12}, {105, 1.10}};
  in.rebalances = {{103, 3, 6291456, 0.2, 1.5, 1.1}};
  in.window_steps = 5;
  in.first_step = 101;
  in.last_step = 105;
  in.window_seconds = 0.75;
  in.ema_alpha = 0.05;
  // A model of 8 heads of 32 + 16 (keys) and 32 (values), latent 64 + 16, BF16 rows:
  // latent 80 values against MHA's 8 x 80 = 640; 1024 latent tokens a rank, 4 ranks.
  auto form = [](const char* name, int kv_heads, int bytes, double fraction, int tokens) {
    return json{{"attention", name},    {"kv_heads", kv_heads},           {"bytes_per_token_per_layer", bytes},
                {"fraction_of_mha", fraction}, {"tokens_per_rank", tokens}, {"cluster_tokens_tp", tokens},
                {"cluster_tokens_dp", 4 * tokens}};
  };
  in.cache = {{"attention", "dp"},
              {"ranks", 4},
              {"block_size", 16},
              {"blocks_per_rank", 64},
              {"blocks_in_use", 10},
              {"blocks_total", 256},
              {"bytes_per_value", 2},
              {"budget_bytes_per_rank", 1024 * 2 * 80 * 2},
              {"forms", {form("MLA latent", 0, 160, 0.125, 1024), form("MHA", 8, 1280, 1.0, 128),
                         form("GQA (4 KV heads)", 4, 640, 0.5, 256), form("MQA", 1, 160, 0.125, 1024)}}};
  return Build(in);
}

TEST(LoadReportTest, HandComputedImbalanceAndHottest) {
  const json r = Build(SmallInput());
  EXPECT_EQ(r["schema"], "epic.load_report/1");
  EXPECT_EQ(r["ranks"], 2);
  EXPECT_EQ(r["experts"], 4);
  EXPECT_EQ(r["slots_per_rank"]["current"], 2);
  EXPECT_EQ(r["slots_per_rank"]["planned"], 2);
  EXPECT_FALSE(r["window"]["measured"].get<bool>());
  ASSERT_EQ(r["layers"].size(), 2u);
  EXPECT_EQ(r["layers"][0]["layer"], 7);
  EXPECT_EQ(r["layers"][1]["layer"], 12);
  EXPECT_FALSE(r["layers"][0].contains("expert_ema"));

  const json& a = r["layers"][0];
  EXPECT_EQ(a["current"]["rank_load"], json({40.0, 60.0}));
  EXPECT_NEAR(a["current"]["imbalance"].get<double>(), 60.0 / 50.0, 1e-12);
  EXPECT_NEAR(a["current"]["balancedness"].get<double>(), 50.0 / 60.0, 1e-12);
  const json& b = r["layers"][1];
  EXPECT_EQ(b["current"]["rank_load"], json({10.0, 50.0}));
  EXPECT_NEAR(b["current"]["imbalance"].get<double>(), 50.0 / 30.0, 1e-12);
  EXPECT_NEAR(b["current"]["balancedness"].get<double>(), 30.0 / 50.0, 1e-12);
  // Σ max / Σ mean (1.375), not the mean of the per-layer ratios (1.433).
  EXPECT_NEAR(r["overall"]["current"]["imbalance"].get<double>(), (60.0 + 50.0) / (50.0 + 30.0), 1e-12);
  EXPECT_NEAR(r["overall"]["current"]["balancedness"].get<double>(), (50.0 + 30.0) / (60.0 + 50.0), 1e-12);
  EXPECT_DOUBLE_EQ(r["overall"]["tokens"].get<double>(), 160.0);

  // Hottest first, shares of the layer's tokens; a tie keeps the lower expert first.
  ASSERT_EQ(a["hottest"].size(), 4u);
  const int64_t order_a[] = {2, 1, 3, 0};
  const double share_a[] = {0.4, 0.3, 0.2, 0.1};
  for (size_t i = 0; i < 4; ++i) {
    EXPECT_EQ(a["hottest"][i]["expert"], order_a[i]) << i;
    EXPECT_NEAR(a["hottest"][i]["share"].get<double>(), share_a[i], 1e-12) << i;
  }
  EXPECT_DOUBLE_EQ(a["hottest"][0]["tokens"].get<double>(), 40.0);
  const int64_t order_b[] = {3, 0, 1, 2};
  for (size_t i = 0; i < 4; ++i) EXPECT_EQ(b["hottest"][i]["expert"], order_b[i]) << i;
  EXPECT_NEAR(b["hottest"][0]["share"].get<double>(), 50.0 / 60.0, 1e-12);

  // The planned side: its rank loads follow from its placement, and the best split of
  // layer 7 into two pairs is exactly even.
  double max_sum = 0, mean_sum = 0;
  for (size_t l = 0; l < 2; ++l) {
    const json& planned = r["layers"][l]["planned"];
    const auto placement = planned["placement"].get<std::vector<std::vector<int32_t>>>();
    const std::vector<double> loads = RankLoads(r["layers"][l]["expert_tokens"].get<std::vector<double>>(), placement);
    EXPECT_EQ(planned["rank_load"].get<std::vector<double>>(), loads) << "layer " << l;
    EXPECT_NEAR(planned["imbalance"].get<double>(), Max(loads) / Mean(loads), 1e-12);
    max_sum += Max(loads);
    mean_sum += Mean(loads);
  }
  EXPECT_NEAR(a["planned"]["imbalance"].get<double>(), 1.0, 1e-12);
  EXPECT_NEAR(r["overall"]["planned"]["imbalance"].get<double>(), max_sum / mean_sum, 1e-12);
}

// Expert copies ranks would newly hold, counted here from the two placements.
int64_t CountMoved(const json& report) {
  int64_t moved = 0;
  for (const json& layer : report["layers"]) {
    const auto now = layer["current"]["placement"].get<std::vector<std::vector<int32_t>>>();
    const auto next = layer["planned"]["placement"].get<std::vector<std::vector<int32_t>>>();
    for (size_t r = 0; r < next.size(); ++r) {
      const std::set<int32_t> held(now[r].begin(), now[r].end());
      for (int32_t e : next[r]) moved += held.count(e) == 0;
    }
  }
  return moved;
}

TEST(LoadReportTest, ExpertsMovedCountsNewCopiesAndNothingWhenAlreadyPlanned) {
  ReportInput in = SmallInput();
  in.redundant_slots_per_rank = 1;  // one replica slot each: 6 slots for 4 experts
  const json r = Build(in);
  EXPECT_EQ(r["slots_per_rank"]["planned"], 3);
  EXPECT_EQ(r["overall"]["experts_moved"].get<int64_t>(), CountMoved(r));
  EXPECT_GT(r["overall"]["experts_moved"].get<int64_t>(), 0);  // the replicas at least
  // Layer 12 cannot be balanced without a replica of its hot expert 3; with one it can.
  EXPECT_LT(r["layers"][1]["planned"]["imbalance"].get<double>(), 1.2);
  int copies_of_3 = 0;
  for (const json& rank : r["layers"][1]["planned"]["placement"]) {
    copies_of_3 += static_cast<int>(std::count(rank.begin(), rank.end(), json(3)));
  }
  EXPECT_EQ(copies_of_3, 2);

  // Planning again from the planned placement moves nothing.
  ReportInput again = in;
  again.placement.clear();
  for (const json& layer : r["layers"]) {
    again.placement.push_back(layer["planned"]["placement"].get<std::vector<std::vector<int32_t>>>());
  }
  const json r2 = Build(again);
  EXPECT_EQ(r2["overall"]["experts_moved"], 0);
  EXPECT_EQ(r2["slots_per_rank"]["current"], 3);
  EXPECT_NEAR(r2["overall"]["current"]["imbalance"].get<double>(),
              r["overall"]["planned"]["imbalance"].get<double>(), 1e-12);
}

TEST(LoadReportTest, MeasuredRankTokensAreTheCurrentSide) {
  ReportInput in = SmallInput();
  in.rank_tokens = {{70, 30}, {55, 45}};  // not what the placement predicts
  const json r = Build(in);
  EXPECT_TRUE(r["window"]["measured"].get<bool>());
  EXPECT_EQ(r["layers"][0]["current"]["rank_load"], json({70.0, 30.0}));
  EXPECT_NEAR(r["layers"][0]["current"]["imbalance"].get<double>(), 70.0 / 50.0, 1e-12);
  EXPECT_NEAR(r["layers"][1]["current"]["imbalance"].get<double>(), 55.0 / 50.0, 1e-12);
  EXPECT_NEAR(r["overall"]["current"]["imbalance"].get<double>(), (70.0 + 55.0) / (50.0 + 50.0), 1e-12);
  EXPECT_NEAR(r["overall"]["current"]["balancedness"].get<double>(), (50.0 + 50.0) / (70.0 + 55.0), 1e-12);
  // The planned side stays a prediction from the expert tokens.
  EXPECT_NEAR(r["layers"][0]["planned"]["imbalance"].get<double>(), 1.0, 1e-12);
}

TEST(LoadReportTest, PlanIsNeverWorseOnSkewedLoads) {
  for (uint64_t seed = 1; seed <= 4; ++seed) {
    for (int redundant : {0, 1, 4}) {
      ReportInput in;
      in.num_ranks = 8;
      in.expert_tokens = Zipf(6, 64, 1.2, seed);
      for (int l = 0; l < 6; ++l) in.layers.push_back(l + 1);
      in.placement = ContiguousPlacement(6, 64, 8);
      in.redundant_slots_per_rank = redundant;
      const json r = Build(in);
      ASSERT_TRUE(ValidateLoadReport(r).ok()) << ValidateLoadReport(r).ToString();
      for (const json& layer : r["layers"]) {
        EXPECT_LE(layer["planned"]["imbalance"].get<double>(), layer["current"]["imbalance"].get<double>() + 1e-9)
            << "seed " << seed << " redundant " << redundant << " layer " << layer["layer"];
      }
      const double now = r["overall"]["current"]["imbalance"].get<double>();
      const double planned = r["overall"]["planned"]["imbalance"].get<double>();
      EXPECT_LT(planned, now) << "seed " << seed << " redundant " << redundant;
      if (redundant > 0) {
        EXPECT_LT(planned, 1.15) << "seed " << seed << " redundant " << redundant;
      }
      EXPECT_EQ(r["overall"]["experts_moved"].get<int64_t>(), CountMoved(r));
    }
  }
}

TEST(LoadReportTest, RejectsInputsWhoseShapesDisagree) {
  const auto expect_invalid = [](const ReportInput& in, const char* what) {
    auto r = BuildLoadReport(in);
    ASSERT_FALSE(r.ok()) << what;
    EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument) << what;
  };
  ReportInput in = SmallInput();
  in.expert_tokens.pop_back();
  expect_invalid(in, "loads for one layer of two");
  in = SmallInput();
  in.placement.pop_back();
  expect_invalid(in, "a placement for one layer of two");
  in = SmallInput();
  in.expert_tokens[1].push_back(3);
  expect_invalid(in, "layers with different expert counts");
  in = SmallInput();
  in.placement[0].pop_back();
  expect_invalid(in, "a placement over one rank of two");
  in = SmallInput();
  in.placement[1][1][0] = 4;
  expect_invalid(in, "expert 4 of 4");
  in = SmallInput();
  in.placement[1][1][0] = -1;
  expect_invalid(in, "expert -1");
  in = SmallInput();
  in.rank_tokens = {{1, 2}};
  expect_invalid(in, "measured loads for one layer of two");
  in = SmallInput();
  in.rank_tokens.assign(in.layers.size(), std::vector<double>(static_cast<size_t>(in.num_ranks) + 1, 1.0));
  expect_invalid(in, "measured loads for one rank too many");
  in = SmallInput();
  in.expert_ema.assign(in.layers.size(), std::vector<double>(1, 0.0));
  expect_invalid(in, "a moving average of the wrong size");
  in = SmallInput();
  in.num_ranks = 0;
  expect_invalid(in, "no ranks");
}

TEST(LoadReportTest, InputFromLoadsFile) {
  const json loads = {{"model", "tiny"}, {"layers", {3, 5}}, {"loads", {{1, 2, 3, 4}, {4, 3, 2, 1}}}};
  auto in = ReportInputFromLoads(loads, 2, 1, 1);
  ASSERT_TRUE(in.ok()) << in.status().ToString();
  EXPECT_EQ(in->layers, (std::vector<int32_t>{3, 5}));
  EXPECT_EQ(in->expert_tokens, (std::vector<std::vector<double>>{{1, 2, 3, 4}, {4, 3, 2, 1}}));
  EXPECT_EQ(in->placement, ContiguousPlacement(2, 4, 2));
  EXPECT_EQ(in->num_ranks, 2);
  EXPECT_EQ(in->redundant_slots_per_rank, 1);
  EXPECT_EQ(in->model_type, "") << "\"model\" in a loads file is a directory, not a model type";
  EXPECT_TRUE(in->rank_tokens.empty());
  const json r = Build(*in);
  EXPECT_EQ(r["layers"][1]["layer"], 5);
  EXPECT_EQ(r["window"]["steps"], 0);
  EXPECT_TRUE(r["history"].empty());
  EXPECT_TRUE(r["all_to_all"].empty());

  // Without "layers", the layers are numbered from 0.
  auto plain = ReportInputFromLoads(json{{"loads", {{1, 1}, {2, 2}, {3, 3}}}}, 2, 0, 1);
  ASSERT_TRUE(plain.ok()) << plain.status().ToString();
  EXPECT_EQ(plain->layers, (std::vector<int32_t>{0, 1, 2}));

  const std::pair<json, int> bad[] = {
      {json::array(), 2},
      {json{{"load", {{1, 2}}}}, 2},
      {json{{"loads", "x"}}, 2},
      {json{{"loads", {1, 2}}}, 2},
      {json{{"loads", {json::array()}}}, 2},
      {json{{"loads", {{1, -2}}}}, 2},
      {json{{"layers", {1}}, {"loads", {{1, 2}, {3, 4}}}}, 2},
      {json{{"layers", {1, "x"}}, {"loads", {{1, 2}, {3, 4}}}}, 2},
      {json{{"loads", {{1, "2"}}}}, 2},
      {json{{"loads", {{1, 2}, {1, 2, 3}}}}, 2},
      {json{{"loads", {{1, 2}}}}, 0},
      {json{{"loads", {{1, 2}}}}, 3},  // more ranks than experts
  };
  for (const auto& [j, ranks] : bad) {
    auto r = ReportInputFromLoads(j, ranks, 0, 1);
    EXPECT_FALSE(r.ok()) << j.dump() << " ranks " << ranks;
    if (!r.ok()) {
      EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument) << j.dump();
    }
  }
}

// Every field of the schema, as a JSON pointer into FullReport(), with its type.
enum class Kind { kString, kInteger, kNumber, kBool, kList };
const std::pair<const char*, Kind> kSchemaFields[] = {
    {"/schema", Kind::kString},
    {"/model_type", Kind::kString},
    {"/ranks", Kind::kInteger},
    {"/experts", Kind::kInteger},
    {"/slots_per_rank/current", Kind::kInteger},
    {"/slots_per_rank/planned", Kind::kInteger},
    {"/window/steps", Kind::kInteger},
    {"/window/first_step", Kind::kInteger},
    {"/window/last_step", Kind::kInteger},
    {"/window/seconds", Kind::kNumber},
    {"/window/ema_alpha", Kind::kNumber},
    {"/window/measured", Kind::kBool},
    {"/layers", Kind::kList},
    {"/layers/0/layer", Kind::kInteger},
    {"/layers/0/expert_tokens", Kind::kList},
    {"/layers/0/expert_ema", Kind::kList},
    {"/layers/0/current/placement", Kind::kList},
    {"/layers/0/current/placement/0", Kind::kList},
    {"/layers/0/current/placement/0/0", Kind::kInteger},
    {"/layers/0/current/rank_load", Kind::kList},
    {"/layers/0/current/rank_load_ema", Kind::kList},
    {"/layers/0/current/imbalance", Kind::kNumber},
    {"/layers/0/current/balancedness", Kind::kNumber},
    {"/layers/0/planned/placement/0/0", Kind::kInteger},
    {"/layers/0/planned/rank_load", Kind::kList},
    {"/layers/0/planned/imbalance", Kind::kNumber},
    {"/layers/0/planned/balancedness", Kind::kNumber},
    {"/layers/0/hottest", Kind::kList},
    {"/layers/0/hottest/0/expert", Kind::kInteger},
    {"/layers/0/hottest/0/tokens", Kind::kNumber},
    {"/layers/0/hottest/0/share", Kind::kNumber},
    {"/overall/tokens", Kind::kNumber},
    {"/overall/current/imbalance", Kind::kNumber},
    {"/overall/current/balancedness", Kind::kNumber},
    {"/overall/planned/imbalance", Kind::kNumber},
    {"/overall/planned/balancedness", Kind::kNumber},
    {"/overall/experts_moved", Kind::kInteger},
    {"/all_to_all", Kind::kList},
    {"/all_to_all/0/rank", Kind::kInteger},
    {"/all_to_all/0/dispatch_bytes_sent", Kind::kNumber},
    {"/all_to_all/0/dispatch_bytes_received", Kind::kNumber},
    {"/all_to_all/0/combine_bytes_sent", Kind::kNumber},
    {"/all_to_all/0/combine_bytes_received", Kind::kNumber},
    {"/all_to_all/0/dispatch_seconds", Kind::kNumber},
    {"/all_to_all/0/combine_seconds", Kind::kNumber},
    {"/history", Kind::kList},
    {"/history/0/step", Kind::kInteger},
    {"/history/0/imbalance", Kind::kNumber},
    {"/rebalances", Kind::kList},
    {"/rebalances/0/step", Kind::kInteger},
    {"/rebalances/0/experts_moved", Kind::kInteger},
    {"/rebalances/0/bytes_loaded", Kind::kInteger},
    {"/rebalances/0/seconds", Kind::kNumber},
    {"/rebalances/0/imbalance_before", Kind::kNumber},
    {"/rebalances/0/imbalance_after", Kind::kNumber},
    {"/cache/attention", Kind::kString},
    {"/cache/ranks", Kind::kInteger},
    {"/cache/block_size", Kind::kInteger},
    {"/cache/blocks_per_rank", Kind::kInteger},
    {"/cache/blocks_in_use", Kind::kInteger},
    {"/cache/blocks_total", Kind::kInteger},
    {"/cache/bytes_per_value", Kind::kInteger},
    {"/cache/budget_bytes_per_rank", Kind::kInteger},
    {"/cache/forms", Kind::kList},
    {"/cache/forms/0/attention", Kind::kString},
    {"/cache/forms/0/kv_heads", Kind::kInteger},
    {"/cache/forms/0/bytes_per_token_per_layer", Kind::kInteger},
    {"/cache/forms/0/fraction_of_mha", Kind::kNumber},
    {"/cache/forms/0/tokens_per_rank", Kind::kInteger},
    {"/cache/forms/0/cluster_tokens_tp", Kind::kInteger},
    {"/cache/forms/0/cluster_tokens_dp", Kind::kInteger},
};

bool HasKind(const json& v, Kind kind) {
  switch (kind) {
    case Kind::kString: return v.is_string();
    case Kind::kInteger: return v.is_number_integer();
    case Kind::kNumber: return v.is_number();
    case Kind::kBool: return v.is_boolean();
    case Kind::kList: return v.is_array();
  }
  return false;
}

// The keys of the example document in docs/load_balance.md.
std::set<std::string> DocumentedKeys() {
  std::ifstream f(std::string(EPIC_SOURCE_DIR) + "/docs/load_balance.md");
  std::stringstream text;
  text << f.rdbuf();
  const std::string doc = text.str();
  const size_t begin = doc.find("```json");
  const size_t end = doc.find("```", begin + 7);
  std::set<std::string> keys;
  if (begin == std::string::npos || end == std::string::npos) return keys;
  const std::string block = doc.substr(begin, end - begin);
  const std::regex key("\"([a-z_]+)\"\\s*:");
  for (auto it = std::sregex_iterator(block.begin(), block.end(), key); it != std::sregex_iterator(); ++it) {
    keys.insert((*it)[1]);
  }
  return keys;
}

TEST(LoadReportTest, SchemaHasEveryDocumentedFieldWithItsType) {
  const json r = FullReport();
  for (const auto& [pointer, kind] : kSchemaFields) {
    const json::json_pointer p(pointer);
    ASSERT_TRUE(r.contains(p)) << pointer << " missing";
    EXPECT_TRUE(HasKind(r[p], kind)) << pointer << " is " << r[p].type_name();
  }
  // The table above covers every key the documentation shows, and the schema has no
  // top-level field the documentation leaves out.
  const std::set<std::string> documented = DocumentedKeys();
  ASSERT_GT(documented.size(), 30u) << "no example document found in docs/load_balance.md";
  for (const std::string& key : documented) {
    const bool covered = std::any_of(std::begin(kSchemaFields), std::end(kSchemaFields), [&](const auto& field) {
      const std::string pointer = std::string(field.first) + "/";
      return pointer.find("/" + key + "/") != std::string::npos;
    });
    EXPECT_TRUE(covered) << "documented field \"" << key << "\" is not checked";
  }
  for (const auto& [key, value] : r.items()) EXPECT_TRUE(documented.count(key)) << key << " is not documented";
  EXPECT_TRUE(ValidateLoadReport(r).ok()) << ValidateLoadReport(r).ToString();
  // As it travels: text and back.
  EXPECT_TRUE(ValidateLoadReport(json::parse(r.dump())).ok());
}

size_t Count(const std::string& haystack, const std::string& needle) {
  size_t n = 0;
  for (size_t at = haystack.find(needle); at != std::string::npos; at = haystack.find(needle, at + 1)) ++n;
  return n;
}

TEST(ReportRenderTest, TextShowsLayersRanksAndOverallNumbers) {
  const json r = FullReport();
  auto text = RenderText(r);
  ASSERT_TRUE(text.ok()) << text.status().ToString();
  const std::string& t = *text;
  EXPECT_NE(t.find("deepseek_v2"), std::string::npos) << t;
  EXPECT_NE(t.find("2 ranks"), std::string::npos) << t;
  EXPECT_NE(t.find("5 steps"), std::string::npos) << t;
  // Overall: measured current (55+35)/(50+30) = 1.125, balancedness 80/90 = 0.889.
  const double planned = r["overall"]["planned"]["imbalance"].get<double>();
  char row[128];
  std::snprintf(row, sizeof(row), "%.3f %9.3f", 1.125, planned);
  EXPECT_NE(t.find(row), std::string::npos) << "no overall imbalance row \"" << row << "\" in\n" << t;
  EXPECT_NE(t.find("0.889"), std::string::npos) << t;
  // One row per layer, its id first; layer 7's hottest expert is 2 with 40%.
  std::istringstream lines(t);
  std::string line;
  int layer_rows = 0;
  bool a2a_row = false, rebalance_row = false;
  while (std::getline(lines, line)) {
    std::istringstream words(line);
    std::string first;
    words >> first;
    if (first == "7") {
      ++layer_rows;
      EXPECT_NE(line.find("    2  40.0%"), std::string::npos) << line;
      EXPECT_NE(line.find("1.100"), std::string::npos) << line;  // measured 55/50
    }
    if (first == "12") {
      ++layer_rows;
      EXPECT_NE(line.find("    3  83.3%"), std::string::npos) << line;
    }
    // Rank 0: 1 MiB + 1 MiB sent, 2 MiB + 1 MiB received.
    if (first == "0" && line.find("2.00") != std::string::npos && line.find("3.00") != std::string::npos) {
      a2a_row = true;
      EXPECT_NE(line.find(" 70 "), std::string::npos) << "rank 0 load now 45 + 25: " << line;
    }
    if (line.find("1.500 -> 1.100") != std::string::npos) rebalance_row = true;
  }
  EXPECT_EQ(layer_rows, 2) << t;
  EXPECT_TRUE(a2a_row) << t;
  EXPECT_TRUE(rebalance_row) << t;
  // The cache: latent 80 values of 2 bytes against MHA's 8 x (48 + 32) = 640: 12.5%; a
  // budget of 1024 latent tokens holds 1024 / 8 = 128 MHA tokens, 4 ranks under dp 4x.
  EXPECT_NE(t.find("--attention dp, 4 ranks of 64 blocks of 16 tokens; 10 of 256 blocks in use"), std::string::npos)
      << t;
  char latent[160], mha[160];
  std::snprintf(latent, sizeof latent, "%-22s %12d %6.1f%% %12d %12d %12d", "MLA latent", 160, 12.5, 1024, 1024, 4096);
  std::snprintf(mha, sizeof mha, "%-22s %12d %6.1f%% %12d %12d %12d", "MHA", 1280, 100.0, 128, 128, 512);
  EXPECT_NE(t.find(latent), std::string::npos) << t;
  EXPECT_NE(t.find(mha), std::string::npos) << t;
  EXPECT_NE(t.find("MLA latent's cache is 87.5% smaller than MHA's"), std::string::npos) << t;

  // Offline: no window, no all-to-all columns.
  auto offline = RenderText(Build(SmallInput()));
  ASSERT_TRUE(offline.ok());
  EXPECT_NE(offline->find("offline"), std::string::npos) << *offline;
  EXPECT_EQ(offline->find("MiB"), std::string::npos) << *offline;
  EXPECT_NE(offline->find("1.375"), std::string::npos) << *offline;
}

TEST(ReportRenderTest, HtmlIsOneSelfContainedPageWithThreeCharts) {
  json r = FullReport();
  r["model_type"] = "<script>alert('x')</script> & co";
  auto html = RenderHtml(r);
  ASSERT_TRUE(html.ok()) << html.status().ToString();
  const std::string& h = *html;
  EXPECT_EQ(h.rfind("<!DOCTYPE html>", 0), 0u);
  EXPECT_EQ(Count(h, "<html"), 1u);
  EXPECT_EQ(Count(h, "</html>"), 1u);
  EXPECT_EQ(Count(h, "<svg"), 3u);
  EXPECT_EQ(Count(h, "</svg>"), 3u);
  EXPECT_NE(h.find("id=\"heatmap\""), std::string::npos);
  EXPECT_NE(h.find("id=\"rank-load\""), std::string::npos);
  EXPECT_NE(h.find("id=\"history\""), std::string::npos);
  EXPECT_NE(h.find("<polyline"), std::string::npos);
  EXPECT_EQ(Count(h, "class=\"rebalance\""), 1u);  // step 103, inside the history
  // Heatmap cells: 2 layers x 4 experts, each with its count.
  EXPECT_NE(h.find("layer 12, expert 3: 50 tokens"), std::string::npos);
  // Nothing fetched from elsewhere, no script, the model name escaped.
  EXPECT_EQ(h.find("http"), std::string::npos);
  EXPECT_EQ(h.find("<script"), std::string::npos);
  EXPECT_EQ(h.find("<link"), std::string::npos);
  EXPECT_EQ(h.find("src="), std::string::npos);
  EXPECT_NE(h.find("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; co"), std::string::npos);
  EXPECT_NE(h.find("1.125"), std::string::npos);  // overall current imbalance
  EXPECT_NE(h.find("<table id=\"cache\">"), std::string::npos);
  EXPECT_NE(h.find("<tr><td>MLA latent</td><td>160</td><td>12.5%</td><td>1024</td><td>1024</td><td>4096</td></tr>"),
            std::string::npos) << h;

  // Offline: no history, said in words.
  auto offline = RenderHtml(Build(SmallInput()));
  ASSERT_TRUE(offline.ok()) << offline.status().ToString();
  EXPECT_EQ(Count(*offline, "<svg"), 2u);
  EXPECT_NE(offline->find("No imbalance history"), std::string::npos);
}

TEST(ReportRenderTest, EmptyReportRenders) {
  ReportInput in;
  in.num_ranks = 4;
  const json r = Build(in);
  auto text = RenderText(r);
  ASSERT_TRUE(text.ok()) << text.status().ToString();
  EXPECT_NE(text->find("no MoE layers"), std::string::npos);
  auto html = RenderHtml(r);
  ASSERT_TRUE(html.ok()) << html.status().ToString();
  EXPECT_NE(html->find("No MoE layers"), std::string::npos);
}

void ExpectRejected(const json& doc, const std::string& names) {
  for (const bool text : {true, false}) {
    auto out = text ? RenderText(doc) : RenderHtml(doc);
    ASSERT_FALSE(out.ok()) << (text ? "text" : "html") << " accepted " << doc.dump().substr(0, 200);
    EXPECT_EQ(out.status().code(), StatusCode::kInvalidArgument);
    EXPECT_NE(out.status().message().find(names), std::string::npos)
        << "\"" << out.status().message() << "\" does not name " << names;
  }
}

TEST(ReportRenderTest, RejectsMalformedDocuments) {
  const json good = FullReport();
  json doc = good;
  doc.erase("schema");
  ExpectRejected(doc, "schema");
  doc = good;
  doc["schema"] = "epic.load_report/2";
  ExpectRejected(doc, "schema");
  doc = good;
  doc["schema"] = 1;
  ExpectRejected(doc, "schema");
  doc = good;
  doc["layers"] = {{"layer", 7}};
  ExpectRejected(doc, "layers");
  doc = good;
  doc["layers"][0]["expert_tokens"] = 5;
  ExpectRejected(doc, "layers[0].expert_tokens");
  doc = good;
  doc["layers"][1]["planned"]["rank_load"] = 3.5;
  ExpectRejected(doc, "layers[1].planned.rank_load");
  doc = good;
  doc["layers"][1]["current"]["rank_load"].push_back(1.0);
  ExpectRejected(doc, "layers[1].current.rank_load");
  doc = good;
  doc["layers"][0]["expert_tokens"].push_back(1.0);
  ExpectRejected(doc, "layers[0].expert_tokens");
  doc = good;
  doc["layers"][0]["hottest"][0].erase("share");
  ExpectRejected(doc, "layers[0].hottest[0].share");
  doc = good;
  doc["window"]["measured"] = "yes";
  ExpectRejected(doc, "window.measured");
  doc = good;
  doc["overall"]["experts_moved"] = 2.5;
  ExpectRejected(doc, "overall.experts_moved");
  doc = good;
  doc["history"][2] = 1.3;
  ExpectRejected(doc, "history[2]");
  doc = good;
  doc["all_to_all"][1]["rank"] = 9;
  ExpectRejected(doc, "all_to_all[1].rank");
  doc = good;
  doc["layers"][0]["current"]["imbalance"] = std::nan("");
  ExpectRejected(doc, "layers[0].current.imbalance");
  ExpectRejected(json(), "document");
  ExpectRejected(json::array({good}), "document");
  ExpectRejected(json("epic.load_report/1"), "document");
}

// Every node of a good document, removed or replaced by a value of the wrong type:
// each variant is rejected with INVALID_ARGUMENT (or, where the schema allows it,
// accepted), and nothing throws.
TEST(ReportRenderTest, NeverCrashesOnAnyMutation) {
  const json good = FullReport();
  const json flat = good.flatten();  // leaves only; add their parents
  std::set<std::string> pointers;
  for (const auto& [leaf, value] : flat.items()) {
    for (std::string p = leaf; !p.empty(); p = p.substr(0, p.rfind('/'))) pointers.insert(p);
  }
  ASSERT_GT(pointers.size(), 60u);
  int rejected = 0;
  for (const std::string& pointer : pointers) {
    const json::json_pointer p(pointer);
    for (const json& replacement : {json("x"), json(), json::object(), json(-1), json(1e300)}) {
      json doc = good;
      doc[p] = replacement;
      for (const bool text : {true, false}) {
        StatusOr<std::string> out = InvalidArgumentError("unset");
        ASSERT_NO_THROW(out = text ? RenderText(doc) : RenderHtml(doc)) << pointer;
        if (!out.ok()) {
          EXPECT_EQ(out.status().code(), StatusCode::kInvalidArgument) << pointer;
          ++rejected;
        }
      }
    }
    // Removed: only the EMA and the cache are optional; some lists stay valid one element shorter.
    json doc = good;
    json& parent = doc[p.parent_pointer()];
    const std::string parent_pointer = p.parent_pointer().to_string();
    bool optional = false;
    if (parent.is_object()) {
      parent.erase(p.back());
      optional = p.back() == "expert_ema" || p.back() == "rank_load_ema" || pointer == "/cache";
    } else {
      parent.erase(std::stoul(p.back()));
      const std::regex shorter_ok("/(layers|history|rebalances|all_to_all|cache/forms)|/layers/[0-9]+/hottest|"
                                  "/layers/[0-9]+/(current|planned)/placement/[0-9]+");
      optional = std::regex_match(parent_pointer, shorter_ok);
    }
    StatusOr<std::string> out = InvalidArgumentError("unset");
    ASSERT_NO_THROW(out = RenderHtml(doc)) << pointer;
    if (optional) {
      EXPECT_TRUE(out.ok()) << "rejected without " << pointer << ": " << out.status().ToString();
    } else {
      EXPECT_FALSE(out.ok()) << "accepted without " << pointer;
    }
  }
  EXPECT_GT(rejected, 300);
}

}  // namespace
}  // namespace epic::coordinator
