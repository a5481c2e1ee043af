// The coordinator's expert statistics fed step results as a worker job sends them,
// including the malformed ones the fuzzer found (fuzz/step_result.cc).
#include "coordinator/load_stats.h"

#include <cstdint>
#include <limits>

#include <gtest/gtest.h>

namespace epic::coordinator {
namespace {

v1::internal::StepResult Loads(int32_t layer, std::initializer_list<int64_t> tokens) {
  v1::internal::StepResult r;
  v1::LayerLoad* load = r.add_expert_tokens();
  load->set_layer(layer);
  for (const int64_t t : tokens) load->add_expert_tokens(t);
  return r;
}

TEST(LoadStats, AddsEachStepsExpertTokens) {
  LoadStats stats;
  stats.Reset({1, 2}, 3, 2);
  stats.Add(Loads(1, {1, 2, 3}));
  stats.Add(Loads(2, {4, 0, 1}));
  stats.Add(Loads(1, {1, 1, 1}));
  EXPECT_EQ(stats.steps(), 3);
  EXPECT_EQ(stats.totals()[0], (std::vector<int64_t>{2, 3, 4}));
  EXPECT_EQ(stats.totals()[1], (std::vector<int64_t>{4, 0, 1}));
}

// Found by fuzz/step_result.cc (fuzz/corpus/step_result/crash_load_overflow): two steps
// whose counts sum past INT64_MAX overflowed the totals (undefined behaviour). Counts no
// step can hold, and negative ones, are left out.
TEST(LoadStats, CountsNoStepCanHoldAreLeftOut) {
  LoadStats stats;
  stats.Reset({1}, 3, 1);
  const int64_t huge = std::numeric_limits<int64_t>::max() - 5;
  stats.Add(Loads(1, {huge, -7, 2}));
  stats.Add(Loads(1, {huge, 3, 2}));
  EXPECT_EQ(stats.totals()[0], (std::vector<int64_t>{0, 3, 4}));
  ReportInput in;
  stats.Fill(&in);
  ASSERT_EQ(in.expert_tokens.size(), 1u);
  for (const double t : in.expert_tokens[0]) EXPECT_GE(t, 0.0);
}

}  // namespace
}  // namespace epic::coordinator
