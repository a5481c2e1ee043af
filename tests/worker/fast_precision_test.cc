// --precision fast in one process: which weights it quantizes, that its logits stay
// near the exact model's (the bound here is what per-row int8 can hold on a model with
// no routing to flip; docs/performance.md has the figures on larger checkpoints), and
// that on a processor without AVX2 (ctest runs this forced to avx2 and to plain as well)
// it runs exactly, bit for bit.
#include <algorithm>
#include <cmath>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "kernels/cpu/matmul_int8.h"
#include "tests/testing/random_values.h"
#include "tests/testing/temp_dir.h"
#include "worker/generate.h"
#include "worker/model.h"
#include "worker/random_checkpoint.h"

namespace epic {
namespace {

using nlohmann::json;

bool HostHasInt8() { return cpu::HasInt8Products(); }

struct Loaded {
  std::unique_ptr<Model> exact, fast;
};

Loaded LoadBoth(const std::filesystem::path& dir) {
  Loaded both;
  auto exact = Model::Load(dir);
  auto fast = Model::Load(dir, {}, WeightResidency::kCopy, {}, ComputeDevice::kCpu, cpu::Precision::kFast);
  EXPECT_TRUE(exact.ok()) << exact.status().ToString();
  EXPECT_TRUE(fast.ok()) << fast.status().ToString();
  if (exact.ok()) both.exact = std::move(*exact);
  if (fast.ok()) both.fast = std::move(*fast);
  return both;
}

std::filesystem::path Write(const testing::TempDir& dir, const std::string& preset, const json& overrides) {
  auto config = PresetConfig(preset);
  EXPECT_TRUE(config.ok());
  config->update(overrides);
  RandomCheckpointOptions options;
  options.seed = 11;
  EXPECT_TRUE(WriteRandomCheckpoint(*config, dir.path(), options).ok());
  return dir.path();
}

std::vector<float> PromptLogits(Model& model, const std::vector<int32_t>& prompt) {
  GenerateOptions o;
  o.prompt_logits = true;
  auto got = Generate(model, prompt, o);
  EXPECT_TRUE(got.ok()) << got.status().ToString();
  return got.ok() ? got->prompt_logits : std::vector<float>{};
}

TEST(FastPrecision, QuantizesTheProductsWeightsAndKeepsTheRest) {
  testing::TempDir dir("fast_weights");
  Loaded m = LoadBoth(Write(dir, "v2-160", json::object()));
  ASSERT_TRUE(m.exact && m.fast);
  if (!HostHasInt8()) {
    EXPECT_EQ(m.fast->precision(), cpu::Precision::kExact);
    GTEST_SKIP() << "no AVX2: fast runs exact (checked below)";
  }
  EXPECT_EQ(m.fast->precision(), cpu::Precision::kFast);
  EXPECT_EQ(m.exact->precision(), cpu::Precision::kExact);
  const ModelWeights& w = m.fast->weights();
  EXPECT_EQ(w.embed.type, cpu::WeightType::kBF16);
  EXPECT_EQ(w.lm_head.type, cpu::WeightType::kI8);
  for (const LayerWeights& L : w.layers) {
    EXPECT_EQ(L.kv_a_proj.type, cpu::WeightType::kI8);
    EXPECT_EQ(L.o_proj.type, cpu::WeightType::kI8);
    EXPECT_EQ(L.kv_b_proj.type, cpu::WeightType::kBF16);
    EXPECT_EQ(L.kv_b_expand.type, cpu::WeightType::kI8);
    const ModelConfig& c = m.fast->config();
    EXPECT_EQ(L.kv_b_uk.type, cpu::WeightType::kI8);
    EXPECT_EQ(L.kv_b_uk.rows, c.num_attention_heads * c.kv_lora_rank);
    EXPECT_EQ(L.kv_b_uk.cols, c.qk_nope_head_dim);
    EXPECT_EQ(m.exact->weights().layers[0].kv_b_uk.data, nullptr);
    if (!L.moe) continue;
    EXPECT_EQ(L.router.type, cpu::WeightType::kBF16);
    for (const MlpWeights& e : L.experts) {
      EXPECT_EQ(e.gate.type, cpu::WeightType::kI8);
      EXPECT_EQ(e.down.type, cpu::WeightType::kI8);
    }
    EXPECT_EQ(L.shared.up.type, cpu::WeightType::kI8);
  }
  // Int8 is half of BF16, plus a scale a row and padding.
  EXPECT_LT(w.matrix_bytes, m.exact->weights().matrix_bytes * 3 / 4);
}

// Per position, max |fast - exact| / max |exact| over the vocabulary.
std::vector<double> RowErrors(const std::vector<float>& fast, const std::vector<float>& exact, int64_t vocab) {
  std::vector<double> errors;
  for (size_t row = 0; row * vocab < exact.size(); ++row) {
    double diff = 0, scale = 0;
    for (int64_t v = 0; v < vocab; ++v) {
      diff = std::max(diff, std::fabs(double{fast[row * vocab + v]} - exact[row * vocab + v]));
      scale = std::max(scale, std::fabs(double{exact[row * vocab + v]}));
    }
    errors.push_back(diff / scale);
  }
  return errors;
}

// FAST within per-row int8's reach of EXACT (logits of positions x VOCAB), or equal to
// it on a host without int8 products.
void ExpectNearExact(const std::vector<float>& fast, const std::vector<float>& exact, int64_t vocab) {
  ASSERT_EQ(fast.size(), exact.size());
  if (!HostHasInt8()) {
    EXPECT_EQ(fast, exact) << "without AVX2 fast must run exactly";
    return;
  }
  std::vector<double> errors = RowErrors(fast, exact, vocab);
  std::sort(errors.begin(), errors.end());
  // Measured 2026-12-03 on a prompt: worst 0.034, median 0.021; 2026-12-05 decoding:
  // 0.032 / 0.025, then 0.049 / 0.028 over the BF16 latent cache (queries and
  // probabilities rounded to BF16 too). A wrong scale or a lost offset is ~1.
  EXPECT_LE(errors.back(), 0.06);
  EXPECT_LE(errors[errors.size() / 2], 0.04);
  EXPECT_GT(errors.back(), 0.0) << "fast ran exactly where it should have run int8";
}

// Dense layers only, hidden 256: every product is int8, nothing amplifies a small error.
const json kDense = {{"n_routed_experts", nullptr}, {"hidden_size", 256}};

TEST(FastPrecision, LogitsStayNearExactWhereNoRoutingCanFlip) {
  testing::TempDir dir("fast_dense");
  Loaded m = LoadBoth(Write(dir, "tiny", kDense));
  ASSERT_TRUE(m.exact && m.fast);
  const int64_t vocab = m.exact->config().vocab_size;
  const std::vector<int32_t> prompt = testing::Prompt(24, vocab, 5);
  ExpectNearExact(PromptLogits(*m.fast, prompt), PromptLogits(*m.exact, prompt), vocab);
}

// Each step's logits of TOKENS fed one at a time: decode's absorbed form (the W_UK and
// W_UV folds in int8, attention over the BF16 cache, under fast) rather than a prompt's
// expanded one.
std::vector<float> DecodeLogits(Model& model, const std::vector<int32_t>& tokens) {
  auto cache = model.MakeCache(16, 4);
  BlockTable table;
  EXPECT_TRUE(cache->Reserve(&table, static_cast<int64_t>(tokens.size())).ok());
  std::vector<float> all, logits;
  for (const int32_t& token : tokens) {
    SequenceStep step{&table, {&token, 1}, false};
    const Status s = model.Forward({&step, 1}, cache.get(), &logits);
    EXPECT_TRUE(s.ok()) << s.ToString();
    all.insert(all.end(), logits.begin(), logits.end());
  }
  return all;
}

TEST(FastPrecision, DecodeLogitsStayNearExactWhereNoRoutingCanFlip) {
  testing::TempDir dir("fast_dense_decode");
  Loaded m = LoadBoth(Write(dir, "tiny", kDense));
  ASSERT_TRUE(m.exact && m.fast);
  const int64_t vocab = m.exact->config().vocab_size;
  const std::vector<int32_t> tokens = testing::Prompt(24, vocab, 7);
  const std::vector<float> exact = DecodeLogits(*m.exact, tokens);
  ASSERT_EQ(exact.size(), tokens.size() * vocab);
  ExpectNearExact(DecodeLogits(*m.fast, tokens), exact, vocab);
}

TEST(FastPrecision, WithoutAvx2TheModelIsExactBitForBit) {
  if (HostHasInt8()) GTEST_SKIP() << "this host has int8 products (ctest runs this forced plain too)";
  testing::TempDir dir("fast_fallback");
  Loaded m = LoadBoth(Write(dir, "v2-160", json::object()));
  ASSERT_TRUE(m.exact && m.fast);
  EXPECT_EQ(m.fast->precision(), cpu::Precision::kExact);
  const std::vector<int32_t> prompt = testing::Prompt(9, m.exact->config().vocab_size, 2);
  EXPECT_EQ(PromptLogits(*m.fast, prompt), PromptLogits(*m.exact, prompt));
}

}  // namespace
}  // namespace epic
