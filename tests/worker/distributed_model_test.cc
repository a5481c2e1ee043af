// The model spread over real mpirun ranks (heads, vocabulary and experts split)
// against the same checkpoint run in one process: logits within 1e-5 relative per
// row, and identical greedy generations.
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "parallel/communicator.h"
#include "tests/testing/job_checkpoint.h"
#include "worker/generate.h"
#include "worker/model.h"
#include "worker/random_checkpoint.h"
#include "worker/step_stats.h"

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
  // GOT and WANT, rows of VOCAB logits each, equal to TOLERANCE relative per row.
  void ExpectRowsClose(const std::vector<float>& got, const std::vector<float>& want, int64_t vocab,
                       const std::string& what, double tolerance = kTolerance) {
    ASSERT_EQ(got.size(), want.size()) << what;
    for (size_t row = 0; row * vocab < want.size(); ++row) {
      double diff = 0, scale = 0;
      for (int64_t i = 0; i < vocab; ++i) {
        diff = std::max(diff, std::fabs(double(got[row * vocab + i]) - want[row * vocab + i]));
        scale = std::max(scale, std::fabs(double(want[row * vocab + i])));
      }
      EXPECT_LE(diff / scale, tolerance) << what << "position " << row << " on rank " << comm_->rank();
    }
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
    ExpectRowsClose(got->prompt_logits, want->prompt_logits, vocab, "");
    EXPECT_EQ(got->tokens, want->tokens);
    // Expert counts are the job's, not this rank's.
    for (size_t l = 0; l < want->expert_counts.tokens.size(); ++l) {
      EXPECT_EQ(got->expert_counts.tokens[l], want->expert_counts.tokens[l]) << "layer " << l;
    }
    // The one gathered record of the job's MoE work: its slots' tokens add up to the
    // job's tokens per expert, and every byte sent is a byte received.
    auto stats = GatherStepStats(**dist, got->expert_counts);
    ASSERT_TRUE(stats.ok()) << stats.status().ToString();
    ASSERT_EQ(stats->slot_tokens.size(), static_cast<size_t>(comm_->size()));
    const auto per_expert = stats->ExpertTokens((*dist)->placement(), (*dist)->config().n_routed_experts);
    for (size_t i = 0; i < stats->moe_layers.size(); ++i) {
      EXPECT_EQ(per_expert[i], want->expert_counts.tokens[static_cast<size_t>(stats->moe_layers[i])]) << "layer " << i;
      int64_t sent = 0, received = 0, back = 0, returned = 0;
      for (int r = 0; r < comm_->size(); ++r) {
        sent += stats->dispatch[r][i].bytes_sent;
        received += stats->dispatch[r][i].bytes_received;
        back += stats->combine[r][i].bytes_sent;
        returned += stats->combine[r][i].bytes_received;
      }
      EXPECT_EQ(sent, received);
      EXPECT_EQ(back, returned);
    }
    // Each rank holds its share of the experts: fewer bytes than the whole model.
    if (comm_->size() > 1) {
      EXPECT_LT((*dist)->weights().matrix_bytes, (*single)->weights().matrix_bytes);
    }
  }

  // A batch of prompts of mixed lengths, in one process and spread over the job with
  // ATTENTION, both at PRECISION: every prompt's logits within TOLERANCE and the same
  // greedy tokens.
  void ExpectBatchSameAsOneProcess(const std::filesystem::path& dir, AttentionMode attention,
                                   cpu::Precision precision = cpu::Precision::kExact,
                                   double tolerance = kTolerance) {
    auto single = Model::Load(dir, {}, WeightResidency::kCopy, {}, ComputeDevice::kCpu, precision);
    ASSERT_TRUE(single.ok()) << single.status().ToString();
    ModelShard shard{comm_.get(), nullptr};
    shard.attention = attention;
    auto dist = Model::Load(dir, {}, WeightResidency::kCopy, shard, ComputeDevice::kCpu, precision);
    ASSERT_TRUE(dist.ok()) << dist.status().ToString();
    const int32_t vocab = static_cast<int32_t>((*single)->config().vocab_size);
    // Five prompts, so that at 8 ranks some hold none.
    std::vector<std::vector<int32_t>> prompts;
    for (int length : {11, 1, 23, 4, 9}) {
      std::vector<int32_t> p;
      for (int i = 0; i < length; ++i) p.push_back((37 * i + 11 * length + 3) % vocab);
      prompts.push_back(std::move(p));
    }
    GenerateOptions o;
    o.prompt_logits = true;
    o.max_new_tokens = 5;
    o.stop_at_eos = false;
    o.block_size = 4;
    auto want = GenerateBatch(**single, prompts, o);
    auto got = GenerateBatch(**dist, prompts, o);
    ASSERT_TRUE(want.ok()) << want.status().ToString();
    ASSERT_TRUE(got.ok()) << got.status().ToString();
    for (size_t p = 0; p < prompts.size(); ++p) {
      ExpectRowsClose((*got)[p].prompt_logits, (*want)[p].prompt_logits, vocab, "prompt " + std::to_string(p) + ", ",
                      tolerance);
      EXPECT_EQ((*got)[p].tokens, (*want)[p].tokens) << "prompt " << p;
    }
    for (size_t l = 0; l < (*want)[0].expert_counts.tokens.size(); ++l) {
      EXPECT_EQ((*got)[0].expert_counts.tokens[l], (*want)[0].expert_counts.tokens[l]) << "layer " << l;
    }
  }

  std::unique_ptr<parallel::Communicator> comm_;
};

// 8 heads so that 8 ranks each hold one.
const json kEightHeads = {{"num_attention_heads", 8}};

TEST_F(DistributedModelTest, V2GroupLimitedWithQLora) {
  const testing::JobCheckpoint checkpoint(*comm_, "v2-160", kEightHeads);
  ExpectSameAsOneProcess(checkpoint.path(), nullptr);
}

TEST_F(DistributedModelTest, ABatchOfMixedLengthsWithTensorParallelAttention) {
  const testing::JobCheckpoint checkpoint(*comm_, "v2-160", kEightHeads);
  ExpectBatchSameAsOneProcess(checkpoint.path(), AttentionMode::kTensor);
}

// Data-parallel attention is not bound by the heads: 4 heads, any number of ranks.
TEST_F(DistributedModelTest, ABatchOfMixedLengthsWithDataParallelAttention) {
  const testing::JobCheckpoint checkpoint(*comm_, "v2-160", json{{"num_attention_heads", 4}});
  ExpectBatchSameAsOneProcess(checkpoint.path(), AttentionMode::kData);
}

// Under dp every rank holds what one process holds, quantized alike; the int8 products
// are exact integer sums, so only the F32 parts' batch-dependent rounding differs (about
// 2e-7 measured): the same 1e-5 holds.
TEST_F(DistributedModelTest, FastPrecisionWithDataParallelAttention) {
  const testing::JobCheckpoint checkpoint(*comm_, "v2-160", json{{"num_attention_heads", 4}});
  ExpectBatchSameAsOneProcess(checkpoint.path(), AttentionMode::kData, cpu::Precision::kFast);
}

TEST_F(DistributedModelTest, DataParallelAttentionV3) {
  json o = {{"n_routed_experts", 160}, {"n_group", 8}, {"topk_group", 3}, {"num_experts_per_tok", 6},
            {"num_attention_heads", 2}};
  const testing::JobCheckpoint checkpoint(*comm_, "v3-tiny", o);
  ExpectBatchSameAsOneProcess(checkpoint.path(), AttentionMode::kData);
}

TEST_F(DistributedModelTest, V2GreedyWithoutQLora) {
  json o = kEightHeads;
  o.update(json{{"q_lora_rank", nullptr}, {"topk_method", "greedy"}, {"n_group", 1}, {"topk_group", 1}});
  const testing::JobCheckpoint checkpoint(*comm_, "v2-160", o);
  ExpectSameAsOneProcess(checkpoint.path(), nullptr);
}

TEST_F(DistributedModelTest, V3NoauxTc) {
  json o = kEightHeads;
  o.update(json{{"n_routed_experts", 160}, {"n_group", 8}, {"topk_group", 3}, {"num_experts_per_tok", 6}});
  const testing::JobCheckpoint checkpoint(*comm_, "v3-tiny", o);
  ExpectSameAsOneProcess(checkpoint.path(), nullptr);
}

TEST_F(DistributedModelTest, RedundantReplicasGiveTheSameLogits) {
  const testing::JobCheckpoint checkpoint(*comm_, "v2-160", kEightHeads);
  const std::filesystem::path& dir = checkpoint.path();
  auto config = LoadModelConfig(dir);
  ASSERT_TRUE(config.ok());
  std::vector<bool> moe(static_cast<size_t>(config->num_hidden_layers));
  for (int64_t l = 0; l < config->num_hidden_layers; ++l) moe[l] = config->IsMoeLayer(l);
  const auto placement = parallel::ExpertPlacement::Contiguous(config->num_hidden_layers, moe,
                                                               config->n_routed_experts, comm_->size(), 7);
  ExpectSameAsOneProcess(dir, &placement);
}

// A placement where rank r holds, in each MoE layer, the experts e with
// (e * 7 + layer) % N == r (a scramble of the contiguous blocks) and SPARE replicas of
// the experts after its last one.
parallel::ExpertPlacement Scrambled(const ModelConfig& c, int ranks, int spare) {
  parallel::ExpertPlacement::Table table(static_cast<size_t>(c.num_hidden_layers));
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    table[l].resize(static_cast<size_t>(ranks));
    if (!c.IsMoeLayer(l)) continue;
    for (int32_t e = 0; e < c.n_routed_experts; ++e) table[l][(e * 7 + l) % ranks].push_back(e);
    for (int r = 0; r < ranks; ++r) {
      // A rank can hold at most every expert once.
      const int room = static_cast<int>(c.n_routed_experts) - static_cast<int>(table[l][r].size());
      for (int k = 0; k < std::min(spare, room); ++k) {
        int32_t e = (table[l][r].back() + 1 + k) % static_cast<int32_t>(c.n_routed_experts);
        while (std::find(table[l][r].begin(), table[l][r].end(), e) != table[l][r].end()) {
          e = (e + 1) % static_cast<int32_t>(c.n_routed_experts);
        }
        table[l][r].push_back(e);
      }
    }
  }
  auto p = parallel::ExpertPlacement::Create(table, c.n_routed_experts);
  EXPECT_TRUE(p.ok()) << p.status().ToString();
  return *p;
}

// Live placement changes at PRECISION: the outputs stay, memory returns to where it was.
void ExpectPlacementChangesKeepOutputs(parallel::Communicator* comm, cpu::Precision precision) {
  const testing::JobCheckpoint checkpoint(*comm, "v2-160", kEightHeads);
  const std::filesystem::path& dir = checkpoint.path();
  auto model = Model::Load(dir, {}, WeightResidency::kCopy, {comm, nullptr}, ComputeDevice::kCpu, precision);
  ASSERT_TRUE(model.ok()) << model.status().ToString();
  if (precision == cpu::Precision::kFast && (*model)->precision() == cpu::Precision::kFast) {
    EXPECT_EQ((*model)->weights().layers[1].experts[0].up.type, cpu::WeightType::kI8);
  }
  const ModelConfig& c = (*model)->config();
  const std::vector<int32_t> prompt = {3, 99, 250, 7, 42, 5, 77, 12, 31};
  GenerateOptions o;
  o.prompt_logits = true;
  o.max_new_tokens = 5;
  o.stop_at_eos = false;
  o.block_size = 4;
  auto before = Generate(**model, prompt, o);
  ASSERT_TRUE(before.ok());
  const int64_t bytes_before = (*model)->weights().matrix_bytes;

  for (int spare : {3, 0}) {
    auto change = (*model)->ApplyPlacement(Scrambled(c, comm->size(), spare));
    ASSERT_TRUE(change.ok()) << change.status().ToString();
    if (comm->size() > 1 && spare > 0) {
      EXPECT_GT(change->experts_loaded, 0) << "rank " << comm->rank();
    }
    EXPECT_EQ((*model)->placement().slots(1, comm->rank()), Scrambled(c, comm->size(), spare).slots(1, comm->rank()));
    auto after = Generate(**model, prompt, o);
    ASSERT_TRUE(after.ok());
    EXPECT_EQ(after->tokens, before->tokens) << "spare " << spare;
    for (size_t i = 0; i < before->prompt_logits.size(); ++i) {
      ASSERT_NEAR(after->prompt_logits[i], before->prompt_logits[i], 1e-5 * (1 + std::fabs(before->prompt_logits[i])))
          << "logit " << i << " with spare " << spare;
    }
    for (size_t l = 0; l < before->expert_counts.tokens.size(); ++l) {
      EXPECT_EQ(after->expert_counts.tokens[l], before->expert_counts.tokens[l]) << "layer " << l;
    }
  }
  // And back: the experts dropped on the way were freed, the bytes held are as at start.
  std::vector<bool> moe(static_cast<size_t>(c.num_hidden_layers));
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) moe[l] = c.IsMoeLayer(l);
  auto back = (*model)->ApplyPlacement(
      parallel::ExpertPlacement::Contiguous(c.num_hidden_layers, moe, c.n_routed_experts, comm->size()));
  ASSERT_TRUE(back.ok());
  EXPECT_EQ((*model)->weights().matrix_bytes, bytes_before);
  auto again = Generate(**model, prompt, o);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->tokens, before->tokens);

  // A placement for another job size is refused, and the model keeps serving.
  auto wrong = (*model)->ApplyPlacement(
      parallel::ExpertPlacement::Contiguous(c.num_hidden_layers, moe, c.n_routed_experts, comm->size() + 1));
  EXPECT_EQ(wrong.status().code(), StatusCode::kInvalidArgument);
}

TEST_F(DistributedModelTest, ChangingThePlacementLiveKeepsTheOutputs) {
  ExpectPlacementChangesKeepOutputs(comm_.get(), cpu::Precision::kExact);
}

// Experts loaded by a change are quantized as those loaded at start were.
TEST_F(DistributedModelTest, ChangingThePlacementLiveKeepsTheOutputsOfFastPrecision) {
  ExpectPlacementChangesKeepOutputs(comm_.get(), cpu::Precision::kFast);
}

}  // namespace
}  // namespace epic
