// The model spread over real mpirun ranks (heads, vocabulary and experts split)
// against the same checkpoint run in one process: logits within 1e-5 relative per
// row, and identical greedy generations.
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "parallel/communicator.h"
#include "worker/generate.h"
#include "worker/model.h"
#include "worker/random_checkpoint.h"

namespace epic {
namespace {

using nlohmann::json;

constexpr double kTolerance = 1e-5;

class DistributedModelTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto c = parallel::MakeMpiCommunicator();
    ASSERT_TRUE(c.ok()) << c.status().ToString();
    comm_ = std::move(*c);
  }
  void TearDown() override {
    (void)comm_->Barrier();
    if (comm_->rank() == 0 && !dir_.empty()) std::filesystem::remove_all(dir_);
  }

  // Rank 0 writes the checkpoint; every rank gets its path.
  std::filesystem::path Write(const std::string& preset, const json& overrides) {
    char path[256] = {};
    if (comm_->rank() == 0) {
      std::snprintf(path, sizeof path, "%s/epic-dist-%d-%d", ::testing::TempDir().c_str(), ::getpid(),
                    counter_++);
      auto config = PresetConfig(preset);
      EXPECT_TRUE(config.ok());
      config->update(overrides);
      RandomCheckpointOptions o;
      o.seed = 11;
      const Status s = WriteRandomCheckpoint(*config, path, o);
      EXPECT_TRUE(s.ok()) << s.ToString();
    }
    EXPECT_TRUE(comm_->Broadcast(path, sizeof path, 0).ok());
    dir_ = path;
    return dir_;
  }

  void ExpectSameAsOneProcess(const std::filesystem::path& dir, const parallel::ExpertPlacement* placement) {
    auto single = Model::Load(dir);
    ASSERT_TRUE(single.ok()) << single.status().ToString();
    auto dist = Model::Load(dir, {}, WeightResidency::kCopy, {comm_.get(), placement});
    ASSERT_TRUE(dist.ok()) << dist.status().ToString();
    const int64_t vocab = (*single)->config().vocab_size;
    const std::vector<int32_t> prompt = {3, 99, 250, 7, 1000 % static_cast<int32_t>(vocab), 42, 5, 77, 12, 600 % static_cast<int32_t>(vocab), 31};

    GenerateOptions o;
    o.prompt_logits = true;
    o.max_new_tokens = 6;
    o.stop_at_eos = false;
    o.block_size = 4;
    auto want = Generate(**single, prompt, o);
    auto got = Generate(**dist, prompt, o);
    ASSERT_TRUE(want.ok() && got.ok());
    ASSERT_EQ(got->prompt_logits.size(), want->prompt_logits.size());
    for (size_t row = 0; row < prompt.size(); ++row) {
      double diff = 0, scale = 0;
      for (int64_t i = 0; i < vocab; ++i) {
        diff = std::max(diff, std::fabs(double(got->prompt_logits[row * vocab + i]) - want->prompt_logits[row * vocab + i]));
        scale = std::max(scale, std::fabs(double(want->prompt_logits[row * vocab + i])));
      }
      EXPECT_LE(diff / scale, kTolerance) << "position " << row << " on rank " << comm_->rank();
    }
    EXPECT_EQ(got->tokens, want->tokens);
    // Expert counts are the job's, not this rank's.
    for (size_t l = 0; l < want->expert_counts.tokens.size(); ++l) {
      EXPECT_EQ(got->expert_counts.tokens[l], want->expert_counts.tokens[l]) << "layer " << l;
    }
    // Each rank holds its share of the experts: fewer bytes than the whole model.
    if (comm_->size() > 1) {
      EXPECT_LT((*dist)->weights().matrix_bytes, (*single)->weights().matrix_bytes);
    }
  }

  std::unique_ptr<parallel::Communicator> comm_;
  std::filesystem::path dir_;
  static inline int counter_ = 0;
};

// 8 heads so that 8 ranks each hold one.
const json kEightHeads = {{"num_attention_heads", 8}};

TEST_F(DistributedModelTest, V2GroupLimitedWithQLora) {
  ExpectSameAsOneProcess(Write("v2-160", kEightHeads), nullptr);
}

TEST_F(DistributedModelTest, V2GreedyWithoutQLora) {
  json o = kEightHeads;
  o.update(json{{"q_lora_rank", nullptr}, {"topk_method", "greedy"}, {"n_group", 1}, {"topk_group", 1}});
  ExpectSameAsOneProcess(Write("v2-160", o), nullptr);
}

TEST_F(DistributedModelTest, V3NoauxTc) {
  json o = kEightHeads;
  o.update(json{{"n_routed_experts", 160}, {"n_group", 8}, {"topk_group", 3}, {"num_experts_per_tok", 6}});
  ExpectSameAsOneProcess(Write("v3-tiny", o), nullptr);
}

TEST_F(DistributedModelTest, RedundantReplicasGiveTheSameLogits) {
  const std::filesystem::path dir = Write("v2-160", kEightHeads);
  auto config = LoadModelConfig(dir);
  ASSERT_TRUE(config.ok());
  std::vector<bool> moe(static_cast<size_t>(config->num_hidden_layers));
  for (int64_t l = 0; l < config->num_hidden_layers; ++l) moe[l] = config->IsMoeLayer(l);
  const auto placement = parallel::ExpertPlacement::Contiguous(config->num_hidden_layers, moe,
                                                               config->n_routed_experts, comm_->size(), 7);
  ExpectSameAsOneProcess(dir, &placement);
}

}  // namespace
}  // namespace epic
