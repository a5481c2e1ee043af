// The whole forward step on the GPU (Model loaded with ComputeDevice::kCuda) against
// the CPU step on random checkpoints: prefill logits within BF16 tolerance, decode
// equal to prefill, a batch equal to its sequences alone, repeated runs bit for bit,
// the routed-expert counts. Without a GPU those cases report SKIPPED; what a machine
// without one must do (refuse cuda clearly) is tested there instead.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "tests/kernels/cuda_test_util.h"
#include "tests/testing/random_values.h"
#include "tests/testing/temp_dir.h"
#include "parallel/expert_placement.h"
#include "worker/device.h"
#include "worker/generate.h"
#include "worker/model.h"
#include "worker/random_checkpoint.h"

namespace epic {
namespace {

// The GPU step rounds every product's activations to BF16 (the CPU keeps F32) and keeps
// the cache in BF16: per logits row, max |gpu - cpu| <= kBf16Tolerance * max |cpu|.
constexpr double kBf16Tolerance = 5e-2;
// Two GPU runs of the same tokens in different step shapes differ only in the order of
// F32 sums (cuBLAS picks its kernel by shape; the attention splits by context).
constexpr double kShapeTolerance = 2e-3;

using epic::testing::Prompt;

// The worst row of A against B, each row's error relative to B's largest magnitude.
double WorstRowError(const std::vector<float>& a, const std::vector<float>& b, int64_t vocab) {
  double worst = 0;
  for (size_t row = 0; row * vocab < b.size(); ++row) {
    double diff = 0, scale = 0;
    for (int64_t v = 0; v < vocab; ++v) {
      const size_t i = row * vocab + v;
      diff = std::max(diff, std::fabs(static_cast<double>(a[i]) - b[i]));
      scale = std::max(scale, std::fabs(static_cast<double>(b[i])));
    }
    worst = std::max(worst, diff / std::max(scale, 1e-30));
  }
  return worst;
}

// Logits of every prompt position in one prefill step.
StatusOr<std::vector<float>> PrefillLogits(Model& model, const std::vector<int32_t>& prompt,
                                           ExpertCounts* counts = nullptr) {
  auto cache = model.MakeCache(16, 64);
  BlockTable table;
  EPIC_RETURN_IF_ERROR(cache->Reserve(&table, static_cast<int64_t>(prompt.size())));
  SequenceStep step{&table, prompt, /*all_logits=*/true};
  std::vector<float> logits;
  EPIC_RETURN_IF_ERROR(model.Forward({&step, 1}, cache.get(), &logits, counts));
  return logits;
}

class CudaModel : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    SKIP_WITHOUT_GPU();
    nlohmann::json config = PresetConfig(GetParam()).value();
    RandomCheckpointOptions options;
    options.seed = 5;
    ASSERT_OK(WriteRandomCheckpoint(config, dir_.path(), options));
    ASSERT_OK_AND_ASSIGN(cpu_, Model::Load(dir_.path()));
    ASSERT_OK_AND_ASSIGN(gpu_, Model::Load(dir_.path(), {}, WeightResidency::kCopy, {}, ComputeDevice::kCuda));
    ASSERT_EQ(gpu_->device(), ComputeDevice::kCuda);
    vocab_ = cpu_->config().vocab_size;
  }

  testing::TempDir dir_{"cuda-model"};
  std::unique_ptr<Model> cpu_, gpu_;
  int64_t vocab_ = 0;
};

TEST_P(CudaModel, PrefillLogitsMatchTheCpuWithinBf16) {
  const std::vector<int32_t> prompt = Prompt(23, vocab_, 1);
  ExpertCounts cpu_counts, gpu_counts;
  ASSERT_OK_AND_ASSIGN(auto want, PrefillLogits(*cpu_, prompt, &cpu_counts));
  ASSERT_OK_AND_ASSIGN(auto got, PrefillLogits(*gpu_, prompt, &gpu_counts));
  ASSERT_EQ(got.size(), want.size());
  for (float v : got) ASSERT_TRUE(std::isfinite(v));
  EXPECT_LE(WorstRowError(got, want, vocab_), kBf16Tolerance);

  // Every token reaches top_k experts on both; near-ties may route a few differently.
  ASSERT_EQ(gpu_counts.tokens.size(), cpu_counts.tokens.size());
  const int64_t k = cpu_->config().num_experts_per_tok;
  for (size_t l = 0; l < cpu_counts.tokens.size(); ++l) {
    if (cpu_counts.tokens[l].empty()) continue;
    ASSERT_EQ(gpu_counts.tokens[l].size(), cpu_counts.tokens[l].size()) << "layer " << l;
    int64_t total = 0, same = 0;
    for (size_t e = 0; e < cpu_counts.tokens[l].size(); ++e) {
      total += gpu_counts.tokens[l][e];
      same += std::min(gpu_counts.tokens[l][e], cpu_counts.tokens[l][e]);
    }
    EXPECT_EQ(total, static_cast<int64_t>(prompt.size()) * k) << "layer " << l;
    EXPECT_GE(same, total * 9 / 10) << "layer " << l;
  }
}

TEST_P(CudaModel, BothAttentionFormsMatchTheCpu) {
  const std::vector<int32_t> prompt = Prompt(29, vocab_, 7);
  ASSERT_OK_AND_ASSIGN(auto want, PrefillLogits(*cpu_, prompt));
  std::vector<std::vector<float>> got;
  for (AttentionForm form : {AttentionForm::kAbsorbed, AttentionForm::kExpanded}) {
    gpu_->set_attention_form(form);
    ASSERT_OK_AND_ASSIGN(auto logits, PrefillLogits(*gpu_, prompt));
    EXPECT_LE(WorstRowError(logits, want, vocab_), kBf16Tolerance)
        << (form == AttentionForm::kAbsorbed ? "absorbed" : "expanded");
    got.push_back(std::move(logits));
  }
  gpu_->set_attention_form(AttentionForm::kAuto);
  // The two forms round different intermediates to BF16; they agree as closely as either
  // agrees with the CPU.
  EXPECT_LE(WorstRowError(got[1], got[0], vocab_), kBf16Tolerance);
}

TEST_P(CudaModel, DecodeEqualsPrefill) {
  const std::vector<int32_t> prompt = Prompt(19, vocab_, 2);
  ASSERT_OK_AND_ASSIGN(auto prefill, PrefillLogits(*gpu_, prompt));
  auto cache = gpu_->MakeCache(4, 16);
  BlockTable table;
  ASSERT_OK(cache->Reserve(&table, static_cast<int64_t>(prompt.size())));
  std::vector<float> decoded, logits;
  for (size_t i = 0; i < prompt.size(); ++i) {
    SequenceStep step{&table, {&prompt[i], 1}, false};
    ASSERT_OK(gpu_->Forward({&step, 1}, cache.get(), &logits));
    decoded.insert(decoded.end(), logits.begin(), logits.end());
  }
  EXPECT_LE(WorstRowError(decoded, prefill, vocab_), kShapeTolerance);
}

TEST_P(CudaModel, ABatchEqualsItsSequencesAlone) {
  const std::vector<int32_t> a = Prompt(9, vocab_, 3), b = Prompt(30, vocab_, 4);
  ASSERT_OK_AND_ASSIGN(auto alone_a, PrefillLogits(*gpu_, a));
  ASSERT_OK_AND_ASSIGN(auto alone_b, PrefillLogits(*gpu_, b));
  auto cache = gpu_->MakeCache(16, 16);
  BlockTable ta, tb;
  ASSERT_OK(cache->Reserve(&ta, static_cast<int64_t>(a.size())));
  ASSERT_OK(cache->Reserve(&tb, static_cast<int64_t>(b.size())));
  SequenceStep steps[] = {{&ta, a, true}, {&tb, b, true}};
  std::vector<float> together;
  ASSERT_OK(gpu_->Forward(steps, cache.get(), &together));
  std::vector<float> want = alone_a;
  want.insert(want.end(), alone_b.begin(), alone_b.end());
  EXPECT_LE(WorstRowError(together, want, vocab_), kShapeTolerance);
}

TEST_P(CudaModel, RepeatedRunsAreIdentical) {
  const std::vector<int32_t> prompt = Prompt(11, vocab_, 5);
  GenerateOptions options;
  options.max_new_tokens = 8;
  options.stop_at_eos = false;
  options.prompt_logits = true;
  ASSERT_OK_AND_ASSIGN(auto first, Generate(*gpu_, prompt, options));
  ASSERT_OK_AND_ASSIGN(auto second, Generate(*gpu_, prompt, options));
  EXPECT_EQ(first.tokens, second.tokens);
  ASSERT_EQ(first.prompt_logits.size(), second.prompt_logits.size());
  EXPECT_EQ(0, std::memcmp(first.prompt_logits.data(), second.prompt_logits.data(),
                           first.prompt_logits.size() * sizeof(float)));
}

TEST_P(CudaModel, ChangingThePlacementKeepsTheLogits) {
  const std::vector<int32_t> prompt = Prompt(13, vocab_, 6);
  ASSERT_OK_AND_ASSIGN(auto before, PrefillLogits(*gpu_, prompt));
  // One rank holds every expert; a new placement reorders its slots, so every expert
  // moves to another slot (and is copied to the GPU again).
  parallel::ExpertPlacement::Table table = gpu_->placement().table();
  for (auto& layer : table) {
    for (auto& slots : layer) std::reverse(slots.begin(), slots.end());
  }
  ASSERT_OK_AND_ASSIGN(auto reversed,
                       parallel::ExpertPlacement::Create(table, gpu_->config().n_routed_experts));
  ASSERT_OK_AND_ASSIGN(PlacementChange change, gpu_->ApplyPlacement(reversed));
  EXPECT_EQ(change.experts_loaded, 0);  // reordered, not new: every expert stays on the rank
  ASSERT_OK_AND_ASSIGN(auto after, PrefillLogits(*gpu_, prompt));
  EXPECT_LE(WorstRowError(after, before, vocab_), kShapeTolerance);
}

TEST_P(CudaModel, BadTokensAreRefusedAndTheModelStillRuns) {
  const std::vector<int32_t> prompt = Prompt(3, vocab_, 6);
  auto cache = gpu_->MakeCache(16, 1);
  BlockTable table;
  ASSERT_OK(cache->Reserve(&table, 3));
  std::vector<int32_t> bad = prompt;
  bad[1] = static_cast<int32_t>(vocab_);
  SequenceStep step{&table, bad, false};
  std::vector<float> logits;
  EXPECT_EQ(gpu_->Forward({&step, 1}, cache.get(), &logits).code(), StatusCode::kInvalidArgument);
  SequenceStep good{&table, prompt, false};
  EXPECT_TRUE(gpu_->Forward({&good, 1}, cache.get(), &logits).ok());
}

// Greedy and group-limited (V2, 160 experts) and noaux_tc with its bias (V3).
INSTANTIATE_TEST_SUITE_P(Presets, CudaModel, ::testing::Values("tiny", "v2-160", "v3-tiny"),
                         [](const ::testing::TestParamInfo<std::string>& info) {
                           std::string name = info.param;
                           std::replace(name.begin(), name.end(), '-', '_');
                           return name;
                         });

// On a machine without a GPU (or a build without CUDA), cuda is refused with a reason.
TEST(CudaDevice, WithoutAGpuCudaIsRefusedClearly) {
  auto resolved = ResolveDevice("cuda");
  if (resolved.ok()) GTEST_SKIP() << "a GPU is visible: the refusal cannot be seen here";
  EXPECT_EQ(resolved.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(resolved.status().message().find("--device cuda"), std::string::npos) << resolved.status().message();

  testing::TempDir dir("cuda-refused");
  RandomCheckpointOptions options;
  ASSERT_OK(WriteRandomCheckpoint(PresetConfig("tiny").value(), dir.path(), options));
  auto model = Model::Load(dir.path(), {}, WeightResidency::kCopy, {}, ComputeDevice::kCuda);
  ASSERT_FALSE(model.ok());
  EXPECT_EQ(model.status().code(), StatusCode::kFailedPrecondition) << model.status().ToString();
}

TEST(CudaDevice, NamesOtherThanCpuAndCudaAreInvalid) {
  EXPECT_EQ(ResolveDevice("cpu").value(), ComputeDevice::kCpu);
  EXPECT_EQ(ResolveDevice("tpu").status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(ResolveDevice("").status().code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace epic
