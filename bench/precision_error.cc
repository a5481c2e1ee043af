// precision_error: how far --precision fast's logits are from exact's, per checkpoint.
// For each prompt (random ids, seeded), the exact model generates greedily; both models
// then score that whole sequence (teacher-forced), and the tool prints the worst and
// median relative logit error per position (max |fast - exact| / max |exact|), how often
// their greedy choices agree, and, left to generate on its own, where fast's greedy
// output first leaves exact's. Routing is where small errors become large ones: a token
// whose hidden state moves across a router's boundary gets another expert's output; the
// share of routing choices that moved (at least: per layer, half the difference of the
// two models' token counts per expert over the scored sequences) is printed too.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "kernels/cpu/matmul_int8.h"
#include "worker/generate.h"
#include "worker/model.h"

namespace {

int32_t Argmax(const float* row, int64_t n) { return static_cast<int32_t>(std::max_element(row, row + n) - row); }

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"precision_error: fast (int8) against exact logits, greedy agreement and divergence"};
  std::vector<std::string> models;
  int prompts = 4;
  int64_t prompt_tokens = 32;
  int64_t generate = 96;
  app.add_option("--model", models, "checkpoint directories (one row each)")->required();
  app.add_option("--prompts", prompts, "prompts per checkpoint")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--prompt-tokens", prompt_tokens, "tokens a prompt")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--generate", generate, "greedy tokens after each prompt")
      ->check(CLI::PositiveNumber)->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  using namespace epic;
  if (!cpu::HasInt8Products()) {
    std::fprintf(stderr, "precision_error: this processor has no AVX2: fast runs exact here\n");
    return 1;
  }
  std::printf("%-24s %9s %9s %9s %8s %9s %20s\n", "checkpoint", "positions", "worst", "median", "top-1",
              "routing", "greedy diverges at");
  for (const std::string& dir : models) {
    auto exact = Model::Load(dir);
    auto fast = Model::Load(dir, {}, WeightResidency::kCopy, {}, ComputeDevice::kCpu, cpu::Precision::kFast);
    if (!exact.ok() || !fast.ok()) {
      std::fprintf(stderr, "precision_error: %s: %s\n", dir.c_str(),
                   (!exact.ok() ? exact.status() : fast.status()).ToString().c_str());
      return 1;
    }
    const int64_t vocab = (*exact)->config().vocab_size;
    std::mt19937 rng(7);
    std::uniform_int_distribution<int32_t> id(0, static_cast<int32_t>(vocab - 1));
    std::vector<double> errors;
    int64_t agree = 0, positions = 0, moved = 0, choices = 0;
    std::vector<int64_t> divergence;
    for (int p = 0; p < prompts; ++p) {
      std::vector<int32_t> prompt(static_cast<size_t>(prompt_tokens));
      for (int32_t& t : prompt) t = id(rng);
      GenerateOptions go;
      go.max_new_tokens = generate;
      go.stop_at_eos = false;
      auto reference = Generate(**exact, prompt, go);
      auto own = Generate(**fast, prompt, go);
      if (!reference.ok() || !own.ok()) {
        std::fprintf(stderr, "precision_error: %s\n", (!reference.ok() ? reference.status() : own.status()).ToString().c_str());
        return 1;
      }
      size_t first = 0;
      while (first < reference->tokens.size() && own->tokens[first] == reference->tokens[first]) ++first;
      divergence.push_back(static_cast<int64_t>(first));
      std::vector<int32_t> sequence = prompt;
      sequence.insert(sequence.end(), reference->tokens.begin(), reference->tokens.end());
      GenerateOptions score;
      score.prompt_logits = true;
      auto e = Generate(**exact, sequence, score);
      auto f = Generate(**fast, sequence, score);
      if (!e.ok() || !f.ok()) return 1;
      for (size_t l = 0; l < e->expert_counts.tokens.size(); ++l) {
        for (size_t x = 0; x < e->expert_counts.tokens[l].size(); ++x) {
          moved += std::abs(e->expert_counts.tokens[l][x] - f->expert_counts.tokens[l][x]);
          choices += 2 * e->expert_counts.tokens[l][x];
        }
      }
      for (size_t t = 0; t < sequence.size(); ++t) {
        const float* er = e->prompt_logits.data() + t * vocab;
        const float* fr = f->prompt_logits.data() + t * vocab;
        double diff = 0, scale = 0;
        for (int64_t v = 0; v < vocab; ++v) {
          diff = std::max(diff, std::fabs(static_cast<double>(fr[v]) - er[v]));
          scale = std::max(scale, std::fabs(static_cast<double>(er[v])));
        }
        errors.push_back(diff / scale);
        agree += Argmax(er, vocab) == Argmax(fr, vocab);
        ++positions;
      }
    }
    std::sort(errors.begin(), errors.end());
    std::sort(divergence.begin(), divergence.end());
    std::string name = dir.substr(dir.find_last_of('/') + 1);
    std::printf("%-24s %9lld %9.4f %9.4f %7.1f%% %8.1f%% %9lld of %lld (median)\n", name.c_str(),
                static_cast<long long>(positions), errors.back(), errors[errors.size() / 2],
                100.0 * static_cast<double>(agree) / static_cast<double>(positions),
                choices > 0 ? 100.0 * static_cast<double>(moved) / static_cast<double>(choices) : 0.0,
                static_cast<long long>(divergence[divergence.size() / 2]), static_cast<long long>(generate));
    std::fflush(stdout);
  }
  return 0;
}
