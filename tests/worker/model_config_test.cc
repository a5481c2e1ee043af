// ParseModelConfig: every preset parses, and every refusal names the field.
#include "worker/model_config.h"

#include <cmath>
#include <filesystem>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "worker/random_checkpoint.h"

namespace epic {
namespace {

using nlohmann::json;

constexpr char kSource[] = "models/test/config.json";

json Preset(const std::string& name) {
  StatusOr<json> config = PresetConfig(name);
  EXPECT_TRUE(config.ok()) << config.status().ToString();
  return config.ok() ? *config : json::object();
}

StatusOr<ModelConfig> Parse(const json& config) { return ParseModelConfig(config.dump(), kSource); }

// Expects CONFIG_TEXT to be refused with CODE and a message holding the source file
// name and every one of WORDS.
void ExpectTextRefused(const std::string& config_text, StatusCode code, const std::vector<std::string>& words) {
  const StatusOr<ModelConfig> parsed = ParseModelConfig(config_text, kSource);
  ASSERT_FALSE(parsed.ok()) << "accepted: " << config_text;
  const Status& s = parsed.status();
  EXPECT_EQ(s.code(), code) << s.ToString();
  EXPECT_NE(s.message().find(kSource), std::string::npos) << s.ToString();
  for (const std::string& w : words) {
    EXPECT_NE(s.message().find(w), std::string::npos) << "'" << w << "' not in: " << s.ToString();
  }
}

void ExpectRefused(const json& config, StatusCode code, const std::vector<std::string>& words) {
  ExpectTextRefused(config.dump(), code, words);
}

// The tiny preset with FIELD set to VALUE.
json TinyWith(const std::string& field, const json& value) {
  json config = Preset("tiny");
  config[field] = value;
  return config;
}

TEST(ModelConfigTest, EveryPresetParses) {
  for (const std::string& name : PresetNames()) {
    SCOPED_TRACE(name);
    const StatusOr<ModelConfig> c = Parse(Preset(name));
    ASSERT_TRUE(c.ok()) << c.status().ToString();
    EXPECT_GT(c->hidden_size, 0);
    EXPECT_FALSE(c->Summary().empty());
  }
}

TEST(ModelConfigTest, PresetsCarryTheirRouting) {
  const StatusOr<ModelConfig> v2 = Parse(Preset("v2-160"));
  ASSERT_TRUE(v2.ok());
  EXPECT_EQ(v2->model_type, "deepseek_v2");
  EXPECT_EQ(v2->n_routed_experts, 160);
  EXPECT_EQ(v2->n_shared_experts, 2);
  EXPECT_EQ(v2->num_experts_per_tok, 6);
  EXPECT_EQ(v2->n_group, 8);
  EXPECT_EQ(v2->topk_group, 3);
  EXPECT_EQ(v2->topk_method, TopkMethod::kGroupLimitedGreedy);
  EXPECT_EQ(v2->scoring_func, ScoringFunc::kSoftmax);
  EXPECT_DOUBLE_EQ(v2->routed_scaling_factor, 16.0);
  EXPECT_EQ(v2->rope_scaling.type, RopeScaling::Type::kYarn);
  EXPECT_DOUBLE_EQ(v2->rope_scaling.factor, 40.0);
  EXPECT_DOUBLE_EQ(v2->rope_scaling.mscale_all_dim, 0.707);
  EXPECT_EQ(v2->rope_scaling.original_max_position_embeddings, 4096);
  EXPECT_FALSE(v2->ScalesAfterNormalising());

  const StatusOr<ModelConfig> lite = Parse(Preset("v2-lite-shape"));
  ASSERT_TRUE(lite.ok());
  EXPECT_EQ(lite->q_lora_rank, 0);  // q_lora_rank: null
  EXPECT_EQ(lite->topk_method, TopkMethod::kGreedy);
  EXPECT_EQ(lite->latent_dim(), 576);
  EXPECT_EQ(lite->q_head_dim(), 192);

  const StatusOr<ModelConfig> v3 = Parse(Preset("v3-tiny"));
  ASSERT_TRUE(v3.ok());
  EXPECT_EQ(v3->model_type, "deepseek_v3");
  EXPECT_EQ(v3->topk_method, TopkMethod::kNoauxTc);
  EXPECT_EQ(v3->scoring_func, ScoringFunc::kSigmoid);
  EXPECT_TRUE(v3->norm_topk_prob);
  EXPECT_DOUBLE_EQ(v3->routed_scaling_factor, 2.5);
  EXPECT_TRUE(v3->ScalesAfterNormalising());
}

TEST(ModelConfigTest, RefusesTextThatIsNotAJsonObject) {
  ExpectTextRefused("{\"hidden_size\": 64,", StatusCode::kInvalidArgument, {"JSON"});
  ExpectTextRefused("", StatusCode::kInvalidArgument, {"JSON"});
  ExpectTextRefused("[1, 2, 3]", StatusCode::kInvalidArgument, {"object"});
}

TEST(ModelConfigTest, RefusesMissingOrMistypedSizes) {
  for (const std::string field : {"hidden_size", "vocab_size", "num_hidden_layers", "kv_lora_rank",
                                  "qk_rope_head_dim", "v_head_dim", "intermediate_size"}) {
    SCOPED_TRACE(field);
    json config = Preset("tiny");
    config.erase(field);
    ExpectRefused(config, StatusCode::kInvalidArgument, {"'" + field + "'", "missing"});
    ExpectRefused(TinyWith(field, "64"), StatusCode::kInvalidArgument, {"'" + field + "'", "integer"});
    ExpectRefused(TinyWith(field, 0), StatusCode::kInvalidArgument, {"'" + field + "'", "at least"});
  }
  ExpectRefused(TinyWith("hidden_size", 64.5), StatusCode::kInvalidArgument, {"'hidden_size'"});
  ExpectRefused(TinyWith("qk_rope_head_dim", 7), StatusCode::kInvalidArgument, {"'qk_rope_head_dim'", "even"});
}

// Found by trying: numbers past a double, and sizes so large that sizing anything from
// them would exhaust memory, are refused by name before anything is allocated.
TEST(ModelConfigTest, RefusesNumbersPastADoubleAndAbsurdSizes) {
  std::string text = Preset("tiny").dump();
  const size_t at = text.find("\"rope_theta\":");
  ASSERT_NE(at, std::string::npos);
  text.insert(at, "\"initializer_range\": 1e400, ");
  ExpectTextRefused(text, StatusCode::kInvalidArgument, {"JSON"});
  ExpectRefused(TinyWith("num_hidden_layers", 1000000000), StatusCode::kInvalidArgument,
                {"'num_hidden_layers'", "1000000000", "more than epic accepts"});
  ExpectRefused(TinyWith("n_routed_experts", int64_t{1} << 40), StatusCode::kInvalidArgument,
                {"'n_routed_experts'", "more than epic accepts"});
  ExpectRefused(TinyWith("hidden_size", uint64_t{1} << 63), StatusCode::kInvalidArgument, {"'hidden_size'"});
}

// Found with fuzz/model_config.cc (fuzz/corpus/model_config/oom_layers_times_experts): each
// count within its own limit, 4096 MoE layers of 65536 experts made the loader's list of
// expected tensors take tens of gigabytes. The experts of all layers together are bounded.
TEST(ModelConfigTest, RefusesMoreExpertsInAllLayersThanACheckpointCanName) {
  json config = Preset("tiny");
  config["num_hidden_layers"] = 4096;
  config["first_k_dense_replace"] = 0;
  config["n_routed_experts"] = 65536;
  config["n_group"] = 1;
  config["topk_group"] = 1;
  ExpectRefused(config, StatusCode::kInvalidArgument,
                {"'n_routed_experts'", "4096 MoE layers", "268435456 experts", "more than epic accepts"});
  // Every second layer dense: half the experts, still too many; a V3-sized model is fine.
  config["moe_layer_freq"] = 2;
  ExpectRefused(config, StatusCode::kInvalidArgument, {"2048 MoE layers"});
  config["num_hidden_layers"] = 61;
  config["moe_layer_freq"] = 1;
  config["first_k_dense_replace"] = 3;
  config["n_routed_experts"] = 256;
  const StatusOr<ModelConfig> v3_sized = Parse(config);
  ASSERT_TRUE(v3_sized.ok()) << v3_sized.status().ToString();
}

TEST(ModelConfigTest, RefusesUnknownModelType) {
  ExpectRefused(TinyWith("model_type", "llama"), StatusCode::kUnimplemented, {"'model_type'", "llama"});
  json missing = Preset("tiny");
  missing.erase("model_type");
  ExpectRefused(missing, StatusCode::kUnimplemented, {"'model_type'"});
}

TEST(ModelConfigTest, RefusesUnknownRouting) {
  ExpectRefused(TinyWith("topk_method", "random"), StatusCode::kUnimplemented, {"'topk_method'", "random"});
  ExpectRefused(TinyWith("scoring_func", "tanh"), StatusCode::kUnimplemented, {"'scoring_func'", "tanh"});
  // HF DeepseekV2Config's default spelling "gready" means greedy.
  const StatusOr<ModelConfig> gready = Parse(TinyWith("topk_method", "gready"));
  ASSERT_TRUE(gready.ok()) << gready.status().ToString();
  EXPECT_EQ(gready->topk_method, TopkMethod::kGreedy);
}

TEST(ModelConfigTest, RefusesWhatChangesTheMathUnsupported) {
  ExpectRefused(TinyWith("attention_bias", true), StatusCode::kUnimplemented, {"'attention_bias'"});
  ExpectRefused(TinyWith("quantization_config", json{{"quant_method", "fp8"}}), StatusCode::kUnimplemented,
                {"'quantization_config'"});
  ExpectRefused(TinyWith("hidden_act", "gelu"), StatusCode::kUnimplemented, {"'hidden_act'", "gelu"});
  ExpectRefused(TinyWith("rope_scaling", json{{"type", "dynamic"}, {"factor", 2.0}}),
                StatusCode::kUnimplemented, {"rope_scaling", "dynamic"});
  ExpectRefused(TinyWith("rope_scaling", json{{"type", "yarn"}}), StatusCode::kInvalidArgument,
                {"rope_scaling.factor"});
  ExpectRefused(TinyWith("rope_scaling", json{{"type", "linear"}, {"factor", -1.0}}),
                StatusCode::kInvalidArgument, {"rope_scaling.factor"});
  ExpectRefused(TinyWith("rope_scaling", 4), StatusCode::kInvalidArgument, {"'rope_scaling'"});
  // attention_bias false and quantization_config null are fine.
  json fine = TinyWith("attention_bias", false);
  fine["quantization_config"] = nullptr;
  EXPECT_TRUE(Parse(fine).ok());
}

TEST(ModelConfigTest, RopeScalingTypes) {
  const StatusOr<ModelConfig> none = Parse(TinyWith("rope_scaling", nullptr));
  ASSERT_TRUE(none.ok());
  EXPECT_EQ(none->rope_scaling.type, RopeScaling::Type::kNone);

  const StatusOr<ModelConfig> linear = Parse(TinyWith("rope_scaling", json{{"type", "linear"}, {"factor", 4}}));
  ASSERT_TRUE(linear.ok()) << linear.status().ToString();
  EXPECT_EQ(linear->rope_scaling.type, RopeScaling::Type::kLinear);
  EXPECT_DOUBLE_EQ(linear->rope_scaling.factor, 4.0);

  // Newer configs spell the key rope_type; YaRN fields not given keep HF's defaults.
  const StatusOr<ModelConfig> yarn = Parse(TinyWith("rope_scaling", json{{"rope_type", "yarn"}, {"factor", 8}}));
  ASSERT_TRUE(yarn.ok()) << yarn.status().ToString();
  EXPECT_EQ(yarn->rope_scaling.type, RopeScaling::Type::kYarn);
  EXPECT_DOUBLE_EQ(yarn->rope_scaling.factor, 8.0);
  EXPECT_DOUBLE_EQ(yarn->rope_scaling.beta_fast, 32.0);
  EXPECT_DOUBLE_EQ(yarn->rope_scaling.beta_slow, 1.0);
  EXPECT_DOUBLE_EQ(yarn->rope_scaling.mscale, 1.0);
  EXPECT_DOUBLE_EQ(yarn->rope_scaling.mscale_all_dim, 0.0);
  EXPECT_EQ(yarn->rope_scaling.original_max_position_embeddings, 4096);
}

TEST(ModelConfigTest, RefusesInconsistentGroups) {
  // tiny: 16 routed experts, top-4, 4 groups, 2 kept.
  ExpectRefused(TinyWith("n_group", 3), StatusCode::kInvalidArgument, {"'n_group'", "16"});
  ExpectRefused(TinyWith("topk_group", 5), StatusCode::kInvalidArgument, {"'topk_group'", "n_group"});
  ExpectRefused(TinyWith("num_experts_per_tok", 17), StatusCode::kInvalidArgument, {"'num_experts_per_tok'"});
  // One kept group of two experts cannot supply four.
  json starved = TinyWith("n_group", 8);
  starved["topk_group"] = 1;
  ExpectRefused(starved, StatusCode::kInvalidArgument, {"'topk_group'"});
  // noaux_tc ranks groups by their best two experts, so a group needs two.
  json v3 = Preset("v3-tiny");  // 32 experts
  v3["n_group"] = 32;
  v3["topk_group"] = 8;
  ExpectRefused(v3, StatusCode::kInvalidArgument, {"'n_group'"});
  ExpectRefused(TinyWith("routed_scaling_factor", 0.0), StatusCode::kInvalidArgument, {"'routed_scaling_factor'"});
  ExpectRefused(TinyWith("rms_norm_eps", -1e-6), StatusCode::kInvalidArgument, {"'rms_norm_eps'"});
  ExpectRefused(TinyWith("rope_theta", 0.0), StatusCode::kInvalidArgument, {"'rope_theta'"});
  ExpectRefused(TinyWith("norm_topk_prob", 1), StatusCode::kInvalidArgument, {"'norm_topk_prob'"});
}

TEST(ModelConfigTest, QueryLoraRankMissingIsRefusedButNullMeansNone) {
  json missing = Preset("tiny");
  missing.erase("q_lora_rank");
  ExpectRefused(missing, StatusCode::kInvalidArgument, {"'q_lora_rank'", "missing"});
  const StatusOr<ModelConfig> none = Parse(TinyWith("q_lora_rank", nullptr));
  ASSERT_TRUE(none.ok()) << none.status().ToString();
  EXPECT_EQ(none->q_lora_rank, 0);
  ExpectRefused(TinyWith("q_lora_rank", 0), StatusCode::kInvalidArgument, {"'q_lora_rank'"});
  const StatusOr<ModelConfig> some = Parse(TinyWith("q_lora_rank", 40));
  ASSERT_TRUE(some.ok());
  EXPECT_EQ(some->q_lora_rank, 40);
}

TEST(ModelConfigTest, EosTokenIds) {
  const StatusOr<ModelConfig> one = Parse(TinyWith("eos_token_id", 7));
  ASSERT_TRUE(one.ok());
  EXPECT_EQ(one->eos_token_ids, (std::vector<int64_t>{7}));
  const StatusOr<ModelConfig> list = Parse(TinyWith("eos_token_id", json::array({1, 5, 9})));
  ASSERT_TRUE(list.ok()) << list.status().ToString();
  EXPECT_EQ(list->eos_token_ids, (std::vector<int64_t>{1, 5, 9}));
  const StatusOr<ModelConfig> null = Parse(TinyWith("eos_token_id", nullptr));
  ASSERT_TRUE(null.ok());
  EXPECT_TRUE(null->eos_token_ids.empty());
  json absent = Preset("tiny");
  absent.erase("eos_token_id");
  const StatusOr<ModelConfig> none = Parse(absent);
  ASSERT_TRUE(none.ok());
  EXPECT_TRUE(none->eos_token_ids.empty());
  // tiny's vocabulary is 256 tokens.
  ExpectRefused(TinyWith("eos_token_id", 256), StatusCode::kInvalidArgument, {"'eos_token_id'"});
  ExpectRefused(TinyWith("eos_token_id", json::array({1, -2})), StatusCode::kInvalidArgument, {"'eos_token_id'"});
  ExpectRefused(TinyWith("eos_token_id", "</s>"), StatusCode::kInvalidArgument, {"'eos_token_id'"});
}

TEST(ModelConfigTest, DefaultsOfOptionalFields) {
  json config = Preset("tiny");
  for (const char* field : {"moe_layer_freq", "first_k_dense_replace", "norm_topk_prob", "rms_norm_eps",
                            "rope_theta", "max_position_embeddings", "tie_word_embeddings", "scoring_func",
                            "n_shared_experts", "routed_scaling_factor"}) {
    config.erase(field);
  }
  const StatusOr<ModelConfig> c = Parse(config);
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->moe_layer_freq, 1);
  EXPECT_EQ(c->first_k_dense_replace, 0);
  EXPECT_FALSE(c->norm_topk_prob);
  EXPECT_DOUBLE_EQ(c->rms_norm_eps, 1e-6);
  EXPECT_DOUBLE_EQ(c->rope_theta, 10000.0);
  EXPECT_EQ(c->max_position_embeddings, 2048);
  EXPECT_FALSE(c->tie_word_embeddings);
  EXPECT_EQ(c->scoring_func, ScoringFunc::kSoftmax);
  EXPECT_EQ(c->n_shared_experts, 0);
  EXPECT_DOUBLE_EQ(c->routed_scaling_factor, 1.0);
}

TEST(ModelConfigTest, V3DefaultsAreV3s) {
  // A deepseek_v3 config that leaves routing fields out gets HF's DeepseekV3Config defaults.
  json config = Preset("v3-tiny");
  config["n_routed_experts"] = 64;
  for (const char* field : {"topk_method", "scoring_func", "n_group", "topk_group", "norm_topk_prob",
                            "routed_scaling_factor", "first_k_dense_replace"}) {
    config.erase(field);
  }
  const StatusOr<ModelConfig> c = Parse(config);
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->topk_method, TopkMethod::kNoauxTc);
  EXPECT_EQ(c->scoring_func, ScoringFunc::kSigmoid);
  EXPECT_EQ(c->n_group, 8);
  EXPECT_EQ(c->topk_group, 4);
  EXPECT_TRUE(c->norm_topk_prob);
  EXPECT_DOUBLE_EQ(c->routed_scaling_factor, 2.5);
  EXPECT_EQ(c->first_k_dense_replace, 3);
}

TEST(ModelConfigTest, MscaleAllDimScalesSoftmaxUnderLinearScalingToo) {
  json config = Preset("tiny");
  config["rope_scaling"] = {{"type", "linear"}, {"factor", 4.0}, {"mscale_all_dim", 1.0}};
  const StatusOr<ModelConfig> c = Parse(config);
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  const double m = 0.1 * std::log(4.0) + 1.0;
  EXPECT_NEAR(c->SoftmaxScale(), m * m / std::sqrt(24.0), 1e-12);
}

TEST(ModelConfigTest, SoftmaxScale) {
  // tiny: no rope scaling, q_head_dim 16 + 8.
  const StatusOr<ModelConfig> plain = Parse(Preset("tiny"));
  ASSERT_TRUE(plain.ok());
  EXPECT_DOUBLE_EQ(plain->SoftmaxScale(), 1.0 / std::sqrt(24.0));

  // v2-160: YaRN factor 40, mscale_all_dim 0.707, q_head_dim 32 + 16.
  const StatusOr<ModelConfig> yarn = Parse(Preset("v2-160"));
  ASSERT_TRUE(yarn.ok());
  const double m = 0.1 * 0.707 * std::log(40.0) + 1.0;
  EXPECT_NEAR(yarn->SoftmaxScale(), m * m / std::sqrt(48.0), 1e-15);
  EXPECT_GT(yarn->SoftmaxScale(), 1.0 / std::sqrt(48.0));

  // mscale_all_dim 0 (or absent) leaves the scale alone, as does a factor <= 1.
  json no_all_dim = Preset("v2-160");
  no_all_dim["rope_scaling"].erase("mscale_all_dim");
  const StatusOr<ModelConfig> a = Parse(no_all_dim);
  ASSERT_TRUE(a.ok());
  EXPECT_DOUBLE_EQ(a->SoftmaxScale(), 1.0 / std::sqrt(48.0));
  json unit_factor = Preset("v2-160");
  unit_factor["rope_scaling"]["factor"] = 1.0;
  const StatusOr<ModelConfig> b = Parse(unit_factor);
  ASSERT_TRUE(b.ok());
  EXPECT_DOUBLE_EQ(b->SoftmaxScale(), 1.0 / std::sqrt(48.0));

  EXPECT_DOUBLE_EQ(YarnMscale(1.0, 0.707), 1.0);
  EXPECT_DOUBLE_EQ(YarnMscale(0.5, 0.707), 1.0);
  EXPECT_NEAR(YarnMscale(40.0, 1.0), 0.1 * std::log(40.0) + 1.0, 1e-15);
}

TEST(ModelConfigTest, IsMoeLayer) {
  json config = Preset("tiny");
  config["num_hidden_layers"] = 7;
  config["first_k_dense_replace"] = 2;
  config["moe_layer_freq"] = 2;
  const StatusOr<ModelConfig> c = Parse(config);
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  std::vector<bool> moe;
  for (int64_t l = 0; l < 7; ++l) moe.push_back(c->IsMoeLayer(l));
  EXPECT_EQ(moe, (std::vector<bool>{false, false, true, false, true, false, true}));

  config["first_k_dense_replace"] = 0;
  config["moe_layer_freq"] = 1;
  const StatusOr<ModelConfig> all = Parse(config);
  ASSERT_TRUE(all.ok());
  for (int64_t l = 0; l < 7; ++l) EXPECT_TRUE(all->IsMoeLayer(l)) << l;

  // No routed experts: every layer is dense, and the MoE fields are not required.
  config["n_routed_experts"] = nullptr;
  config.erase("moe_intermediate_size");
  config.erase("num_experts_per_tok");
  const StatusOr<ModelConfig> dense = Parse(config);
  ASSERT_TRUE(dense.ok()) << dense.status().ToString();
  for (int64_t l = 0; l < 7; ++l) EXPECT_FALSE(dense->IsMoeLayer(l)) << l;
}

TEST(ModelConfigTest, LoadModelConfigNamesTheMissingFile) {
  const std::filesystem::path dir = std::filesystem::path(::testing::TempDir()) / "epic_no_such_model_dir";
  const StatusOr<ModelConfig> c = LoadModelConfig(dir);
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), StatusCode::kNotFound);
  EXPECT_NE(c.status().message().find((dir / "config.json").string()), std::string::npos)
      << c.status().ToString();
}

}  // namespace
}  // namespace epic
