// The optimised forward pass against the independent float64 reference, on random
// checkpoints covering every routing method, q LoRA on and off, YaRN, linear RoPE
// scaling, tied embeddings, dense-only models, BF16/F16/F32, one file and shards.
// Tolerance: per position, max |epic - reference| <= 1e-5 * max |reference|.
#include "worker/model.h"

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "tests/reference/reference_model.h"
#include "tests/testing/random_values.h"
#include "tests/testing/temp_dir.h"
#include "worker/generate.h"
#include "worker/random_checkpoint.h"

namespace epic {
namespace {

using nlohmann::json;

constexpr double kTolerance = 1e-5;

struct Case {
  std::string name;
  std::string preset;
  json overrides;
  DType dtype = DType::kBF16;
  int shards = 1;
  int num_tokens = 12;
};

void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

using epic::testing::Prompt;

// max_i |a_i - b_i| / max_i |b_i| over one row.
double RowError(const float* a, const std::vector<double>& b) {
  double diff = 0, scale = 0;
  for (size_t i = 0; i < b.size(); ++i) {
    diff = std::max(diff, std::fabs(a[i] - b[i]));
    scale = std::max(scale, std::fabs(b[i]));
  }
  return diff / scale;
}

class ModelVsReference : public ::testing::TestWithParam<Case> {};

TEST_P(ModelVsReference, PrefillLogitsAndExpertCountsMatch) {
  const Case& c = GetParam();
  testing::TempDir dir(c.name);
  auto config = PresetConfig(c.preset);
  ASSERT_TRUE(config.ok()) << config.status().ToString();
  config->update(c.overrides);
  RandomCheckpointOptions options;
  options.seed = 42;
  options.dtype = c.dtype;
  options.shards = c.shards;
  ASSERT_TRUE(WriteRandomCheckpoint(*config, dir.path(), options).ok());

  auto model = Model::Load(dir.path());
  ASSERT_TRUE(model.ok()) << model.status().ToString();
  const ModelConfig& mc = (*model)->config();
  const std::vector<int32_t> prompt = Prompt(c.num_tokens, mc.vocab_size, 1);

  GenerateOptions go;
  go.prompt_logits = true;
  go.block_size = 4;  // several blocks per sequence
  auto got = Generate(**model, prompt, go);
  ASSERT_TRUE(got.ok()) << got.status().ToString();

  auto ckpt = Checkpoint::Open(dir.path());
  ASSERT_TRUE(ckpt.ok());
  const std::vector<int64_t> tokens(prompt.begin(), prompt.end());
  const reference::ReferenceOutput want = reference::Forward(**ckpt, tokens);
  ASSERT_EQ(want.logits.size(), prompt.size());
  for (size_t t = 0; t < prompt.size(); ++t) {
    const double err = RowError(got->prompt_logits.data() + t * mc.vocab_size, want.logits[t]);
    EXPECT_LE(err, kTolerance) << "position " << t;
  }
  // The same experts were chosen for every token.
  for (int64_t l = 0; l < mc.num_hidden_layers; ++l) {
    if (!mc.IsMoeLayer(l)) continue;
    EXPECT_EQ(got->expert_counts.tokens[l], want.expert_counts[l]) << "layer " << l;
  }
}

INSTANTIATE_TEST_SUITE_P(
    Configs, ModelVsReference,
    ::testing::Values(
        Case{"tiny_group_limited", "tiny", json::object()},
        Case{"v2_160_yarn_sharded", "v2-160", json::object(), DType::kBF16, 3, 16},
        Case{"v2_160_no_q_lora_greedy", "v2-160",
             json{{"q_lora_rank", nullptr}, {"topk_method", "greedy"}, {"n_group", 1}, {"topk_group", 1}}},
        Case{"v2_160_normalised", "v2-160", json{{"norm_topk_prob", true}, {"rope_scaling", nullptr}}},
        Case{"v3_noaux_tc", "v3-tiny", json::object()},
        Case{"v3_noaux_tc_f32_sharded", "v3-tiny", json{{"rope_scaling", {{"type", "yarn"}, {"factor", 4}}}},
             DType::kF32, 2},
        Case{"tiny_linear_rope_tied_freq2_f16", "tiny",
             json{{"rope_scaling", {{"type", "linear"}, {"factor", 2.0}, {"mscale_all_dim", 1.0}}}, {"tie_word_embeddings", true},
                  {"moe_layer_freq", 2}, {"first_k_dense_replace", 0}, {"num_hidden_layers", 4}},
             DType::kF16},
        Case{"dense_only", "tiny", json{{"n_routed_experts", nullptr}, {"q_lora_rank", nullptr}}},
        Case{"tiny_long_prompt", "tiny", json{{"max_position_embeddings", 256}}, DType::kBF16, 1, 70}),
    [](const ::testing::TestParamInfo<Case>& info) { return info.param.name; });

class ModelSteps : public ::testing::Test {
 protected:
  void SetUp() override {
    auto config = PresetConfig("v2-160");
    ASSERT_TRUE(config.ok());
    RandomCheckpointOptions options;
    options.seed = 3;
    ASSERT_TRUE(WriteRandomCheckpoint(*config, dir_.path(), options).ok());
    auto model = Model::Load(dir_.path());
    ASSERT_TRUE(model.ok()) << model.status().ToString();
    model_ = std::move(*model);
  }

  // Logits at every position, fed N tokens per step.
  std::vector<float> RunInSteps(const std::vector<int32_t>& tokens, size_t per_step) {
    auto cache = model_->MakeCache(4, 64);
    BlockTable table;
    EXPECT_TRUE(cache->Reserve(&table, static_cast<int64_t>(tokens.size())).ok());
    std::vector<float> all, logits;
    for (size_t i = 0; i < tokens.size(); i += per_step) {
      const size_t n = std::min(per_step, tokens.size() - i);
      SequenceStep step{&table, {tokens.data() + i, n}, true};
      EXPECT_TRUE(model_->Forward({&step, 1}, cache.get(), &logits).ok());
      all.insert(all.end(), logits.begin(), logits.end());
    }
    return all;
  }

  testing::TempDir dir_{"steps"};
  std::unique_ptr<Model> model_;
};

double MaxRelativeError(const std::vector<float>& a, const std::vector<float>& b, int64_t row) {
  double worst = 0;
  for (size_t r = 0; r < a.size() / row; ++r) {
    double diff = 0, scale = 0;
    for (int64_t i = 0; i < row; ++i) {
      diff = std::max(diff, std::fabs(double(a[r * row + i]) - b[r * row + i]));
      scale = std::max(scale, std::fabs(double(b[r * row + i])));
    }
    worst = std::max(worst, diff / scale);
  }
  return worst;
}

TEST_F(ModelSteps, PrefillLogitsEqualDecodeStepLogits) {
  const std::vector<int32_t> tokens = Prompt(20, model_->config().vocab_size, 9);
  const std::vector<float> prefill = RunInSteps(tokens, tokens.size());
  const std::vector<float> decode = RunInSteps(tokens, 1);
  const std::vector<float> chunks = RunInSteps(tokens, 7);  // chunked prefill over cached context
  ASSERT_EQ(prefill.size(), decode.size());
  EXPECT_LE(MaxRelativeError(decode, prefill, model_->config().vocab_size), kTolerance);
  EXPECT_LE(MaxRelativeError(chunks, prefill, model_->config().vocab_size), kTolerance);
}

TEST_F(ModelSteps, AbsorbedAndExpandedFormsAgree) {
  const std::vector<int32_t> tokens = Prompt(15, model_->config().vocab_size, 4);
  model_->set_attention_form(AttentionForm::kExpanded);
  const std::vector<float> expanded = RunInSteps(tokens, 5);
  model_->set_attention_form(AttentionForm::kAbsorbed);
  const std::vector<float> absorbed = RunInSteps(tokens, 5);
  model_->set_attention_form(AttentionForm::kAuto);
  EXPECT_LE(MaxRelativeError(absorbed, expanded, model_->config().vocab_size), kTolerance);
}

TEST_F(ModelSteps, BatchOfUnequalSequencesEqualsEachAlone) {
  const int64_t vocab = model_->config().vocab_size;
  const std::vector<int32_t> a = Prompt(9, vocab, 1), b = Prompt(3, vocab, 2), c = Prompt(14, vocab, 3);
  auto cache = model_->MakeCache(4, 64);
  BlockTable ta, tb, tc;
  for (auto* t : {&ta, &tb, &tc}) ASSERT_TRUE(cache->Reserve(t, 16).ok());
  // Step 1: a and c prefill, b absent. Step 2: a decodes one, b prefills, c decodes one.
  std::vector<float> l1, l2;
  std::vector<SequenceStep> s1 = {{&ta, {a.data(), 8}, false}, {&tc, {c.data(), 13}, false}};
  ASSERT_TRUE(model_->Forward(s1, cache.get(), &l1).ok());
  std::vector<SequenceStep> s2 = {
      {&ta, {a.data() + 8, 1}, false}, {&tb, {b.data(), 3}, false}, {&tc, {c.data() + 13, 1}, false}};
  ASSERT_TRUE(model_->Forward(s2, cache.get(), &l2).ok());
  ASSERT_EQ(l2.size(), static_cast<size_t>(3 * vocab));

  auto alone = [&](const std::vector<int32_t>& t) {
    std::vector<float> all = RunInSteps(t, t.size());
    return std::vector<float>(all.end() - vocab, all.end());
  };
  const std::vector<float> wa = alone(a), wb = alone(b), wc = alone(c);
  EXPECT_LE(MaxRelativeError(std::vector<float>(l2.begin(), l2.begin() + vocab), wa, vocab), kTolerance);
  EXPECT_LE(MaxRelativeError(std::vector<float>(l2.begin() + vocab, l2.begin() + 2 * vocab), wb, vocab), kTolerance);
  EXPECT_LE(MaxRelativeError(std::vector<float>(l2.begin() + 2 * vocab, l2.end()), wc, vocab), kTolerance);
  EXPECT_EQ(ta.num_tokens, 9);
  EXPECT_EQ(tb.num_tokens, 3);
  EXPECT_EQ(tc.num_tokens, 14);
}

// Forward adds each phase's time while given a record, within the step's own time, and
// nothing once given nullptr; v2-160 has a dense layer, MoE layers and shared experts.
TEST_F(ModelSteps, PhaseTimesCoverTheScheduleAndStopWhenUnset) {
  const std::vector<int32_t> tokens = Prompt(12, model_->config().vocab_size, 5);
  auto cache = model_->MakeCache(4, 64);
  BlockTable table;
  ASSERT_TRUE(cache->Reserve(&table, 13).ok());
  PhaseTimes times;
  model_->set_phase_times(&times);
  std::vector<float> logits;
  SequenceStep step{&table, tokens, false};
  const auto t0 = std::chrono::steady_clock::now();
  ASSERT_TRUE(model_->Forward({&step, 1}, cache.get(), &logits).ok());
  const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  double sum = 0;
  for (int i = 0; i < static_cast<int>(Phase::kCount); ++i) {
    const Phase p = static_cast<Phase>(i);
    EXPECT_GT(times[p], 0.0) << PhaseName(p);
    sum += times[p];
  }
  EXPECT_LE(sum, wall);
  model_->set_phase_times(nullptr);
  const PhaseTimes before = times;
  const int32_t next = 7;
  SequenceStep decode{&table, {&next, 1}, false};
  ASSERT_TRUE(model_->Forward({&decode, 1}, cache.get(), &logits).ok());
  EXPECT_EQ(times.seconds, before.seconds);
}

TEST_F(ModelSteps, RepeatedGreedyGenerationsAreIdentical) {
  GenerateOptions o;
  o.max_new_tokens = 12;
  o.stop_at_eos = false;
  const std::vector<int32_t> prompt = {5, 17, 300};
  auto first = Generate(*model_, prompt, o);
  auto second = Generate(*model_, prompt, o);
  ASSERT_TRUE(first.ok() && second.ok());
  EXPECT_EQ(first->tokens, second->tokens);
  EXPECT_EQ(first->tokens.size(), 12u);
}

TEST_F(ModelSteps, BadInputIsRefusedWithoutTouchingTheCache) {
  auto cache = model_->MakeCache(4, 8);
  BlockTable table;
  ASSERT_TRUE(cache->Reserve(&table, 4).ok());
  std::vector<float> logits;
  const int32_t bad[] = {1, static_cast<int32_t>(model_->config().vocab_size)};
  SequenceStep step{&table, {bad, 2}, false};
  const Status s = model_->Forward({&step, 1}, cache.get(), &logits);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("outside the vocabulary"), std::string::npos) << s.message();
  EXPECT_EQ(table.num_tokens, 0);

  const int32_t many[] = {1, 2, 3, 4, 5};  // 5 tokens, 4 reserved
  SequenceStep over{&table, {many, 5}, false};
  EXPECT_EQ(model_->Forward({&over, 1}, cache.get(), &logits).code(), StatusCode::kFailedPrecondition);

  GenerateOptions o;
  o.max_new_tokens = 1 << 20;
  const std::vector<int32_t> prompt = {1};
  EXPECT_EQ(Generate(*model_, prompt, o).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(Generate(*model_, std::vector<int32_t>{}, GenerateOptions{}).status().code(),
            StatusCode::kInvalidArgument);
}

// Overwrites tensor NAME of the single-file checkpoint in DIR with BF16 NaNs.
void PoisonWithNaN(const std::filesystem::path& dir, const std::string& name) {
  const std::filesystem::path file = dir / "model.safetensors";
  std::fstream f(file, std::ios::in | std::ios::out | std::ios::binary);
  uint64_t len = 0;
  f.read(reinterpret_cast<char*>(&len), 8);
  std::string header(len, '\0');
  f.read(header.data(), static_cast<std::streamsize>(len));
  const json h = json::parse(header);
  ASSERT_TRUE(h.contains(name)) << name;
  ASSERT_EQ(h[name]["dtype"], "BF16");
  const uint64_t begin = h[name]["data_offsets"][0], end = h[name]["data_offsets"][1];
  std::string nans;
  for (uint64_t b = begin; b < end; b += 2) nans += std::string("\xC0\x7F", 2);  // 0x7FC0, little-endian
  f.seekp(static_cast<std::streamoff>(8 + len + begin));
  f.write(nans.data(), static_cast<std::streamsize>(nans.size()));
  ASSERT_TRUE(f.good());
}

// Broken weights give non-finite logits: an error naming the layer where NaN first
// appears, and the step leaves the cache as it was (no token 0 emitted as if all were well).
TEST(ModelNonFinite, NaNWeightsAreAnErrorNamingTheLayer) {
  for (const auto& [tensor, where] : {std::pair<std::string, std::string>{"model.layers.1.self_attn.o_proj.weight",
                                                                          "layer 1 (MoE)"},
                                      {"lm_head.weight", "final norm or lm_head"}}) {
    SCOPED_TRACE(tensor);
    testing::TempDir dir("nan");
    auto config = PresetConfig("v2-160");
    ASSERT_TRUE(config.ok());
    ASSERT_TRUE(WriteRandomCheckpoint(*config, dir.path(), RandomCheckpointOptions{}).ok());
    PoisonWithNaN(dir.path(), tensor);
    auto model = Model::Load(dir.path());
    ASSERT_TRUE(model.ok()) << model.status().ToString();
    auto cache = (*model)->MakeCache(4, 8);
    BlockTable table;
    ASSERT_TRUE(cache->Reserve(&table, 6).ok());
    const int32_t tokens[] = {5, 17, 300, 42};
    SequenceStep step{&table, {tokens, 4}, false};
    std::vector<float> logits;
    const Status s = (*model)->Forward({&step, 1}, cache.get(), &logits);
    EXPECT_EQ(s.code(), StatusCode::kInternal);
    EXPECT_NE(s.message().find(where), std::string::npos) << s.message();
    EXPECT_NE(s.message().find("4 token(s)"), std::string::npos) << s.message();
    EXPECT_EQ(table.num_tokens, 0);
  }
}

}  // namespace
}  // namespace epic
