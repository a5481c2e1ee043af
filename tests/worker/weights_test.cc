// The binder's gate|up stacking (worker/weights.h, MlpWeights::gate_up): where the
// weights are copied (exact) or quantized (fast), every MLP's gate and up are views of
// one matrix holding the checkpoint's gate rows, then its up rows, value for value (int8:
// byte for byte what quantizing each alone gives); weights mapped in place, and int8
// parts short of whole 16-row panels, stay two matrices; an expert bound alone by a
// rebalance is stacked alike. Attention's q_a_proj and kv_a_proj are stacked the same way
// (LayerWeights::q_a_kv_a).
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "kernels/cpu/matmul_int8.h"
#include "tests/testing/temp_dir.h"
#include "worker/checkpoint.h"
#include "worker/model_config.h"
#include "worker/random_checkpoint.h"
#include "worker/weights.h"

namespace epic {
namespace {

using nlohmann::json;

std::unique_ptr<Checkpoint> Write(const testing::TempDir& dir, const json& overrides, DType dtype) {
  auto config = PresetConfig("tiny");
  EXPECT_TRUE(config.ok());
  config->update(overrides);
  RandomCheckpointOptions options;
  options.seed = 3;
  options.dtype = dtype;
  EXPECT_TRUE(WriteRandomCheckpoint(*config, dir.path(), options).ok());
  auto ckpt = Checkpoint::Open(dir.path());
  EXPECT_TRUE(ckpt.ok()) << ckpt.status().ToString();
  return ckpt.ok() ? std::move(*ckpt) : nullptr;
}

// Rows [BEGIN, BEGIN + W.rows) of the checkpoint's tensor NAME as W should hold them:
// the values themselves, or int8 as quantizing that block alone gives.
void ExpectRowsOf(const Checkpoint& ckpt, const std::string& name, int64_t begin, const cpu::WeightMatrix& w) {
  SCOPED_TRACE(name);
  const TensorView& v = ckpt.Get(name);
  const int64_t cols = v.shape[1];
  ASSERT_EQ(w.cols, cols);
  std::vector<float> block(static_cast<size_t>(w.rows * cols));
  for (int64_t r = 0; r < w.rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) block[r * cols + c] = v.FloatAt((begin + r) * cols + c);
  }
  if (w.type != cpu::WeightType::kI8) {
    for (int64_t r = 0; r < w.rows; ++r) {
      for (int64_t c = 0; c < cols; ++c) ASSERT_EQ(w.At(r, c), block[r * cols + c]) << r << "," << c;
    }
    return;
  }
  const cpu::QuantizedMatrix alone({cpu::WeightType::kF32, block.data(), w.rows, cols, cols});
  for (int64_t r = 0; r < w.rows; ++r) {
    ASSERT_EQ(w.scales[r], alone.matrix().scales[r]) << r;
    for (int64_t c = 0; c < cols; ++c) ASSERT_EQ(w.At(r, c), alone.matrix().At(r, c)) << r << "," << c;
  }
}

void ExpectStacked(const Checkpoint& ckpt, const MlpWeights& m, const std::string& module, int64_t begin = 0) {
  SCOPED_TRACE(module);
  ASSERT_NE(m.gate_up.data, nullptr);
  EXPECT_EQ(m.gate_up.rows, 2 * m.gate.rows);
  EXPECT_EQ(m.gate.data, m.gate_up.data);
  EXPECT_EQ(m.up.rows, m.gate.rows);
  EXPECT_EQ(m.up.data, m.gate_up.Rows(m.gate.rows, m.gate.rows).data);
  ExpectRowsOf(ckpt, module + ".gate_proj.weight", begin, m.gate);
  ExpectRowsOf(ckpt, module + ".up_proj.weight", begin, m.up);
}

// Layer L's q_a_proj and kv_a_proj as views of one matrix holding the checkpoint's rows.
void ExpectAttentionStacked(const Checkpoint& ckpt, const LayerWeights& w, int64_t l) {
  SCOPED_TRACE(l);
  const std::string prefix = "model.layers." + std::to_string(l) + ".self_attn.";
  ASSERT_NE(w.q_a_kv_a.data, nullptr);
  EXPECT_EQ(w.q_a_kv_a.rows, w.q_a_proj.rows + w.kv_a_proj.rows);
  EXPECT_EQ(w.q_a_proj.data, w.q_a_kv_a.data);
  EXPECT_EQ(w.kv_a_proj.data, w.q_a_kv_a.Rows(w.q_a_proj.rows, w.kv_a_proj.rows).data);
  EXPECT_EQ(w.q_a_proj.rows, ckpt.Get(prefix + "q_a_proj.weight").shape[0]);
  EXPECT_EQ(w.kv_a_proj.rows, ckpt.Get(prefix + "kv_a_proj_with_mqa.weight").shape[0]);
  ExpectRowsOf(ckpt, prefix + "q_a_proj.weight", 0, w.q_a_proj);
  ExpectRowsOf(ckpt, prefix + "kv_a_proj_with_mqa.weight", 0, w.kv_a_proj);
}

TEST(Weights, CopiedOrQuantizedMlpsAndAttentionHoldTheirPairsInOneMatrix) {
  for (const DType dtype : {DType::kBF16, DType::kF16}) {
    testing::TempDir dir("stacked");
    const auto ckpt = Write(dir, json::object(), dtype);
    ASSERT_NE(ckpt, nullptr);
    for (const cpu::Precision precision : {cpu::Precision::kExact, cpu::Precision::kFast}) {
      SCOPED_TRACE(precision == cpu::Precision::kFast ? "fast" : "exact");
      auto w = ModelWeights::Bind(*ckpt, {}, WeightResidency::kCopy, {}, precision);
      ASSERT_TRUE(w.ok()) << w.status().ToString();
      const std::vector<LayerWeights>& layers = (*w)->layers;
      for (int64_t l = 0; l < static_cast<int64_t>(layers.size()); ++l) ExpectAttentionStacked(*ckpt, layers[l], l);
      ExpectStacked(*ckpt, layers[0].dense, "model.layers.0.mlp");
      ExpectStacked(*ckpt, layers[1].shared, "model.layers.1.mlp.shared_experts");
      ExpectStacked(*ckpt, layers[1].experts[7], "model.layers.1.mlp.experts.7");
      EXPECT_EQ(layers[1].experts[7].gate.type,
                precision == cpu::Precision::kFast ? cpu::WeightType::kI8
                : dtype == DType::kF16           ? cpu::WeightType::kF32
                                                 : cpu::WeightType::kBF16);

      // An expert bound alone (a rebalance) is stacked alike, in memory of its own size.
      auto alone = BindExpert(*ckpt, 2, 9, WeightResidency::kCopy, precision);
      ASSERT_TRUE(alone.ok()) << alone.status().ToString();
      ExpectStacked(*ckpt, alone->weights, "model.layers.2.mlp.experts.9");
    }
  }
}

TEST(Weights, ATensorParallelPartStacksItsOwnRows) {
  testing::TempDir dir("stacked_part");
  const auto ckpt = Write(dir, json::object(), DType::kBF16);
  ASSERT_NE(ckpt, nullptr);
  WeightShard shard;
  shard.mlp_part = 1;
  shard.mlp_parts = 2;
  for (const cpu::Precision precision : {cpu::Precision::kExact, cpu::Precision::kFast}) {
    auto w = ModelWeights::Bind(*ckpt, {}, WeightResidency::kCopy, shard, precision);
    ASSERT_TRUE(w.ok()) << w.status().ToString();
    const int64_t inter = ckpt->Get("model.layers.0.mlp.gate_proj.weight").shape[0];
    ExpectStacked(*ckpt, (*w)->layers[0].dense, "model.layers.0.mlp", inter / 2);
  }
}

TEST(Weights, MappedWeightsAndInt8PartsShortOfAPanelStayTwoMatrices) {
  testing::TempDir dir("unstacked");
  // Experts of 24 rows: an int8 view of up would not start on a 16-row panel.
  const auto ckpt = Write(dir, json{{"moe_intermediate_size", 24}, {"n_shared_experts", 2}}, DType::kBF16);
  ASSERT_NE(ckpt, nullptr);
  auto mapped = ModelWeights::Bind(*ckpt, {}, WeightResidency::kMapped);
  ASSERT_TRUE(mapped.ok()) << mapped.status().ToString();
  const MlpWeights& e = (*mapped)->layers[1].experts[3];
  EXPECT_EQ(e.gate_up.data, nullptr);
  EXPECT_EQ(e.gate.data, ckpt->Get("model.layers.1.mlp.experts.3.gate_proj.weight").data) << "not in place";
  ExpectRowsOf(*ckpt, "model.layers.1.mlp.experts.3.up_proj.weight", 0, e.up);

  auto fast = ModelWeights::Bind(*ckpt, {}, WeightResidency::kCopy, {}, cpu::Precision::kFast);
  ASSERT_TRUE(fast.ok()) << fast.status().ToString();
  const MlpWeights& q = (*fast)->layers[1].experts[3];
  EXPECT_EQ(q.gate_up.data, nullptr);
  EXPECT_EQ(q.up.type, cpu::WeightType::kI8);
  ExpectRowsOf(*ckpt, "model.layers.1.mlp.experts.3.up_proj.weight", 0, q.up);
  // The shared experts (2 x 24 = 48 rows) are whole panels: stacked.
  ExpectStacked(*ckpt, (*fast)->layers[1].shared, "model.layers.1.mlp.shared_experts");
}

TEST(Weights, MappedAttentionAndAQueryRankShortOfAPanelStayTwoMatrices) {
  testing::TempDir dir("unstacked_attention");
  // A query rank of 40: an int8 view of kv_a_proj would not start on a 16-row panel.
  const auto ckpt = Write(dir, json{{"q_lora_rank", 40}}, DType::kBF16);
  ASSERT_NE(ckpt, nullptr);
  auto mapped = ModelWeights::Bind(*ckpt, {}, WeightResidency::kMapped);
  ASSERT_TRUE(mapped.ok()) << mapped.status().ToString();
  const LayerWeights& m = (*mapped)->layers[0];
  EXPECT_EQ(m.q_a_kv_a.data, nullptr);
  EXPECT_EQ(m.q_a_proj.data, ckpt->Get("model.layers.0.self_attn.q_a_proj.weight").data) << "not in place";
  EXPECT_EQ(m.kv_a_proj.data, ckpt->Get("model.layers.0.self_attn.kv_a_proj_with_mqa.weight").data);

  auto fast = ModelWeights::Bind(*ckpt, {}, WeightResidency::kCopy, {}, cpu::Precision::kFast);
  ASSERT_TRUE(fast.ok()) << fast.status().ToString();
  const LayerWeights& q = (*fast)->layers[0];
  EXPECT_EQ(q.q_a_kv_a.data, nullptr);
  EXPECT_EQ(q.kv_a_proj.type, cpu::WeightType::kI8);
  ExpectRowsOf(*ckpt, "model.layers.0.self_attn.q_a_proj.weight", 0, q.q_a_proj);
  ExpectRowsOf(*ckpt, "model.layers.0.self_attn.kv_a_proj_with_mqa.weight", 0, q.kv_a_proj);

  // Copied exactly, any rank stacks.
  auto exact = ModelWeights::Bind(*ckpt, {}, WeightResidency::kCopy, {}, cpu::Precision::kExact);
  ASSERT_TRUE(exact.ok()) << exact.status().ToString();
  ExpectAttentionStacked(*ckpt, (*exact)->layers[0], 0);
}

}  // namespace
}  // namespace epic
