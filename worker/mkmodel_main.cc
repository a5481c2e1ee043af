// epic-mkmodel: writes a random DeepSeek checkpoint in the Hugging Face layout.
#include <cstdio>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "worker/progress.h"
#include "worker/random_checkpoint.h"

int main(int argc, char** argv) {
  std::string presets;
  for (const std::string& n : epic::PresetNames()) presets += (presets.empty() ? "" : ", ") + n;

  CLI::App app{"epic-mkmodel: write a random DeepSeek-V2/V3 checkpoint (config.json + safetensors)\n"
               "in exactly the Hugging Face layout, for tests and benchmarks."};
  std::string preset = "tiny";
  std::string out;
  uint64_t seed = 0;
  std::string dtype = "bf16";
  int shards = 1;
  int layers = 0;
  std::vector<std::string> sets;
  app.add_option("--preset", preset, "model shape: " + presets)->capture_default_str();
  app.add_option("--out", out, "directory to write (created if missing)")->required();
  app.add_option("--seed", seed, "random seed; values depend only on seed and tensor name")
      ->capture_default_str();
  app.add_option("--dtype", dtype, "weight dtype")
      ->check(CLI::IsMember({"bf16", "f16", "f32"}))
      ->capture_default_str();
  app.add_option("--shards", shards, "number of safetensors files (>1 adds model.safetensors.index.json)")
      ->check(CLI::Range(1, 100000))
      ->capture_default_str();
  app.add_option("--layers", layers, "override num_hidden_layers (to fit a large shape on a machine)")
      ->check(CLI::Range(1, 1000));
  app.add_option("--set", sets,
                 "override a config.json field: KEY=JSON, e.g. --set q_lora_rank=null "
                 "--set topk_method='\"greedy\"' (repeatable)");
  CLI11_PARSE(app, argc, argv);

  auto config = epic::PresetConfig(preset);
  if (!config.ok()) {
    std::fprintf(stderr, "epic-mkmodel: %s\n", config.status().message().c_str());
    return 2;
  }
  if (layers > 0) (*config)["num_hidden_layers"] = layers;
  for (const std::string& s : sets) {
    const size_t eq = s.find('=');
    if (eq == std::string::npos || eq == 0) {
      std::fprintf(stderr, "epic-mkmodel: --set wants KEY=JSON, got '%s'\n", s.c_str());
      return 2;
    }
    const std::string key = s.substr(0, eq);
    const std::string value = s.substr(eq + 1);
    try {
      (*config)[key] = nlohmann::json::parse(value);
    } catch (const nlohmann::json::exception&) {
      (*config)[key] = value;  // a bare word is a string: --set topk_method=greedy
    }
  }

  epic::RandomCheckpointOptions options;
  options.seed = seed;
  options.dtype = dtype == "f32" ? epic::DType::kF32 : dtype == "f16" ? epic::DType::kF16 : epic::DType::kBF16;
  options.shards = shards;
  epic::ProgressLine progress("writing " + out);
  options.progress = [&](int64_t done, int64_t total) { progress.Update(done, total); };
  const epic::Status status = epic::WriteRandomCheckpoint(*config, out, options);
  progress.Finish();
  if (!status.ok()) {
    std::fprintf(stderr, "epic-mkmodel: %s\n", status.ToString().c_str());
    return 1;
  }
  std::fprintf(stderr, "epic-mkmodel: wrote %s (preset %s, seed %llu, %s, %d file%s)\n", out.c_str(),
               preset.c_str(), static_cast<unsigned long long>(seed), dtype.c_str(), shards,
               shards == 1 ? "" : "s");
  return 0;
}
