// serving_bench: a load generator for a running epic cluster. At each concurrency
// level it keeps that many streaming requests in flight and reports throughput, time
// to first token and inter-token latency percentiles. With --model it also runs the
// same batch offline in this process (batched prefill, then batched decode steps) and
// prints served throughput over offline throughput: what serving costs.
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <mutex>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <CLI/CLI.hpp>
#include <grpcpp/grpcpp.h>

#include "epic.grpc.pb.h"
#include "worker/model.h"
#include "worker/sampler.h"

namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t i = std::min(v.size() - 1, static_cast<size_t>(p / 100.0 * static_cast<double>(v.size())));
  return v[i];
}

// COUNT prompts of SHARED tokens common to all (a system prompt) and LENGTH of their own.
std::vector<std::vector<int32_t>> Prompts(int count, int length, int64_t vocab, int shared, uint32_t seed) {
  std::uniform_int_distribution<int32_t> id(2, static_cast<int32_t>(vocab - 1));
  std::mt19937 common(99);
  std::vector<int32_t> prefix;
  for (int i = 0; i < shared; ++i) prefix.push_back(id(common));
  std::mt19937 rng(seed);
  std::vector<std::vector<int32_t>> prompts(static_cast<size_t>(count), prefix);
  for (auto& p : prompts) {
    for (int i = 0; i < length; ++i) p.push_back(id(rng));
  }
  return prompts;
}

struct Served {
  double tokens_per_s = 0;
  std::vector<double> ttft, itl, e2e;
  int failed = 0;
  int64_t peak_running = 0;  // the most requests the coordinator ran at once (polled)
};

Served Serve(epic::v1::Epic::Stub& stub, const std::vector<std::vector<int32_t>>& prompts, int concurrency,
             int output_len) {
  Served out;
  std::mutex mu;
  std::atomic<size_t> next{0};
  std::atomic<int64_t> tokens{0};
  const auto start = Clock::now();
  std::atomic<bool> done{false};
  // How many requests the cluster admits at once, asked every 10 ms.
  std::thread poller([&] {
    while (!done) {
      grpc::ClientContext ctx;
      ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(1));
      epic::v1::ModelInfo info;
      if (stub.GetModelInfo(&ctx, {}, &info).ok()) {
        std::lock_guard<std::mutex> lock(mu);
        out.peak_running = std::max(out.peak_running, info.requests_running());
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
  });
  std::vector<std::thread> threads;
  for (int c = 0; c < concurrency; ++c) {
    threads.emplace_back([&] {
      for (size_t i = next++; i < prompts.size(); i = next++) {
        epic::v1::GenerateRequest request;
        request.mutable_prompt_token_ids()->Add(prompts[i].begin(), prompts[i].end());
        request.set_max_tokens(static_cast<uint32_t>(output_len));
        request.set_ignore_eos(true);
        grpc::ClientContext ctx;
        const auto t0 = Clock::now();
        auto reader = stub.Generate(&ctx, request);
        epic::v1::GenerateResponse r;
        std::vector<double> gaps;
        double ttft = -1;
        auto last = t0;
        int64_t got = 0;
        while (reader->Read(&r)) {
          if (r.token_ids_size() == 0) continue;
          const auto now = Clock::now();
          if (ttft < 0) {
            ttft = Seconds(now - t0);
          } else {
            // Tokens that arrive together share the gap.
            for (int k = 0; k < r.token_ids_size(); ++k) gaps.push_back(Seconds(now - last) / r.token_ids_size());
          }
          last = now;
          got += r.token_ids_size();
        }
        const bool ok = reader->Finish().ok();
        const double e2e = Seconds(Clock::now() - t0);
        tokens += got;
        std::lock_guard<std::mutex> lock(mu);
        if (!ok) {
          ++out.failed;
          continue;
        }
        out.ttft.push_back(ttft);
        out.e2e.push_back(e2e);
        out.itl.insert(out.itl.end(), gaps.begin(), gaps.end());
      }
    });
  }
  for (auto& t : threads) t.join();
  out.tokens_per_s = static_cast<double>(tokens) / Seconds(Clock::now() - start);
  done = true;
  poller.join();
  return out;
}

// The same requests, CONCURRENCY at a time, as one batch per step in this process.
double Offline(epic::Model& model, const std::vector<std::vector<int32_t>>& prompts, int concurrency,
               int output_len) {
  const int64_t block = 16;
  const int64_t rows = static_cast<int64_t>(prompts[0].size()) + output_len;
  auto cache = model.MakeCache(block, concurrency * ((rows + block - 1) / block));
  const int64_t vocab = model.config().vocab_size;
  int64_t generated = 0;
  const auto start = Clock::now();
  std::vector<float> logits;
  for (size_t first = 0; first < prompts.size(); first += static_cast<size_t>(concurrency)) {
    const size_t n = std::min(prompts.size() - first, static_cast<size_t>(concurrency));
    std::vector<epic::BlockTable> tables(n);
    std::vector<epic::SequenceStep> batch(n);
    std::vector<int32_t> next(n);
    for (size_t i = 0; i < n; ++i) {
      if (!cache->Reserve(&tables[i], rows).ok()) return 0;
      batch[i] = {&tables[i], prompts[first + i], false};
    }
    for (int t = 0; t < output_len; ++t) {
      if (!model.Forward(batch, cache.get(), &logits).ok()) return 0;
      for (size_t i = 0; i < n; ++i) {
        next[i] = epic::ArgMax(logits.data() + i * static_cast<size_t>(vocab), vocab);
        batch[i].tokens = {&next[i], 1};
      }
      generated += static_cast<int64_t>(n);
    }
    for (auto& t : tables) cache->Release(&t);
  }
  return static_cast<double>(generated) / Seconds(Clock::now() - start);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"serving_bench: load-test a running epic cluster (epic-coordinator + workers) over gRPC:\n"
               "throughput, time to first token and inter-token latency at each concurrency; with\n"
               "--model, also the same batch offline in this process, and served / offline throughput."};
  std::string server = "127.0.0.1:50051", model_dir, levels_text = "1,4,16";
  int prompt_len = 32, output_len = 32, per_level = 2, shared_prefix = 0;
  app.add_option("--server", server, "the coordinator, HOST:PORT")->capture_default_str();
  app.add_option("--model", model_dir,
                 "the cluster's checkpoint: also run the batch offline (one process, at the precision the "
                 "cluster's ranks report)");
  app.add_option("--concurrency", levels_text, "concurrency levels, comma-separated")->capture_default_str();
  app.add_option("--prompt-len", prompt_len, "prompt tokens per request")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--shared-prefix", shared_prefix,
                 "tokens every prompt begins with (a system prompt), before its --prompt-len own")
      ->check(CLI::NonNegativeNumber)->capture_default_str();
  app.add_option("--output-len", output_len, "generated tokens per request")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--requests-per-slot", per_level, "requests per level = this x concurrency")
      ->check(CLI::PositiveNumber)->capture_default_str();
  CLI11_PARSE(app, argc, argv);

  std::vector<int> levels;
  std::stringstream in(levels_text);
  for (std::string item; std::getline(in, item, ',');) levels.push_back(std::stoi(item));

  auto channel = grpc::CreateChannel(server, grpc::InsecureChannelCredentials());
  auto stub = epic::v1::Epic::NewStub(channel);
  epic::v1::ModelInfo info;
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    const grpc::Status s = stub->GetModelInfo(&ctx, {}, &info);
    if (!s.ok() || !info.worker_attached()) {
      std::fprintf(stderr, "serving_bench: %s is not serving (%s)\n", server.c_str(), s.error_message().c_str());
      return 1;
    }
  }
  std::unique_ptr<epic::Model> model;
  if (!model_dir.empty()) {
    // The offline peer computes as the cluster's ranks do.
    epic::cpu::Precision precision = epic::cpu::Precision::kExact;
    if (info.ranks_size() > 0) epic::cpu::ParsePrecision(info.ranks(0).precision().c_str(), &precision);
    auto loaded = epic::Model::Load(model_dir, {}, epic::WeightResidency::kCopy, {}, epic::ComputeDevice::kCpu,
                                    precision);
    if (!loaded.ok()) {
      std::fprintf(stderr, "serving_bench: %s\n", loaded.status().ToString().c_str());
      return 1;
    }
    model = std::move(loaded).value();
  }
  std::printf("serving_bench: %s, %d rank(s); prompt %d tokens (%d shared + %d own), output %d tokens; %d OpenMP threads offline\n",
              info.model().model_type().c_str(), info.ranks_size(), shared_prefix + prompt_len, shared_prefix,
              prompt_len, output_len, omp_get_max_threads());
  // running: the most requests the coordinator ran at once (the cache and --max-running bound it).
  std::printf("%5s %9s %10s %10s %10s %10s %10s %8s %10s %8s\n", "conc", "requests", "tok/s", "ttft p50", "ttft p99",
              "itl p50", "itl p99", "running", "offline", "ratio");
  for (int c : levels) {
    const int64_t vocab = info.model().vocab_size();
    const auto prompts = Prompts(c * per_level, prompt_len, vocab, shared_prefix, 7);
    Serve(*stub, Prompts(c, prompt_len, vocab, shared_prefix, 8), c, 2);  // warm-up (other prompts)
    const Served s = Serve(*stub, prompts, c, output_len);
    double offline = 0;
    if (model) offline = Offline(*model, prompts, c, output_len);
    std::printf("%5d %9zu %10.1f %9.1fms %9.1fms %9.2fms %9.2fms %8lld %10.1f %8s%s\n", c, prompts.size(),
                s.tokens_per_s, Percentile(s.ttft, 50) * 1e3, Percentile(s.ttft, 99) * 1e3,
                Percentile(s.itl, 50) * 1e3, Percentile(s.itl, 99) * 1e3, static_cast<long long>(s.peak_running),
                offline,
                model ? std::to_string(s.tokens_per_s / offline).substr(0, 5).c_str() : "-",
                s.failed ? (" (" + std::to_string(s.failed) + " failed)").c_str() : "");
  }
  return 0;
}
