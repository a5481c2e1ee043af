// epic-run: loads a DeepSeek checkpoint and runs it in this process: prompt logits
// to a .npy file and/or generated token ids on stdout. Logs go to stderr.
#include <omp.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "common/token_list.h"
#include "text/tokenizer.h"
#include "worker/device.h"
#include "worker/generate.h"
#include "worker/job.h"
#include "worker/model.h"
#include "worker/npy.h"
#include "worker/progress.h"
#include "worker/step_stats.h"


int main(int argc, char** argv) {
  CLI::App app{"epic-run: run a DeepSeek-V2/V3 checkpoint in one process, or spread over the ranks\n"
               "of an mpirun job (`mpirun -np N epic-run ...`: routed experts split across ranks, and\n"
               "attention as --attention says; rank 0 writes the outputs).\n"
               "Prints generated token ids on stdout (one line per prompt, space-separated), or with\n"
               "--prompt the generated text; logs on stderr."};
  std::string model_dir;
  std::string tokens_text;
  std::string prompt_text;
  std::string tokenizer_dir;
  int64_t max_new_tokens = 0;
  epic::SamplingParams sampling;
  std::string dump_logits;
  std::string device = "cpu";
  std::string attention = "tp";
  std::string precision = "exact";
  int threads = 0;
  bool expert_counts = false;
  bool ignore_eos = false;
  bool mapped = false;
  bool exchange_stats = false;
  bool phase_times = false;
  std::string loads_out;
  int64_t block_size = 16;
  app.add_option("--model", model_dir, "checkpoint directory (config.json + *.safetensors)")->required();
  auto* tokens_flag = app.add_option("--tokens", tokens_text,
                                     "prompt token ids, comma-separated, e.g. 5,17,300; several prompts, run in the "
                                     "same steps, separated by ';', e.g. '5,17,300;8,9'");
  auto* prompt_flag = app.add_option("--prompt", prompt_text,
                                     "prompt text, tokenized with the checkpoint's tokenizer (BOS added as it says); "
                                     "the generated text is printed instead of ids");
  tokens_flag->excludes(prompt_flag);
  app.add_option("--tokenizer", tokenizer_dir,
                 "directory of tokenizer.json (+ tokenizer_config.json) for --prompt (default: --model)");
  app.add_option("--max-new-tokens", max_new_tokens, "tokens to generate after the prompt")
      ->check(CLI::NonNegativeNumber)->capture_default_str();
  app.add_option("--temperature", sampling.temperature, "0 is greedy; > 0 samples")
      ->check(CLI::NonNegativeNumber)->capture_default_str();
  app.add_option("--top-k", sampling.top_k, "sample among the k most likely tokens (0: all)")
      ->check(CLI::NonNegativeNumber)->capture_default_str();
  app.add_option("--top-p", sampling.top_p, "sample within this probability mass, in (0, 1]")
      ->capture_default_str();
  app.add_option("--seed", sampling.seed, "random seed for sampling")->capture_default_str();
  app.add_option("--dump-logits", dump_logits,
                 "write the logits at every prompt position to FILE.npy (float32 [prompt, vocab]; several "
                 "prompts' rows one after another)");
  app.add_option("--attention", attention,
                 "how the ranks of an mpirun job share attention: tp splits every sequence's heads, vocabulary "
                 "and dense MLPs over the ranks (at most as many ranks as heads; every rank caches every "
                 "sequence); dp runs prompt i on rank i % ranks with all of attention replicated, each "
                 "sequence's latent cache on its rank alone (any number of ranks)")
      ->check(CLI::IsMember({"tp", "dp"}))->capture_default_str();
  app.add_option("--precision", precision, epic::cpu::kPrecisionHelp)
      ->check(CLI::IsMember({"exact", "fast"}))->capture_default_str();
  app.add_option("--device", device,
                 "compute device: cpu, or cuda (each rank on its own GPU, the ranks of a host on GPUs 0, 1, ...)")
      ->check(CLI::IsMember({"cpu", "cuda"}))->capture_default_str();
  app.add_option("--threads", threads, "CPU threads (0: OpenMP's default, one per core)")
      ->check(CLI::NonNegativeNumber);
  app.add_flag("--expert-counts", expert_counts,
               "print, per MoE layer, the tokens routed to each expert (stderr)");
  app.add_flag("--ignore-eos", ignore_eos, "keep generating past an end-of-sequence token");
  app.add_option("--loads-out", loads_out,
                 "write the tokens routed to each expert of each MoE layer, over the whole run, to FILE.json "
                 "({\"layers\": [...], \"loads\": [[...]]}: the input of `epic plan --loads`)");
  app.add_flag("--exchange-stats", exchange_stats,
               "print, per MoE layer and rank, the all-to-all bytes and seconds of dispatch and combine "
               "(stderr)");
  app.add_flag("--phase-times", phase_times,
               "print, per rank, the milliseconds the run spent in each phase of the layer schedule (attention, "
               "o_proj, norms, gate, exchange, experts, mlp, lm_head) (stderr)");
  app.add_flag("--mmap", mapped,
               "use the weights in place from the file mapping instead of copying them into "
               "huge-page memory (less memory while the page cache holds the file; slower decode)");
  app.add_option("--block-size", block_size, "latent cache block size in tokens")
      ->check(CLI::PositiveNumber)->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  if (tokens_flag->count() + prompt_flag->count() != 1) {
    std::fprintf(stderr, "epic-run: give the prompt as --tokens or --prompt\n");
    return 2;
  }

  auto job = epic::Job::Join(&argc, &argv);
  if (!job.ok()) {
    std::fprintf(stderr, "epic-run: %s\n", job.status().ToString().c_str());
    return 2;
  }
  const int rank = (*job)->rank();
  const int ranks = (*job)->size();
  const bool lead = rank == 0;
  // Errors name the rank in a job of several.
  const std::string who = ranks > 1 ? "epic-run: rank " + std::to_string(rank) + ": " : "epic-run: ";
  const auto compute = epic::ResolveDevice(device);
  if (!compute.ok()) {
    std::fprintf(stderr, "%s%s\n", who.c_str(), compute.status().message().c_str());
    (*job)->Abort(2);
  }
  if (threads > 0) omp_set_num_threads(threads);
  // Every rank tokenizes the same text alike: the prompt needs no broadcast.
  std::optional<epic::text::Tokenizer> tokenizer;
  std::vector<std::vector<int32_t>> prompts;
  if (prompt_flag->count() > 0) {
    auto loaded = epic::text::Tokenizer::Load(tokenizer_dir.empty() ? model_dir : tokenizer_dir);
    auto ids = loaded.ok() ? loaded->Encode(prompt_text) : epic::StatusOr<std::vector<int32_t>>(loaded.status());
    if (!ids.ok()) {
      std::fprintf(stderr, "%s%s\n", who.c_str(), ids.status().ToString().c_str());
      (*job)->Abort(2);
    }
    if (ids->empty()) {
      std::fprintf(stderr, "%s--prompt: the text gives no tokens\n", who.c_str());
      (*job)->Abort(2);
    }
    tokenizer = std::move(loaded).value();
    prompts.push_back(std::move(ids).value());
  } else {
    for (size_t at = 0;;) {
      const size_t end = std::min(tokens_text.find(';', at), tokens_text.size());
      const std::string name = "--tokens" + (prompts.empty() && end == tokens_text.size()
                                                 ? std::string()
                                                 : " (prompt " + std::to_string(prompts.size() + 1) + ")");
      auto parsed = epic::ParseTokenList(name, tokens_text.substr(at, end - at));
      if (!parsed.ok()) {
        std::fprintf(stderr, "%s%s\n", who.c_str(), parsed.status().message().c_str());
        (*job)->Abort(2);
      }
      prompts.push_back(std::move(parsed).value());
      if (end == tokens_text.size()) break;
      at = end + 1;
    }
  }
  const auto mode = epic::ParseAttentionMode(attention);

  const auto t0 = std::chrono::steady_clock::now();
  epic::ModelShard shard{(*job)->comm(), nullptr};
  shard.attention = *mode;
  if (*compute == epic::ComputeDevice::kCuda && (*job)->size() > 1) {
    // Device buffers cross between the ranks' GPUs over NCCL.
    auto device_comm = (*job)->DeviceComm();
    if (!device_comm.ok()) {
    std::fprintf(stderr, "%s%s\n", who.c_str(), device_comm.status().ToString().c_str());
    (*job)->Abort(2);
    }
    shard.device_comm = *device_comm;
  }
  epic::cpu::Precision asked = epic::cpu::Precision::kExact;
  epic::cpu::ParsePrecision(precision.c_str(), &asked);
  epic::ProgressLine progress("loading " + model_dir);
  auto model = epic::Model::Load(
      model_dir, [&](int64_t d, int64_t t) { if (lead) progress.Update(d, t); },
      mapped ? epic::WeightResidency::kMapped : epic::WeightResidency::kCopy, shard, *compute, asked);
  progress.Finish();
  if (!model.ok()) {
    std::fprintf(stderr, "%s%s\n", who.c_str(), model.status().ToString().c_str());
    (*job)->Abort(1);
  }
  const double load_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (lead) {
    std::fprintf(stderr, "epic-run: loaded %s in %.2f s: %s; %d rank%s, %d threads each\n",
                 model_dir.c_str(), load_s, (*model)->config().Summary().c_str(), ranks,
                 ranks == 1 ? "" : "s", omp_get_max_threads());
  }
  std::fprintf(stderr, "epic-run: rank %d of %d holds %.1f MiB of weights, products %s\n", rank, ranks,
               (*model)->weights().matrix_bytes / 1048576.0, epic::PrecisionNote(**model, asked).c_str());

  epic::GenerateOptions options;
  options.max_new_tokens = max_new_tokens;
  options.sampling = sampling;
  options.stop_at_eos = !ignore_eos;
  options.prompt_logits = !dump_logits.empty();
  options.block_size = block_size;
  epic::PhaseTimes phases;
  if (phase_times) (*model)->set_phase_times(&phases);
  auto results = epic::GenerateBatch(**model, prompts, options);
  (*model)->set_phase_times(nullptr);
  if (!results.ok()) {
    std::fprintf(stderr, "%s%s\n", who.c_str(), results.status().ToString().c_str());
    (*job)->Abort(1);
  }
  const epic::GenerateResult* result = &results->front();  // the batch's counts and times
  int64_t prompt_tokens = 0, generated = 0;
  for (const auto& p : prompts) prompt_tokens += static_cast<int64_t>(p.size());
  for (const auto& r : *results) generated += static_cast<int64_t>(r.tokens.size());
  // Every rank's exchanges, per MoE layer, gathered in the one record the server uses too.
  std::optional<epic::JobStepStats> exchange;
  if (exchange_stats) {
    auto gathered = epic::GatherStepStats(**model, result->expert_counts);
    if (!gathered.ok()) {
      std::fprintf(stderr, "%s%s\n", who.c_str(), gathered.status().ToString().c_str());
      (*job)->Abort(1);
    }
    exchange = std::move(gathered).value();
  }
  if (phase_times && results.ok()) {
    // One write per line: mpirun forwards output in the pieces it was written in.
    std::string line = "epic-run: rank " + std::to_string(rank) + " phase times (ms):";
    char part[64];
    for (int i = 0; i < static_cast<int>(epic::Phase::kCount); ++i) {
      const auto p = static_cast<epic::Phase>(i);
      std::snprintf(part, sizeof part, "%s %s %.2f", i == 0 ? "" : ",", epic::PhaseName(p), phases[p] * 1e3);
      line += part;
    }
    std::fprintf(stderr, "%s\n", line.c_str());
  }
  if (!lead) return 0;
  const int64_t vocab = (*model)->config().vocab_size;
  if (!dump_logits.empty()) {
    std::vector<float> rows;
    for (const auto& r : *results) rows.insert(rows.end(), r.prompt_logits.begin(), r.prompt_logits.end());
    const epic::Status s = epic::WriteNpyFloat32(dump_logits, {prompt_tokens, vocab}, rows.data());
    if (!s.ok()) {
      std::fprintf(stderr, "epic-run: %s\n", s.ToString().c_str());
      (*job)->Abort(1);
    }
  }
  // One write per line: mpirun forwards output in the pieces it was written in.
  char timing[256];
  int used = std::snprintf(timing, sizeof timing, "epic-run: prefill %lld tokens in %.3f s (%.1f tok/s)",
                           static_cast<long long>(prompt_tokens), result->prefill_seconds,
                           prompt_tokens / result->prefill_seconds);
  // Each sequence's first token comes from the prefill.
  const int64_t decoded = generated - static_cast<int64_t>(results->size());
  if (decoded > 0 && used > 0 && used < static_cast<int>(sizeof timing)) {
    std::snprintf(timing + used, sizeof timing - used, ", decode %lld tokens in %.3f s (%.1f tok/s)",
                  static_cast<long long>(decoded), result->decode_seconds, decoded / result->decode_seconds);
  }
  std::fprintf(stderr, "%s\n", timing);
  if (ranks > 1) {
    const epic::parallel::ExchangeStats& x = (*model)->exchange_stats();
    std::fprintf(stderr, "epic-run: rank 0 all-to-all: %.2f MiB sent, %.2f MiB received, %.3f s\n",
                 x.bytes_sent / 1048576.0, x.bytes_received / 1048576.0, x.seconds);
  }
  if (!loads_out.empty()) {
    nlohmann::json layers = nlohmann::json::array(), loads = nlohmann::json::array();
    const auto& counts = result->expert_counts.tokens;
    for (size_t l = 0; l < counts.size(); ++l) {
      if (counts[l].empty()) continue;
      layers.push_back(l);
      loads.push_back(counts[l]);
    }
    std::ofstream f(loads_out);
    f << nlohmann::json{{"model", model_dir}, {"layers", layers}, {"loads", loads}}.dump() << "\n";
    if (!f) {
      std::fprintf(stderr, "epic-run: %s: write failed\n", loads_out.c_str());
      (*job)->Abort(1);
    }
  }
  if (expert_counts) {
    const auto& counts = result->expert_counts.tokens;
    for (size_t l = 0; l < counts.size(); ++l) {
      if (counts[l].empty()) continue;
      std::string line = "expert tokens, layer " + std::to_string(l) + ":";
      for (int64_t n : counts[l]) line += " " + std::to_string(n);
      std::fprintf(stderr, "%s\n", line.c_str());
    }
  }
  if (exchange) {
    for (size_t i = 0; i < exchange->moe_layers.size(); ++i) {
      for (int r = 0; r < ranks; ++r) {
        const epic::parallel::ExchangeStats& d = exchange->dispatch[r][i];
        const epic::parallel::ExchangeStats& c = exchange->combine[r][i];
        std::fprintf(stderr,
                     "all-to-all, layer %lld, rank %d: dispatch %.1f KiB out, %.1f KiB in, %.2f ms; "
                     "combine %.1f KiB out, %.1f KiB in, %.2f ms\n",
                     static_cast<long long>(exchange->moe_layers[i]), r, d.bytes_sent / 1024.0,
                     d.bytes_received / 1024.0, d.seconds * 1e3, c.bytes_sent / 1024.0, c.bytes_received / 1024.0,
                     c.seconds * 1e3);
      }
    }
  }
  if (max_new_tokens > 0 && tokenizer) {
    // As OpenAI-style servers return it: special tokens (the EOS that ended it) left out.
    std::printf("%s\n", tokenizer->Decode(result->tokens, /*skip_special_tokens=*/true).c_str());
  } else if (max_new_tokens > 0) {
    for (const epic::GenerateResult& r : *results) {
      std::string line;
      for (size_t i = 0; i < r.tokens.size(); ++i) line += (i ? " " : "") + std::to_string(r.tokens[i]);
      std::printf("%s\n", line.c_str());
    }
  }
  return 0;
}
