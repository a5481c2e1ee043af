// Whole-model decode on one GPU (Model loaded with ComputeDevice::kCuda) against the
// bound set by the bytes each step must read, at the device bandwidth measured in the
// same run:
//   decode tokens/s  vs  batch * bandwidth / (weights the step touches + cache rows it reads)
// The weights a step touches are the dense ones (attention, shared experts, dense MLPs,
// router, lm_head) and, per MoE layer, the routed experts its tokens actually chose
// (counted from the step's own routing), all in BF16 as the GPU holds them.
// Make a model with `epic-mkmodel --preset v2-lite-shape --out DIR` (V2-Lite's real
// dimensions, about 16B parameters: 32 GB in BF16, one 80 GB GPU holds it).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <sstream>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "bench/cuda_bounds.h"
#include "bench/timing.h"
#include "kernels/cuda/device.h"
#include "worker/model.h"
#include "worker/progress.h"

namespace {

using epic::bench::Clock;
using epic::bench::Median;
using epic::bench::Since;


// Bytes of M on the GPU: BF16, except the F32 router.
int64_t Bf16Bytes(const epic::cpu::WeightMatrix& m) { return m.rows * m.cols * 2; }
int64_t MlpBytes(const epic::MlpWeights& w) { return Bf16Bytes(w.gate) + Bf16Bytes(w.up) + Bf16Bytes(w.down); }

std::vector<int64_t> ParseList(const std::string& text) {
  std::vector<int64_t> values;
  std::stringstream in(text);
  std::string item;
  while (std::getline(in, item, ',')) values.push_back(std::stoll(item));
  return values;
}

int Fail(const epic::Status& s) {
  std::fprintf(stderr, "cuda_model_bench: %s\n", s.ToString().c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"cuda_model_bench: whole-model decode tokens/s on one GPU, with the ratio to the bound\n"
               "set by the weight and latent-cache bytes each step reads at the measured device bandwidth."};
  std::string model_dir;
  std::string batches_text = "1,8,64";
  int64_t context = 1024;
  int64_t steps = 32;
  double gib = 2.0;
  app.add_option("--model", model_dir, "checkpoint directory")->required();
  app.add_option("--batch", batches_text, "comma-separated decode batch sizes (sequences per step)")
      ->capture_default_str();
  app.add_option("--context", context, "tokens each sequence holds before decoding (prefilled first)")
      ->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--steps", steps, "timed decode steps per batch size (median step)")
      ->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--bandwidth-gib", gib, "size of the device copy that measures bandwidth")->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  std::vector<int64_t> batches;
  try {
    batches = ParseList(batches_text);
  } catch (const std::exception&) {
    std::fprintf(stderr, "cuda_model_bench: --batch wants numbers separated by commas, got '%s'\n",
                 batches_text.c_str());
    return 2;
  }

  const epic::StatusOr<int> devices = epic::cuda::DeviceCount();
  if (!devices.ok()) {
    std::printf("cuda_model_bench: skipped: %s\n", devices.status().message().c_str());
    return 0;
  }
  const epic::StatusOr<double> bandwidth = epic::bench::MeasureDeviceBandwidth(gib, 5);
  if (!bandwidth.ok()) return Fail(bandwidth.status());
  const epic::StatusOr<std::string> name = epic::cuda::DeviceName(0);
  std::printf("device: %s; copy bandwidth %.0f GB/s (read + write bytes)\n", name.ok() ? name->c_str() : "?",
              *bandwidth);

  epic::ProgressLine progress("loading " + model_dir + " onto the GPU");
  auto loaded = epic::Model::Load(
      model_dir, [&](int64_t d, int64_t t) { progress.Update(d, t); }, epic::WeightResidency::kMapped, {},
      epic::ComputeDevice::kCuda);
  progress.Finish();
  if (!loaded.ok()) return Fail(loaded.status());
  epic::Model& model = **loaded;
  const epic::ModelConfig& c = model.config();
  const epic::ModelWeights& w = model.weights();
  std::printf("model: %s\n", c.Summary().c_str());

  // Bytes every step reads whatever its routing: all but the routed experts.
  int64_t fixed = Bf16Bytes(w.lm_head);
  std::vector<int64_t> expert_bytes(static_cast<size_t>(c.num_hidden_layers), 0);
  for (size_t l = 0; l < w.layers.size(); ++l) {
    const epic::LayerWeights& L = w.layers[l];
    if (c.q_lora_rank > 0) {
      fixed += Bf16Bytes(L.q_a_proj) + Bf16Bytes(L.q_b_proj);
    } else {
      fixed += Bf16Bytes(L.q_proj);
    }
    fixed += Bf16Bytes(L.kv_a_proj) + Bf16Bytes(L.kv_b_proj) + Bf16Bytes(L.o_proj);
    if (!L.moe) {
      fixed += MlpBytes(L.dense);
      continue;
    }
    fixed += L.router.rows * L.router.cols * 4;
    if (L.has_shared) fixed += MlpBytes(L.shared);
    if (!L.experts.empty()) expert_bytes[l] = MlpBytes(L.experts[0]);  // all experts alike
  }
  const int64_t row_bytes = c.latent_dim() * 2 * c.num_hidden_layers;  // one token's cache rows, all layers

  std::printf("%6s %8s %12s %12s %14s %12s %8s\n", "batch", "context", "prefill t/s", "decode t/s", "MB per step",
              "bound t/s", "ratio");
  for (int64_t batch : batches) {
    if (batch < 1) continue;
    const int64_t block = 64;
    const int64_t per_sequence = (context + steps + 1 + block - 1) / block;
    auto cache = model.MakeCache(block, batch * per_sequence);
    std::vector<epic::BlockTable> tables(static_cast<size_t>(batch));
    std::vector<float> logits;
    std::vector<int32_t> prompt(static_cast<size_t>(context));
    for (int64_t i = 0; i < context; ++i) prompt[i] = static_cast<int32_t>((i * 7919 + 13) % c.vocab_size);
    const auto t0 = Clock::now();
    for (auto& table : tables) {
      if (epic::Status s = cache->Reserve(&table, context + steps + 1); !s.ok()) return Fail(s);
      epic::SequenceStep step{&table, prompt, false};
      if (epic::Status s = model.Forward({&step, 1}, cache.get(), &logits); !s.ok()) return Fail(s);
    }
    const double prefill_tps = static_cast<double>(batch * context) / Since(t0);

    std::vector<int32_t> tokens(static_cast<size_t>(batch), 1);
    std::vector<double> step_s, step_bytes;
    for (int64_t i = 0; i <= steps; ++i) {  // step 0 warms up
      std::vector<epic::SequenceStep> step;
      int64_t cache_rows = 0;
      for (int64_t b = 0; b < batch; ++b) {
        step.push_back({&tables[b], {&tokens[b], 1}, false});
        cache_rows += tables[b].num_tokens + 1;
      }
      epic::ExpertCounts counts;
      const auto ts = Clock::now();
      if (epic::Status s = model.Forward(step, cache.get(), &logits, &counts); !s.ok()) return Fail(s);
      const double seconds = Since(ts);
      if (i == 0) continue;
      double bytes = static_cast<double>(fixed) + static_cast<double>(cache_rows) * row_bytes;
      for (size_t l = 0; l < counts.tokens.size(); ++l) {
        for (int64_t n : counts.tokens[l]) bytes += n > 0 ? static_cast<double>(expert_bytes[l]) : 0.0;
      }
      step_s.push_back(seconds);
      step_bytes.push_back(bytes);
      for (int64_t b = 0; b < batch; ++b) tokens[b] = static_cast<int32_t>((tokens[b] * 31 + 7 + b) % c.vocab_size);
    }
    const double seconds = Median(step_s);
    const double bytes = Median(step_bytes);
    const double tps = static_cast<double>(batch) / seconds;
    const double bound = static_cast<double>(batch) * *bandwidth * 1e9 / bytes;
    std::printf("%6lld %8lld %12.0f %12.1f %14.1f %12.1f %8.2f\n", static_cast<long long>(batch),
                static_cast<long long>(context), prefill_tps, tps, bytes / 1e6, bound, tps / bound);
  }
  return 0;
}
