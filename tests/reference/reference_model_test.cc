// Sanity tests of the float64 reference forward pass itself: properties it must have
// whatever the weights (finite, causal, independent of sharding and close across
// dtypes), and small cases whose answer can be worked out by hand.
#include "tests/reference/reference_model.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "common/half.h"
#include "tests/testing/temp_dir.h"
#include "worker/checkpoint.h"
#include "worker/random_checkpoint.h"
#include "worker/safetensors.h"

namespace epic::reference {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

json Preset(const std::string& name) {
  StatusOr<json> config = PresetConfig(name);
  EXPECT_TRUE(config.ok()) << config.status().ToString();
  return config.ok() ? *config : json::object();
}

// v2-lite-shape keeps V2-Lite's layer dimensions (hidden 2048, 16 heads, kv_lora 512,
// no query LoRA, 64 experts top-6, YaRN) but only two layers, a small vocabulary and
// narrow MLPs, so that a test can write and run it in a second.
json SmallPreset(const std::string& name) {
  json config = Preset(name);
  if (name == "v2-lite-shape") {
    config["num_hidden_layers"] = 2;
    config["vocab_size"] = 512;
    config["intermediate_size"] = 256;
    config["moe_intermediate_size"] = 32;
    config["bos_token_id"] = 0;
    config["eos_token_id"] = 1;
  }
  return config;
}

std::unique_ptr<Checkpoint> WriteAndOpen(const json& config, const fs::path& dir, uint64_t seed,
                                         DType dtype = DType::kBF16, int shards = 1) {
  RandomCheckpointOptions options;
  options.seed = seed;
  options.dtype = dtype;
  options.shards = shards;
  const Status written = WriteRandomCheckpoint(config, dir, options);
  EXPECT_TRUE(written.ok()) << written.ToString();
  StatusOr<std::unique_ptr<Checkpoint>> ckpt = Checkpoint::Open(dir);
  EXPECT_TRUE(ckpt.ok()) << ckpt.status().ToString();
  return ckpt.ok() ? std::move(*ckpt) : nullptr;
}

float ElementAsFloat(const TensorView& t, int64_t i) { return t.FloatAt(i); }

// Writes to OUT an F32 checkpoint for CONFIG whose tensors are SOURCE's (zeros for a
// tensor SOURCE lacks) after EDIT(name, values) has changed them as it likes.
using EditFn = std::function<void(const std::string& name, std::vector<float>& values)>;
std::unique_ptr<Checkpoint> WriteEdited(const Checkpoint& source, const json& config,
                                        const fs::path& out, const EditFn& edit) {
  StatusOr<ModelConfig> parsed = ParseModelConfig(config.dump(), "edited config");
  EXPECT_TRUE(parsed.ok()) << parsed.status().ToString();
  if (!parsed.ok()) return nullptr;
  fs::create_directories(out);
  std::ofstream(out / "config.json") << config.dump(2);
  std::vector<TensorSpec> specs;
  for (const ExpectedTensor& e : ExpectedTensors(*parsed)) specs.push_back({e.name, DType::kF32, e.shape});
  const Status written = WriteSafetensors(out / "model.safetensors", specs, [&](size_t i, std::byte* bytes) {
    const TensorSpec& spec = specs[i];
    std::vector<float> values(spec.nbytes() / 4, 0.0f);
    if (const TensorView* t = source.Find(spec.name)) {
      EXPECT_EQ(t->shape, spec.shape) << spec.name;
      for (int64_t j = 0; j < t->numel() && j < static_cast<int64_t>(values.size()); ++j) {
        values[j] = ElementAsFloat(*t, j);
      }
    }
    edit(spec.name, values);
    std::memcpy(bytes, values.data(), spec.nbytes());
  });
  EXPECT_TRUE(written.ok()) << written.ToString();
  StatusOr<std::unique_ptr<Checkpoint>> ckpt = Checkpoint::Open(out);
  EXPECT_TRUE(ckpt.ok()) << ckpt.status().ToString();
  return ckpt.ok() ? std::move(*ckpt) : nullptr;
}

bool EndsWith(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

const std::vector<int64_t> kTokens = {3, 17, 5, 200, 42, 9, 77, 128, 11, 64};

double MaxAbsDifference(const std::vector<double>& a, const std::vector<double>& b) {
  EXPECT_EQ(a.size(), b.size());
  double worst = 0.0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) worst = std::max(worst, std::fabs(a[i] - b[i]));
  return worst;
}

// (a) Every preset gives finite logits that depend on the vocabulary entry, and each
// MoE layer routes every token to exactly top_k experts.
class PresetTest : public ::testing::TestWithParam<std::string> {};

TEST_P(PresetTest, LogitsFiniteAndVaried) {
  testing::TempDir dir(GetParam());
  const json config = SmallPreset(GetParam());
  auto ckpt = WriteAndOpen(config, dir.path(), /*seed=*/1);
  ASSERT_NE(ckpt, nullptr);
  const ModelConfig& c = ckpt->config();

  const ReferenceOutput out = Forward(*ckpt, kTokens);
  ASSERT_EQ(out.logits.size(), kTokens.size());
  for (size_t t = 0; t < kTokens.size(); ++t) {
    ASSERT_EQ(static_cast<int64_t>(out.logits[t].size()), c.vocab_size);
    double lo = out.logits[t][0], hi = out.logits[t][0];
    for (double v : out.logits[t]) {
      ASSERT_TRUE(std::isfinite(v)) << "position " << t;
      lo = std::min(lo, v);
      hi = std::max(hi, v);
    }
    EXPECT_GT(hi - lo, 1e-2) << "position " << t << ": logits nearly all equal";
  }
  // Different positions see different contexts, so their logits differ.
  EXPECT_GT(MaxAbsDifference(out.logits[0], out.logits[1]), 1e-3);

  ASSERT_EQ(static_cast<int64_t>(out.expert_counts.size()), c.num_hidden_layers);
  int moe_layers = 0;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    if (!c.IsMoeLayer(l)) {
      EXPECT_TRUE(out.expert_counts[l].empty()) << "dense layer " << l;
      continue;
    }
    ++moe_layers;
    ASSERT_EQ(static_cast<int64_t>(out.expert_counts[l].size()), c.n_routed_experts);
    int64_t total = 0;
    for (int64_t n : out.expert_counts[l]) {
      EXPECT_GE(n, 0);
      EXPECT_LE(n, static_cast<int64_t>(kTokens.size()));  // a token picks an expert at most once
      total += n;
    }
    EXPECT_EQ(total, static_cast<int64_t>(kTokens.size()) * c.num_experts_per_tok) << "layer " << l;
  }
  EXPECT_GT(moe_layers, 0);
}

INSTANTIATE_TEST_SUITE_P(AllPresets, PresetTest, ::testing::ValuesIn(PresetNames()),
                         [](const auto& info) {
                           std::string name = info.param;
                           for (char& ch : name) {
                             if (ch == '-') ch = '_';
                           }
                           return name;
                         });

// (b) Logits at position t depend on tokens 0..t only.
TEST(ReferenceModelTest, Causal) {
  for (const std::string preset : {"tiny", "v2-160", "v3-tiny"}) {
    SCOPED_TRACE(preset);
    testing::TempDir dir(preset);
    auto ckpt = WriteAndOpen(SmallPreset(preset), dir.path(), /*seed=*/2);
    ASSERT_NE(ckpt, nullptr);
    std::vector<int64_t> changed = kTokens;
    for (size_t t = 6; t < changed.size(); ++t) changed[t] = (changed[t] * 7 + 1) % 256;
    const ReferenceOutput a = Forward(*ckpt, kTokens);
    const ReferenceOutput b = Forward(*ckpt, changed);
    for (size_t t = 0; t < 6; ++t) EXPECT_EQ(a.logits[t], b.logits[t]) << "position " << t;
    for (size_t t = 6; t < kTokens.size(); ++t) {
      EXPECT_GT(MaxAbsDifference(a.logits[t], b.logits[t]), 1e-6) << "position " << t;
    }
    // A prefix run alone gives the same logits as the same positions of the full run.
    const ReferenceOutput prefix = Forward(*ckpt, std::vector<int64_t>(kTokens.begin(), kTokens.begin() + 4));
    for (size_t t = 0; t < 4; ++t) EXPECT_EQ(prefix.logits[t], a.logits[t]) << "position " << t;
  }
}

// (c) The same seed written as one file and as three shards holds the same weights.
TEST(ReferenceModelTest, ShardingDoesNotChangeLogits) {
  testing::TempDir one("one_file");
  testing::TempDir three("three_shards");
  auto a = WriteAndOpen(Preset("tiny"), one.path(), /*seed=*/7, DType::kBF16, /*shards=*/1);
  auto b = WriteAndOpen(Preset("tiny"), three.path(), /*seed=*/7, DType::kBF16, /*shards=*/3);
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(a->num_files(), 1);
  EXPECT_EQ(b->num_files(), 3);
  const ReferenceOutput x = Forward(*a, kTokens);
  const ReferenceOutput y = Forward(*b, kTokens);
  EXPECT_EQ(x.logits, y.logits);
  EXPECT_EQ(x.expert_counts, y.expert_counts);
}

// A one-layer MoE model: tiny's routing (16 experts, 4 groups, top-4) in layer 0.
json OneMoeLayer() {
  json config = Preset("tiny");
  config["num_hidden_layers"] = 1;
  config["first_k_dense_replace"] = 0;
  return config;
}

// (d) With every group kept, group_limited_greedy has nothing to exclude and must
// choose exactly what greedy chooses.
TEST(ReferenceModelTest, GroupLimitedKeepingAllGroupsEqualsGreedy) {
  json grouped = OneMoeLayer();
  grouped["topk_method"] = "group_limited_greedy";
  grouped["n_group"] = 4;
  grouped["topk_group"] = 4;
  json greedy = grouped;
  greedy["topk_method"] = "greedy";
  testing::TempDir a_dir("grouped");
  testing::TempDir b_dir("greedy");
  auto a = WriteAndOpen(grouped, a_dir.path(), /*seed=*/5);
  auto b = WriteAndOpen(greedy, b_dir.path(), /*seed=*/5);
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr);
  const ReferenceOutput x = Forward(*a, kTokens);
  const ReferenceOutput y = Forward(*b, kTokens);
  EXPECT_EQ(x.expert_counts, y.expert_counts);
  EXPECT_EQ(x.logits, y.logits);

  // Keeping one group of four must change the choice for some token (else the
  // group limit would not be doing anything).
  json one_group = grouped;
  one_group["topk_group"] = 1;
  testing::TempDir c_dir("one_group");
  auto c = WriteAndOpen(one_group, c_dir.path(), /*seed=*/5);
  ASSERT_NE(c, nullptr);
  const ReferenceOutput z = Forward(*c, kTokens);
  EXPECT_NE(z.expert_counts, x.expert_counts);
  // Each token's four experts then lie in one group of four: counts sum per token to 4.
  int64_t total = 0;
  for (int64_t n : z.expert_counts[0]) total += n;
  EXPECT_EQ(total, static_cast<int64_t>(kTokens.size()) * 4);
}

// (d) With the router's weights zero every score is equal, and the documented
// tie-break (lower index first) sends every token to experts 0..top_k-1: under
// group_limited_greedy the groups tie too, so groups 0 and 1 are kept.
TEST(ReferenceModelTest, ZeroRouterTiesGoToLowestExperts) {
  testing::TempDir src_dir("src");
  testing::TempDir dir("zero_gate");
  const json config = OneMoeLayer();
  auto source = WriteAndOpen(config, src_dir.path(), /*seed=*/9);
  ASSERT_NE(source, nullptr);
  auto ckpt = WriteEdited(*source, config, dir.path(), [](const std::string& name, std::vector<float>& v) {
    if (name == "model.layers.0.mlp.gate.weight") std::fill(v.begin(), v.end(), 0.0f);
  });
  ASSERT_NE(ckpt, nullptr);
  const ReferenceOutput out = Forward(*ckpt, kTokens);
  std::vector<int64_t> want(16, 0);
  for (int e = 0; e < 4; ++e) want[e] = static_cast<int64_t>(kTokens.size());
  EXPECT_EQ(out.expert_counts[0], want);
}

// (d) With o_proj and every down_proj zero, the layers add nothing and the logits are
// lm_head · RMSNorm(embed[token]), which the test computes by hand; with tied
// embeddings the head is embed_tokens itself.
TEST(ReferenceModelTest, SilentLayersLeaveEmbeddingThroughHead) {
  testing::TempDir src_dir("src");
  json config = Preset("v3-tiny");
  auto source = WriteAndOpen(config, src_dir.path(), /*seed=*/4);
  ASSERT_NE(source, nullptr);
  auto silence = [](const std::string& name, std::vector<float>& v) {
    if (EndsWith(name, "o_proj.weight") || EndsWith(name, "down_proj.weight")) {
      std::fill(v.begin(), v.end(), 0.0f);
    }
  };
  for (const bool tied : {false, true}) {
    SCOPED_TRACE(tied ? "tied" : "untied");
    config["tie_word_embeddings"] = tied;
    testing::TempDir dir(tied ? "tied" : "untied");
    auto ckpt = WriteEdited(*source, config, dir.path(), silence);
    ASSERT_NE(ckpt, nullptr);
    EXPECT_EQ(ckpt->Find("lm_head.weight") == nullptr, tied);
    const ModelConfig& c = ckpt->config();
    const TensorView& embed = ckpt->Get("model.embed_tokens.weight");
    const TensorView& norm = ckpt->Get("model.norm.weight");
    const TensorView& head = ckpt->Get(tied ? "model.embed_tokens.weight" : "lm_head.weight");

    const ReferenceOutput out = Forward(*ckpt, kTokens);
    for (size_t t = 0; t < kTokens.size(); ++t) {
      std::vector<double> x(c.hidden_size);
      double sum_sq = 0.0;
      for (int64_t j = 0; j < c.hidden_size; ++j) {
        x[j] = ElementAsFloat(embed, kTokens[t] * c.hidden_size + j);
        sum_sq += x[j] * x[j];
      }
      const double rms = std::sqrt(sum_sq / c.hidden_size + c.rms_norm_eps);
      for (int64_t j = 0; j < c.hidden_size; ++j) x[j] = ElementAsFloat(norm, j) * x[j] / rms;
      for (int64_t v = 0; v < c.vocab_size; ++v) {
        double want = 0.0;
        for (int64_t j = 0; j < c.hidden_size; ++j) want += ElementAsFloat(head, v * c.hidden_size + j) * x[j];
        ASSERT_NEAR(out.logits[t][v], want, 1e-12 * (1.0 + std::fabs(want))) << "position " << t << " token " << v;
      }
    }
  }
}

// (d) At position 0 attention has one key, so the query cannot matter; at later
// positions it must.
TEST(ReferenceModelTest, FirstPositionIgnoresTheQuery) {
  testing::TempDir src_dir("src");
  testing::TempDir dir("scaled_query");
  const json config = Preset("tiny");
  auto source = WriteAndOpen(config, src_dir.path(), /*seed=*/6);
  ASSERT_NE(source, nullptr);
  testing::TempDir same_dir("same");
  auto same = WriteEdited(*source, config, same_dir.path(), [](const std::string&, std::vector<float>&) {});
  auto scaled = WriteEdited(*source, config, dir.path(), [](const std::string& name, std::vector<float>& v) {
    if (EndsWith(name, "q_b_proj.weight")) {
      for (float& x : v) x *= 3.0f;
    }
  });
  ASSERT_NE(same, nullptr);
  ASSERT_NE(scaled, nullptr);
  const ReferenceOutput a = Forward(*same, kTokens);
  const ReferenceOutput b = Forward(*scaled, kTokens);
  EXPECT_LT(MaxAbsDifference(a.logits[0], b.logits[0]), 1e-9);
  EXPECT_GT(MaxAbsDifference(a.logits[1], b.logits[1]), 1e-4);
}

// (d) Routing-weight semantics, worked out by hand. Every routed expert is given the
// same weights and the router is zeroed, so the routed output is (sum of the top-k
// weights) x E(x) and two configs whose weight sums agree must give the same logits:
//   V2, norm_topk_prob false, scale s: softmax scores 1/n each, sum = s * k / n.
//   V2, norm_topk_prob true, any scale: weights normalised to sum 1, never scaled.
//   V3, noaux_tc sigmoid with zero bias: 0.5 each; norm true gives 1 * s; norm false
//   gives s * k / 2.
TEST(ReferenceModelTest, RoutingWeightSumsMatchTheFormulas) {
  testing::TempDir src_dir("src");
  json base = OneMoeLayer();  // 16 experts, top-4, 4 groups, 2 kept
  auto source = WriteAndOpen(base, src_dir.path(), /*seed=*/11);
  ASSERT_NE(source, nullptr);
  // Experts all copies of expert 0; router zero; bias (V3 only) zero.
  auto clone_experts = [&](const std::string& name, std::vector<float>& v) {
    if (name == "model.layers.0.mlp.gate.weight" || EndsWith(name, "e_score_correction_bias")) {
      std::fill(v.begin(), v.end(), 0.0f);
      return;
    }
    const std::string prefix = "model.layers.0.mlp.experts.";
    if (name.rfind(prefix, 0) != 0) return;
    const std::string proj = name.substr(name.find('.', prefix.size()));  // ".gate_proj.weight"
    const TensorView& expert0 = source->Get(prefix + "0" + proj);
    for (size_t j = 0; j < v.size(); ++j) v[j] = ElementAsFloat(expert0, static_cast<int64_t>(j));
  };
  auto run = [&](const json& config, const std::string& tag) {
    testing::TempDir dir(tag);
    auto ckpt = WriteEdited(*source, config, dir.path(), clone_experts);
    EXPECT_NE(ckpt, nullptr);
    return ckpt ? Forward(*ckpt, kTokens) : ReferenceOutput{};
  };

  json v2_norm = base;  // weight sum 1
  v2_norm["norm_topk_prob"] = true;
  v2_norm["routed_scaling_factor"] = 16.0;
  json v2_plain = base;  // weight sum 4 * 4 / 16 = 1
  v2_plain["norm_topk_prob"] = false;
  v2_plain["routed_scaling_factor"] = 4.0;
  json v3_norm = base;  // weight sum 1 * 1
  v3_norm.update(json{{"model_type", "deepseek_v3"}, {"topk_method", "noaux_tc"},
                      {"scoring_func", "sigmoid"}, {"norm_topk_prob", true},
                      {"routed_scaling_factor", 1.0}});
  json v3_plain = v3_norm;  // weight sum 0.5 * 4 * 0.5 = 1
  v3_plain["norm_topk_prob"] = false;
  v3_plain["routed_scaling_factor"] = 0.5;
  json v2_double = v2_plain;  // weight sum 2: must differ
  v2_double["routed_scaling_factor"] = 8.0;

  const ReferenceOutput want = run(v2_norm, "v2_norm");
  ASSERT_EQ(want.logits.size(), kTokens.size());
  for (const auto& [config, tag] : std::vector<std::pair<json, std::string>>{
           {v2_plain, "v2_plain"}, {v3_norm, "v3_norm"}, {v3_plain, "v3_plain"}}) {
    SCOPED_TRACE(tag);
    const ReferenceOutput got = run(config, tag);
    ASSERT_EQ(got.logits.size(), kTokens.size());
    for (size_t t = 0; t < kTokens.size(); ++t) {
      EXPECT_LT(MaxAbsDifference(got.logits[t], want.logits[t]), 1e-9) << "position " << t;
    }
  }
  const ReferenceOutput doubled = run(v2_double, "v2_double");
  EXPECT_GT(MaxAbsDifference(doubled.logits[0], want.logits[0]), 1e-3);
}

// (e) BF16 and F32 checkpoints of the same seed hold the same values up to BF16
// rounding (relative 2^-9), so their logits agree to rounding size: about 2% of the
// largest logit after three layers for BF16 and 0.2% for F16 (seed 3); the bounds
// leave a margin of five.
TEST(ReferenceModelTest, Bf16AndF32Agree) {
  for (const std::string preset : {"tiny", "v3-tiny"}) {
    SCOPED_TRACE(preset);
    testing::TempDir bf16_dir("bf16");
    testing::TempDir f32_dir("f32");
    testing::TempDir f16_dir("f16");
    auto bf16 = WriteAndOpen(Preset(preset), bf16_dir.path(), /*seed=*/3, DType::kBF16);
    auto f32 = WriteAndOpen(Preset(preset), f32_dir.path(), /*seed=*/3, DType::kF32);
    auto f16 = WriteAndOpen(Preset(preset), f16_dir.path(), /*seed=*/3, DType::kF16);
    ASSERT_NE(bf16, nullptr);
    ASSERT_NE(f32, nullptr);
    ASSERT_NE(f16, nullptr);
    const ReferenceOutput a = Forward(*f32, kTokens);
    const ReferenceOutput b = Forward(*bf16, kTokens);
    const ReferenceOutput h = Forward(*f16, kTokens);
    for (size_t t = 0; t < kTokens.size(); ++t) {
      double scale = 0.0;
      for (double v : a.logits[t]) scale = std::max(scale, std::fabs(v));
      const double bf16_error = MaxAbsDifference(a.logits[t], b.logits[t]);
      const double f16_error = MaxAbsDifference(a.logits[t], h.logits[t]);
      EXPECT_GT(bf16_error, 0.0) << "BF16 rounding should show";
      EXPECT_LT(bf16_error, 0.1 * scale) << "position " << t;
      // F16 keeps 3 more mantissa bits than BF16.
      EXPECT_LT(f16_error, 0.01 * scale) << "position " << t;
    }
  }
}

}  // namespace
}  // namespace epic::reference
