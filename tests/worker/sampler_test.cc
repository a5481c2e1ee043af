#include "worker/sampler.h"

#include <cmath>
#include <map>
#include <set>
#include <vector>

#include <gtest/gtest.h>

namespace epic {
namespace {

TEST(SamplerTest, GreedyTakesTheFirstMaximum) {
  const std::vector<float> logits = {0.5f, 3.0f, -1.0f, 3.0f};
  Sampler s(SamplingParams{});
  EXPECT_EQ(s.Sample(logits.data(), 4), 1);
}

TEST(SamplerTest, TemperatureSamplesFollowTheSoftmax) {
  const std::vector<float> logits = {0.0f, std::log(3.0f)};  // probabilities 1/4, 3/4
  SamplingParams p;
  p.temperature = 1.0;
  p.seed = 1;
  Sampler s(p);
  int ones = 0;
  const int n = 20000;
  for (int i = 0; i < n; ++i) ones += s.Sample(logits.data(), 2);
  EXPECT_NEAR(ones / double(n), 0.75, 0.02);
}

TEST(SamplerTest, TopKAndTopPRestrictTheChoice) {
  const std::vector<float> logits = {2.0f, 1.9f, 1.8f, -5.0f, 1.7f};
  SamplingParams p;
  p.temperature = 2.0;
  p.top_k = 2;
  p.seed = 7;
  Sampler k(p);
  for (int i = 0; i < 500; ++i) {
    const int32_t t = k.Sample(logits.data(), 5);
    EXPECT_TRUE(t == 0 || t == 1) << t;
  }
  p.top_k = 0;
  p.top_p = 1e-6;  // only the most likely token fits
  Sampler nucleus(p);
  for (int i = 0; i < 100; ++i) EXPECT_EQ(nucleus.Sample(logits.data(), 5), 0);
}

TEST(SamplerTest, SameSeedSameSequence) {
  std::vector<float> logits(50);
  for (int i = 0; i < 50; ++i) logits[i] = std::sin(i * 1.3f);
  SamplingParams p;
  p.temperature = 0.8;
  p.top_p = 0.9;
  p.seed = 123;
  Sampler a(p), b(p);
  for (int i = 0; i < 100; ++i) EXPECT_EQ(a.Sample(logits.data(), 50), b.Sample(logits.data(), 50));
}

TEST(SamplerTest, ResumingAtADrawGivesTheUninterruptedSequence) {
  std::vector<float> logits(50);
  for (int i = 0; i < 50; ++i) logits[i] = std::cos(i * 0.7f);
  SamplingParams p;
  p.temperature = 1.0;
  p.seed = 99;
  Sampler whole(p);
  std::vector<int32_t> run;
  for (int i = 0; i < 40; ++i) run.push_back(whole.Sample(logits.data(), 50));
  for (uint64_t i = 0; i < 40; ++i) {
    Sampler resumed(p, i);
    EXPECT_EQ(resumed.Sample(logits.data(), 50), run[i]) << "draw " << i;
  }
  // Not a constant: the draws differ.
  EXPECT_GT(std::set<int32_t>(run.begin(), run.end()).size(), 3u);
}

TEST(SamplerTest, LogProbabilityMatchesAPlainLogSoftmax) {
  const std::vector<float> logits = {1.0f, 2.0f, 0.5f, -3.0f};
  double sum = 0.0;
  for (float l : logits) sum += std::exp(static_cast<double>(l));
  for (int32_t t = 0; t < 4; ++t) {
    EXPECT_NEAR(LogProbability(logits.data(), 4, t), logits[t] - std::log(sum), 1e-6);
  }
}

TEST(SamplerTest, ValidatesParameters) {
  SamplingParams p;
  p.temperature = -1;
  EXPECT_EQ(ValidateSamplingParams(p).code(), StatusCode::kInvalidArgument);
  p = {};
  p.top_p = 0;
  EXPECT_EQ(ValidateSamplingParams(p).code(), StatusCode::kInvalidArgument);
  p = {};
  p.top_k = -2;
  EXPECT_EQ(ValidateSamplingParams(p).code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(ValidateSamplingParams(SamplingParams{}).ok());
}

}  // namespace
}  // namespace epic
