// The GPU step spread over mpirun ranks, one GPU each (heads, token blocks, expert
// slots and vocabulary split; activations exchanged over NCCL), against the CPU step in
// one process: prompt logits within BF16 tolerance, and the expert counts of the job.
// A job with fewer GPUs than ranks reports SKIPPED on every rank (NCCL needs a GPU per
// rank), which is all a machine without GPUs can show.
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "kernels/cuda/device.h"
#include "parallel/communicator.h"
#include "parallel/expert_placement.h"
#include "parallel/nccl_communicator.h"
#include "tests/testing/job_checkpoint.h"
#include "worker/generate.h"
#include "worker/model.h"
#include "worker/random_checkpoint.h"

namespace epic {
namespace {

// As cuda_model_test: activations rounded to BF16 at every product.
constexpr double kBf16Tolerance = 5e-2;

class CudaDistributedTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto c = parallel::MakeMpiCommunicator();
    ASSERT_TRUE(c.ok()) << c.status().ToString();
    comm_ = std::move(*c);
    const StatusOr<int> gpus = cuda::DeviceCount();
    // Every rank decides alike: the visible GPUs are the host's.
    if (!gpus.ok() || *gpus < comm_->size()) {
      GTEST_SKIP() << comm_->size() << " ranks need as many GPUs; "
                   << (gpus.ok() ? std::to_string(*gpus) + " visible" : gpus.status().message());
    }
    auto nccl = parallel::MakeNcclCommunicator(*comm_, comm_->rank() % *gpus);
    ASSERT_TRUE(nccl.ok()) << nccl.status().ToString();
    nccl_ = std::move(*nccl);
  }
  std::unique_ptr<parallel::Communicator> comm_, nccl_;
};

TEST_F(CudaDistributedTest, PromptLogitsMatchOneCpuProcess) {
  for (const char* preset : {"v2-160", "v3-tiny"}) {
    SCOPED_TRACE(preset);
    const testing::JobCheckpoint checkpoint(*comm_, preset, {}, 17);
    const std::filesystem::path& dir = checkpoint.path();
    auto cpu = Model::Load(dir);
    ASSERT_TRUE(cpu.ok()) << cpu.status().ToString();
    ModelShard shard{comm_.get(), nullptr};
    shard.device_comm = nccl_.get();
    auto gpu = Model::Load(dir, {}, WeightResidency::kCopy, shard, ComputeDevice::kCuda);
    ASSERT_TRUE(gpu.ok()) << gpu.status().ToString();
    const int64_t vocab = (*cpu)->config().vocab_size;
    std::vector<int32_t> prompt;
    for (int i = 0; i < 21; ++i) prompt.push_back(static_cast<int32_t>((i * 7919 + 5) % vocab));

    GenerateOptions o;
    o.prompt_logits = true;
    o.max_new_tokens = 4;
    o.stop_at_eos = false;
    o.block_size = 8;
    auto want = Generate(**cpu, prompt, o);
    auto got = Generate(**gpu, prompt, o);
    ASSERT_TRUE(want.ok()) << want.status().ToString();
    ASSERT_TRUE(got.ok()) << got.status().ToString();
    ASSERT_EQ(got->prompt_logits.size(), want->prompt_logits.size());
    for (size_t row = 0; row < prompt.size(); ++row) {
      double diff = 0, scale = 0;
      for (int64_t i = 0; i < vocab; ++i) {
        const double g = got->prompt_logits[row * vocab + i], w = want->prompt_logits[row * vocab + i];
        ASSERT_TRUE(std::isfinite(g));
        diff = std::max(diff, std::fabs(g - w));
        scale = std::max(scale, std::fabs(w));
      }
      EXPECT_LE(diff / scale, kBf16Tolerance) << "row " << row;
    }
    // Job-wide counts: every token reaches top_k experts.
    const int64_t k = (*cpu)->config().num_experts_per_tok;
    const int64_t steps_tokens = static_cast<int64_t>(prompt.size()) + o.max_new_tokens - 1;
    for (const auto& layer : got->expert_counts.tokens) {
      if (layer.empty()) continue;
      int64_t total = 0;
      for (int64_t n : layer) total += n;
      EXPECT_EQ(total, steps_tokens * k);
    }
  }
}

TEST_F(CudaDistributedTest, MovingEveryExpertKeepsTheLogits) {
  const testing::JobCheckpoint checkpoint(*comm_, "v2-160", {}, 17);
  const std::filesystem::path& dir = checkpoint.path();
  ModelShard shard{comm_.get(), nullptr};
  shard.device_comm = nccl_.get();
  auto gpu = Model::Load(dir, {}, WeightResidency::kCopy, shard, ComputeDevice::kCuda);
  ASSERT_TRUE(gpu.ok()) << gpu.status().ToString();
  const int64_t vocab = (*gpu)->config().vocab_size;
  std::vector<int32_t> prompt;
  for (int i = 0; i < 15; ++i) prompt.push_back(static_cast<int32_t>((i * 104729 + 3) % vocab));
  GenerateOptions o;
  o.prompt_logits = true;
  o.max_new_tokens = 1;
  o.block_size = 8;
  auto before = Generate(**gpu, prompt, o);
  ASSERT_TRUE(before.ok()) << before.status().ToString();
  // Each rank takes over the next rank's experts: with several ranks every expert moves
  // and is copied to another GPU.
  parallel::ExpertPlacement::Table table = (*gpu)->placement().table();
  for (auto& layer : table) {
    if (!layer.empty()) std::rotate(layer.begin(), layer.begin() + 1, layer.end());
  }
  auto rotated = parallel::ExpertPlacement::Create(table, (*gpu)->config().n_routed_experts);
  ASSERT_TRUE(rotated.ok()) << rotated.status().ToString();
  auto change = (*gpu)->ApplyPlacement(*rotated);
  ASSERT_TRUE(change.ok()) << change.status().ToString();
  if (comm_->size() > 1) {
    EXPECT_GT(change->experts_loaded, 0);
  }
  auto after = Generate(**gpu, prompt, o);
  ASSERT_TRUE(after.ok()) << after.status().ToString();
  ASSERT_EQ(after->prompt_logits.size(), before->prompt_logits.size());
  for (size_t row = 0; row < prompt.size(); ++row) {
    double diff = 0, scale = 0;
    for (int64_t i = 0; i < vocab; ++i) {
      const double a = after->prompt_logits[row * vocab + i], b = before->prompt_logits[row * vocab + i];
      diff = std::max(diff, std::fabs(a - b));
      scale = std::max(scale, std::fabs(b));
    }
    // The same products on other GPUs; only the order of the combine's sums may differ.
    EXPECT_LE(diff / scale, 2e-3) << "row " << row;
  }
}

TEST_F(CudaDistributedTest, WithoutADeviceCommunicatorTheJobIsRefused) {
  if (comm_->size() == 1) GTEST_SKIP() << "one rank needs no device communicator";
  const testing::JobCheckpoint checkpoint(*comm_, "tiny", {}, 17);
  const std::filesystem::path& dir = checkpoint.path();
  auto gpu = Model::Load(dir, {}, WeightResidency::kCopy, {comm_.get(), nullptr}, ComputeDevice::kCuda);
  ASSERT_FALSE(gpu.ok());
  EXPECT_EQ(gpu.status().code(), StatusCode::kFailedPrecondition) << gpu.status().ToString();
  EXPECT_NE(gpu.status().message().find("NCCL"), std::string::npos) << gpu.status().message();
}

}  // namespace
}  // namespace epic
