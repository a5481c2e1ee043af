// The serving stack end to end, as real processes: launch/cluster.sh starts
// epic-coordinator and an mpirun job of epic-worker ranks, and the tests call it over
// gRPC on 127.0.0.1. Outputs are compared with epic-run on the same checkpoint.
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <map>
#include <mutex>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <functional>
#include <latch>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "epic.grpc.pb.h"
#include "tests/testing/cache_wait.h"
#include "tests/testing/process.h"
#include "health.grpc.pb.h"
#include "kernels/cpu/matmul_int8.h"
#include "reflection.grpc.pb.h"

namespace epic {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using testing::Capture;
using testing::HttpGet;
using testing::JsonPort;
using testing::Process;
using testing::ReadAll;

// The value of a sample line "NAME VALUE" (no labels) in a Prometheus text page.
double MetricValue(const std::string& page, const std::string& name) {
  std::istringstream in(page);
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(name + " ", 0) == 0) return std::atof(line.c_str() + name.size() + 1);
  }
  return -1;
}

struct Outcome {
  grpc::Status status;
  std::vector<int32_t> tokens;
  std::vector<float> logprobs;
  int responses = 0;
  v1::GenerateResponse last;
};

v1::GenerateRequest Request(std::vector<int32_t> prompt, uint32_t max_tokens) {
  v1::GenerateRequest r;
  r.mutable_prompt_token_ids()->Add(prompt.begin(), prompt.end());
  r.set_max_tokens(max_tokens);
  return r;
}

// Cancels the calls registered with it, from another thread.
class Canceller {
 public:
  void Add(grpc::ClientContext* ctx) {
    std::lock_guard<std::mutex> lock(mu_);
    if (cancelled_) ctx->TryCancel();
    live_.push_back(ctx);
  }
  void Remove(grpc::ClientContext* ctx) {
    std::lock_guard<std::mutex> lock(mu_);
    live_.erase(std::find(live_.begin(), live_.end(), ctx));
  }
  void CancelAll() {
    std::lock_guard<std::mutex> lock(mu_);
    cancelled_ = true;
    for (auto* ctx : live_) ctx->TryCancel();
  }

 private:
  std::mutex mu_;
  std::vector<grpc::ClientContext*> live_;
  bool cancelled_ = false;
};

class Client {
 public:
  explicit Client(int port)
      : channel_(grpc::CreateChannel("127.0.0.1:" + std::to_string(port), grpc::InsecureChannelCredentials())),
        stub_(v1::Epic::NewStub(channel_)),
        health_(grpc::health::v1::Health::NewStub(channel_)) {}

  // STOP_AFTER > 0: cancel once that many tokens arrived. DEADLINE: of the call.
  Outcome Generate(const v1::GenerateRequest& request, std::chrono::milliseconds deadline = 60s,
                   int stop_after = 0, const std::string& token = "", Canceller* canceller = nullptr) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + deadline);
    if (canceller) canceller->Add(&ctx);
    if (!token.empty()) ctx.AddMetadata("authorization", "Bearer " + token);
    Outcome out;
    auto reader = stub_->Generate(&ctx, request);
    v1::GenerateResponse r;
    while (reader->Read(&r)) {
      ++out.responses;
      out.tokens.insert(out.tokens.end(), r.token_ids().begin(), r.token_ids().end());
      out.logprobs.insert(out.logprobs.end(), r.logprobs().begin(), r.logprobs().end());
      out.last = r;
      if (stop_after > 0 && static_cast<int>(out.tokens.size()) >= stop_after) ctx.TryCancel();
    }
    out.status = reader->Finish();
    if (canceller) canceller->Remove(&ctx);
    return out;
  }

  nlohmann::json Report() {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + 10s);
    v1::LoadReport report;
    EXPECT_TRUE(stub_->GetLoadReport(&ctx, {}, &report).ok());
    return report.json().empty() ? nlohmann::json() : nlohmann::json::parse(report.json());
  }

  grpc::Status Rebalance(const v1::RebalanceRequest& request, v1::RebalanceResponse* response) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + 60s);
    return stub_->Rebalance(&ctx, request, response);
  }

  v1::ModelInfo Info() {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + 5s);
    v1::ModelInfo info;
    EXPECT_TRUE(stub_->GetModelInfo(&ctx, {}, &info).ok());
    return info;
  }

  // SERVING, NOT_SERVING, or the RPC's error code name.
  std::string Health() {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + 5s);
    grpc::health::v1::HealthCheckRequest request;
    grpc::health::v1::HealthCheckResponse response;
    const grpc::Status s = health_->Check(&ctx, request, &response);
    if (!s.ok()) return "error " + std::to_string(s.error_code());
    return grpc::health::v1::HealthCheckResponse::ServingStatus_Name(response.status());
  }

  // Until the cache budget is whole again (every block freed) or TIMEOUT.
  bool WaitAllBlocksFree(std::chrono::milliseconds timeout) {
    return testing::WaitAllBlocksFree([&] { return Info(); }, timeout);
  }

 private:
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::Epic::Stub> stub_;
  std::unique_ptr<grpc::health::v1::Health::Stub> health_;
};

constexpr int kCacheBlocks = 64;
constexpr int kBlockSize = 16;
constexpr int kMaxWaiting = 24;
// The overload cases' queue. Their first long request must be running before the
// others arrive: until a step admits it, it waits too, and the last caller finds the
// queue full (a loaded host refused it: 21 of 24, then 5 of 6, queued).
constexpr int kOverloadQueue = 6;
// Polls of 5 ms for callers to reach the queue or a request to start: up to 20 s, on a
// loaded host; each poll loop ends once they have.
constexpr int kArrivalPolls = 4000;

// Until a request runs (the overload cases' first, admitted by the next step).
void AwaitARunningRequest(Client& client) {
  for (int i = 0; i < kArrivalPolls && client.Info().requests_running() < 1; ++i) std::this_thread::sleep_for(5ms);
}

class ServingTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new fs::path(testing::DirWithModel("serving", EPIC_MKMODEL_BINARY, "v2-160", 5));
    ASSERT_FALSE(dir_->empty()) << "epic-mkmodel failed";
  }
  static void TearDownTestSuite() {
    fs::remove_all(*dir_);
    delete dir_;
  }

  void TearDown() override {
    if (cluster_) {
      cluster_->Signal(SIGTERM);
      EXPECT_NE(cluster_->Wait(30s), -1) << "launch/cluster.sh did not stop on SIGTERM";
      cluster_.reset();
    }
    if (HasFailure()) {
      for (const char* log : {"cluster.log", "coordinator.log", "worker.log"}) {
        if (fs::exists(*dir_ / log)) std::fprintf(stderr, "--- %s ---\n%s\n", log, ReadAll(*dir_ / log).c_str());
      }
    }
    for (const char* f : {"cluster.log", "coordinator.log", "worker.log", "ready.json"}) fs::remove(*dir_ / f);
  }

  // launch/cluster.sh with NP ranks; returns the gRPC port once it serves.
  // CLUSTER_FLAGS go to launch/cluster.sh, ENV to its environment.
  int StartCluster(int np, const std::vector<std::string>& coordinator_flags = {}, int max_waiting = kMaxWaiting,
                   int step_timeout = 20, const std::vector<std::string>& cluster_flags = {},
                   std::vector<std::string> env = {}) {
    const fs::path ready = *dir_ / "ready.json";
    std::vector<std::string> argv{EPIC_CLUSTER_SCRIPT, "--model", (*dir_ / "model").string(), "--np",
                                 std::to_string(np), "--port", "0", "--http-port", "off", "--metrics-port", "0", "--listen-host",
                                 "127.0.0.1", "--threads", "1", "--no-build", "--ready-file", ready.string()};
    argv.insert(argv.end(), cluster_flags.begin(), cluster_flags.end());
    argv.insert(argv.end(), {"--",
                                 "--cache-blocks", std::to_string(kCacheBlocks), "--block-size",
                                 std::to_string(block_size_), "--max-waiting", std::to_string(max_waiting),
                                 "--max-running", "16", "--max-step-tokens", "64", "--step-timeout", std::to_string(step_timeout),
                                 "--drain-timeout", "10"});
    argv.insert(argv.end(), coordinator_flags.begin(), coordinator_flags.end());
    env.push_back("EPIC_BUILD_DIR=" + std::string(EPIC_BUILD_DIR));
    cluster_ = std::make_unique<Process>(argv, *dir_ / "cluster.log", env);
    for (int i = 0; i < 600 && !fs::exists(ready); ++i) std::this_thread::sleep_for(100ms);
    const std::string text = ReadAll(ready);
    metrics_port_ = JsonPort(text, "metrics_port");
    return JsonPort(text, "port");
  }

  // What epic-run prints for PROMPT, greedy, in one process.
  std::vector<int32_t> EpicRun(const std::vector<int32_t>& prompt, int max_new, bool ignore_eos = false,
                               const std::string& flags = "") {
    std::string tokens;
    for (int32_t t : prompt) {
      if (!tokens.empty()) tokens += ',';
      tokens += std::to_string(t);
    }
    std::istringstream out(Capture(std::string(EPIC_RUN_BINARY) + " --model " + (*dir_ / "model").string() +
                                   " --threads 1 --tokens " + tokens + " --max-new-tokens " +
                                   std::to_string(max_new) + (ignore_eos ? " --ignore-eos" : "") + " " + flags +
                                   " 2>/dev/null"));
    std::vector<int32_t> ids;
    int32_t id;
    while (out >> id) ids.push_back(id);
    return ids;
  }

  static fs::path* dir_;
  std::unique_ptr<Process> cluster_;
  int metrics_port_ = 0;
  // The cluster's cache block size: a test that holds the cache with one long request
  // while others queue takes larger blocks, so that the request runs for seconds (1000
  // tokens of this model can end before 25 requests are queued on a loaded host).
  int block_size_ = kBlockSize;
};

fs::path* ServingTest::dir_ = nullptr;

TEST_F(ServingTest, ConcurrentStreamsMatchEpicRun) {
  const int port = StartCluster(3);
  ASSERT_GT(port, 0);
  Client client(port);
  EXPECT_EQ(client.Health(), "SERVING");
  constexpr int kRequests = 16;
  constexpr int kMaxTokens = 10;
  std::vector<std::vector<int32_t>> prompts;
  for (int i = 0; i < kRequests; ++i) {
    // Lengths 1 to 40: some prompts span several steps (64-token budget shared by 16).
    std::vector<int32_t> p;
    for (int j = 0; j <= (i * 7) % 40; ++j) p.push_back((i * 131 + j * 17 + 2) % 1024);
    prompts.push_back(p);
  }
  std::vector<Outcome> outcomes(kRequests);
  std::vector<std::thread> threads;
  for (int i = 0; i < kRequests; ++i) {
    threads.emplace_back([&, i] { outcomes[i] = client.Generate(Request(prompts[i], kMaxTokens)); });
  }
  for (auto& t : threads) t.join();
  int streamed = 0;
  for (int i = 0; i < kRequests; ++i) {
    ASSERT_TRUE(outcomes[i].status.ok()) << i << ": " << outcomes[i].status.error_message();
    EXPECT_EQ(outcomes[i].tokens, EpicRun(prompts[i], kMaxTokens)) << "request " << i;
    const v1::GenerateResponse& last = outcomes[i].last;
    EXPECT_NE(last.finish_reason(), v1::FINISH_REASON_UNSPECIFIED);
    EXPECT_EQ(last.usage().completion_tokens(), outcomes[i].tokens.size());
    EXPECT_EQ(last.usage().prompt_tokens(), prompts[i].size());
    if (last.finish_reason() == v1::FINISH_REASON_LENGTH) {
      EXPECT_EQ(outcomes[i].tokens.size(), kMaxTokens);
    }
    streamed += outcomes[i].responses > 1;
  }
  EXPECT_GT(streamed, 0) << "no request received its tokens in more than one response";
  EXPECT_TRUE(client.WaitAllBlocksFree(5s));
  // Before its first step the job ran one step the size of the coordinator's budget.
  EXPECT_NE(ReadAll(*dir_ / "cluster.log").find("epic-worker: warmed up with a step of 64 tokens"), std::string::npos);

  // The metrics saw it all.
  const std::string page = HttpGet(metrics_port_, "/metrics");
  EXPECT_GE(MetricValue(page, "epic:time_to_first_token_seconds_count"), kRequests) << page;
  EXPECT_GT(MetricValue(page, "epic:inter_token_latency_seconds_count"), 0);
  EXPECT_GE(MetricValue(page, "epic:e2e_request_latency_seconds_count"), kRequests);
  EXPECT_GT(MetricValue(page, "epic:generation_tokens_total"), kRequests);
  EXPECT_EQ(MetricValue(page, "epic:num_requests_running"), 0);
  EXPECT_EQ(MetricValue(page, "epic:num_requests_waiting"), 0);
  EXPECT_EQ(MetricValue(page, "epic:cache_usage_perc"), 0);
  EXPECT_EQ(MetricValue(page, "epic:worker_attached"), 1);

  // The job's ranks and placement are visible.
  const v1::ModelInfo info = client.Info();
  EXPECT_EQ(info.ranks_size(), 3);
  EXPECT_EQ(info.model().n_routed_experts(), 160);
  ASSERT_GT(info.placement_size(), 0);
  int experts = 0;
  for (const auto& rank : info.placement(0).ranks()) experts += rank.experts_size();
  EXPECT_EQ(experts, 160);
}

TEST_F(ServingTest, BadRequestsAreRefusedNamingTheFieldAndServingGoesOn) {
  const int port = StartCluster(2);
  ASSERT_GT(port, 0);
  Client client(port);
  struct Case {
    const char* what;
    v1::GenerateRequest request;
    grpc::StatusCode code;
    const char* field;
  };
  std::vector<Case> cases;
  auto add = [&](const char* what, v1::GenerateRequest r, const char* field,
                 grpc::StatusCode code = grpc::StatusCode::INVALID_ARGUMENT) {
    cases.push_back({what, std::move(r), code, field});
  };
  add("empty prompt", Request({}, 4), "prompt_token_ids");
  add("prompt id past the vocabulary", Request({5, 1024}, 4), "prompt_token_ids[1]");
  add("negative prompt id", Request({-3}, 4), "prompt_token_ids[0]");
  v1::GenerateRequest r = Request({5}, 4);
  r.add_stop_token_ids(99999);
  add("stop id past the vocabulary", r, "stop_token_ids[0]");
  add("max_tokens 0", Request({5}, 0), "max_tokens");
  add("past the context", Request({5}, 200000), "max_tokens");
  add("more blocks than the cache", Request({5}, kCacheBlocks * kBlockSize + 1), "max_tokens");
  r = Request({5}, 4);
  r.mutable_sampling()->set_temperature(-1);
  add("negative temperature", r, "sampling.temperature");
  r = Request({5}, 4);
  r.mutable_sampling()->set_temperature(NAN);
  add("NaN temperature", r, "sampling.temperature");
  r = Request({5}, 4);
  r.mutable_sampling()->set_top_p(0);
  add("top_p 0", r, "sampling.top_p");
  r = Request({5}, 4);
  r.mutable_sampling()->set_top_p(1.5);
  add("top_p above 1", r, "sampling.top_p");
  r = Request({5}, 4);
  r.mutable_sampling()->set_top_k(-1);
  add("negative top_k", r, "sampling.top_k");
  for (const Case& c : cases) {
    const Outcome o = client.Generate(c.request);
    EXPECT_EQ(o.status.error_code(), c.code) << c.what << ": " << o.status.error_message();
    EXPECT_NE(o.status.error_message().find(c.field), std::string::npos) << c.what << ": " << o.status.error_message();
    EXPECT_TRUE(o.tokens.empty()) << c.what;
  }
  // Still serving, with the whole budget.
  const Outcome good = client.Generate(Request({5, 17, 300}, 4));
  EXPECT_TRUE(good.status.ok()) << good.status.error_message();
  EXPECT_FALSE(good.tokens.empty());
  EXPECT_TRUE(client.WaitAllBlocksFree(5s));

  // Seeded sampling through the server is repeatable, and equals epic-run's.
  v1::GenerateRequest sampled = Request({9, 8, 7}, 12);
  sampled.mutable_sampling()->set_temperature(1.0);
  sampled.mutable_sampling()->set_seed(42);
  sampled.set_logprobs(true);
  const Outcome a = client.Generate(sampled), b = client.Generate(sampled);
  ASSERT_TRUE(a.status.ok());
  EXPECT_EQ(a.tokens, b.tokens);
  const std::string run = Capture(std::string(EPIC_RUN_BINARY) + " --model " + (*dir_ / "model").string() +
                                  " --tokens 9,8,7 --max-new-tokens 12 --temperature 1 --seed 42 2>/dev/null");
  std::string expected;
  for (int32_t t : a.tokens) {
    if (!expected.empty()) expected += ' ';
    expected += std::to_string(t);
  }
  EXPECT_EQ(run, expected + "\n");
  EXPECT_LE(a.last.logprobs_size(), a.last.token_ids_size());
}

// A field of /proc/PID/status ("" when there is none).
std::string ProcStatus(pid_t pid, const std::string& key) {
  const std::string status = ReadAll(fs::path("/proc") / std::to_string(pid) / "status");
  const size_t at = status.find("\n" + key + ":");
  if (at == std::string::npos) return "";
  const size_t begin = at + key.size() + 2;
  return status.substr(begin, status.find('\n', begin) - begin);
}

// The children of PARENT, only those whose /proc/PID/comm is NAME when one is given.
std::vector<pid_t> ChildrenOf(pid_t parent, const std::string& name = "") {
  std::vector<pid_t> children;
  for (const auto& entry : fs::directory_iterator("/proc")) {
    const std::string pid = entry.path().filename().string();
    if (pid.find_first_not_of("0123456789") != std::string::npos) continue;
    if (std::atoi(ProcStatus(std::atoi(pid.c_str()), "PPid").c_str()) != parent) continue;
    std::string comm = ReadAll(entry.path() / "comm");
    while (!comm.empty() && comm.back() == '\n') comm.pop_back();
    if (name.empty() || comm == name) children.push_back(std::atoi(pid.c_str()));
  }
  return children;
}

// The resident memory of the child of PARENT named NAME, in KiB; -1 when there is none.
int64_t ChildRssKib(pid_t parent, const std::string& name) {
  const std::vector<pid_t> children = ChildrenOf(parent, name);
  return children.empty() ? -1 : std::atoll(ProcStatus(children[0], "VmRSS").c_str());
}

// Thousands of requests beyond a full queue: each refused at once, RESOURCE_EXHAUSTED,
// and the coordinator's memory stays where it was.
TEST_F(ServingTest, ABurstFarBeyondTheQueueIsRefusedQuicklyInBoundedMemory) {
  block_size_ = 4 * kBlockSize;
  const int port = StartCluster(2, {}, kOverloadQueue);
  ASSERT_GT(port, 0);
  Client client(port);
  v1::GenerateRequest long_request = Request({5, 17, 300}, 4000);  // 63 of the 64 blocks of 64
  long_request.set_ignore_eos(true);
  Canceller canceller;
  std::vector<std::thread> holders;
  // However the test ends, the holders end first (a joinable thread would abort it).
  struct Release {
    Canceller& canceller;
    std::vector<std::thread>& threads;
    ~Release() {
      canceller.CancelAll();
      for (auto& t : threads) t.join();
    }
  } release{canceller, holders};
  for (int i = 0; i < 1 + kOverloadQueue; ++i) {
    holders.emplace_back([&] { client.Generate(long_request, 120s, 0, "", &canceller); });
    if (i == 0) AwaitARunningRequest(client);
  }
  for (int i = 0; i < kArrivalPolls && client.Info().requests_waiting() < kOverloadQueue; ++i) {
    std::this_thread::sleep_for(5ms);
  }
  ASSERT_EQ(client.Info().requests_waiting(), kOverloadQueue);
  std::vector<int32_t> prompt;
  for (int i = 0; i < 200; ++i) prompt.push_back(3 + i);
  const v1::GenerateRequest small = Request(prompt, 8);
  auto burst = [&](int threads, int each) {
    std::atomic<int> refused{0};
    std::vector<double> seconds(static_cast<size_t>(threads * each));
    std::vector<std::thread> callers;
    for (int t = 0; t < threads; ++t) {
      callers.emplace_back([&, t] {
        for (int i = 0; i < each; ++i) {
          const auto start = std::chrono::steady_clock::now();
          const Outcome o = client.Generate(small, 10s);
          seconds[t * each + i] = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
          if (o.status.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED) ++refused;
        }
      });
    }
    for (auto& c : callers) c.join();
    std::sort(seconds.begin(), seconds.end());
    EXPECT_EQ(refused.load(), threads * each);
    return seconds[seconds.size() / 2];
  };
  const pid_t cluster = cluster_->pid();
  burst(32, 16);  // the server's threads and buffers grown once
  const int64_t before = ChildRssKib(cluster, "epic-coordinato");
  ASSERT_GT(before, 0);
  const double median = burst(32, 128);
  const int64_t after = ChildRssKib(cluster, "epic-coordinato");
  std::printf("4096 refused requests: median %.1f ms each; coordinator RSS %lld -> %lld KiB\n", median * 1e3,
              static_cast<long long>(before), static_cast<long long>(after));
  EXPECT_LT(median, 0.1) << "refusals are slow";
  // 4 MiB over 4096 requests: a leak of 1 KiB a request (less than one request's prompt) shows.
  EXPECT_LT(after - before, 4 * 1024) << "the coordinator's memory grew with refused requests";
  canceller.CancelAll();
  for (auto& h : holders) h.join();
  holders.clear();
  EXPECT_TRUE(client.WaitAllBlocksFree(10s));
  EXPECT_TRUE(client.Generate(Request({5, 17, 300}, 3)).status.ok());
}

TEST_F(ServingTest, OverloadIsRefusedAndCancelledOrExpiredRequestsFreeTheirBlocks) {
  block_size_ = 4 * kBlockSize;
  const int port = StartCluster(2, {}, kOverloadQueue);
  ASSERT_GT(port, 0);
  Client client(port);
  // Each needs 63 of the 64 blocks of 64: one runs, kOverloadQueue queue, the rest are refused.
  v1::GenerateRequest long_request = Request({5, 17, 300}, 4000);
  long_request.set_ignore_eos(true);
  Canceller canceller;
  std::vector<Outcome> outcomes(1 + kOverloadQueue);
  std::vector<std::thread> threads;
  // However the test ends, the callers end first (a joinable thread would abort it, and
  // the cluster's logs would go unprinted).
  struct Release {
    Canceller& canceller;
    std::vector<std::thread>& threads;
    ~Release() {
      canceller.CancelAll();
      for (auto& t : threads) {
        if (t.joinable()) t.join();
      }
    }
  } release{canceller, threads};
  for (size_t i = 0; i < outcomes.size(); ++i) {
    threads.emplace_back([&, i] { outcomes[i] = client.Generate(long_request, 60s, 0, "", &canceller); });
    if (i == 0) AwaitARunningRequest(client);
  }
  v1::ModelInfo info;
  for (int i = 0; i < kArrivalPolls; ++i) {
    info = client.Info();
    if (info.requests_running() == 1 && info.requests_waiting() == kOverloadQueue) break;
    std::this_thread::sleep_for(5ms);
  }
  EXPECT_EQ(info.requests_running(), 1);
  ASSERT_EQ(info.requests_waiting(), kOverloadQueue);
  EXPECT_EQ(info.cache().free_blocks(), 1);
  for (int i = 0; i < 5; ++i) {
    const Outcome o = client.Generate(Request({5}, 2));
    EXPECT_EQ(o.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << o.status.error_message();
    EXPECT_NE(o.status.error_message().find("queue is full"), std::string::npos);
  }
  canceller.CancelAll();
  for (auto& t : threads) t.join();
  for (const Outcome& o : outcomes) {
    EXPECT_EQ(o.status.error_code(), grpc::StatusCode::CANCELLED) << o.status.error_message();
  }
  EXPECT_TRUE(client.WaitAllBlocksFree(10s)) << "cancelled requests kept cache blocks";

  // A deadline ends a long request and frees its blocks.
  // 4000 tokens take seconds here; the deadline is far shorter.
  const Outcome expired = client.Generate(long_request, 150ms);
  EXPECT_EQ(expired.status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  EXPECT_TRUE(client.WaitAllBlocksFree(5s)) << "an expired request kept its cache blocks";

  const std::string page = HttpGet(metrics_port_, "/metrics");
  EXPECT_NE(page.find("epic:request_finished_total{outcome=\"cancelled\"}"), std::string::npos);
  // And the cluster still serves.
  EXPECT_TRUE(client.Generate(Request({5, 17, 300}, 3)).status.ok());
}

TEST_F(ServingTest, KilledWorkerRankEndsRequestsUnavailableAndTheRelaunchedJobServes) {
  const int port = StartCluster(2, {"--resume-timeout", "0"});  // fail at once, not resume
  ASSERT_GT(port, 0);
  Client client(port);
  v1::ModelInfo info = client.Info();
  ASSERT_EQ(info.ranks_size(), 2);
  EXPECT_EQ(info.worker_attachments(), 1);
  const pid_t victim = static_cast<pid_t>(info.ranks(1).pid());

  v1::GenerateRequest long_request = Request({5, 17, 300}, 1000);
  long_request.set_ignore_eos(true);
  Outcome outcome;
  std::chrono::steady_clock::time_point ended;
  std::thread caller([&] {
    outcome = client.Generate(long_request);
    ended = std::chrono::steady_clock::now();
  });
  // Mid-generation: wait for the first tokens.
  for (int i = 0; i < 200 && client.Info().steps() < 5; ++i) std::this_thread::sleep_for(10ms);
  ASSERT_EQ(kill(victim, SIGKILL), 0);
  const auto killed = std::chrono::steady_clock::now();
  caller.join();
  EXPECT_EQ(outcome.status.error_code(), grpc::StatusCode::UNAVAILABLE) << outcome.status.error_message();
  EXPECT_NE(outcome.status.error_message().find("worker job"), std::string::npos);
  EXPECT_LT(outcome.tokens.size(), 1000u);
  EXPECT_LT(std::chrono::duration<double>(ended - killed).count(), 10.0);

  // The coordinator stays up; the launcher relaunches the job and serving resumes.
  const auto deadline = std::chrono::steady_clock::now() + 60s;
  while (std::chrono::steady_clock::now() < deadline) {
    info = client.Info();
    if (info.worker_attached() && info.worker_attachments() >= 2) break;
    std::this_thread::sleep_for(100ms);
  }
  ASSERT_TRUE(info.worker_attached()) << "the worker job was not relaunched";
  EXPECT_EQ(client.Health(), "SERVING");
  EXPECT_NE(info.ranks(1).pid(), victim);
  const Outcome again = client.Generate(Request({5, 17, 300}, 6));
  EXPECT_TRUE(again.status.ok()) << again.status.error_message();
  EXPECT_EQ(again.tokens, EpicRun({5, 17, 300}, 6));
}

// The same kill, with resuming on (the default): every request in flight or queued
// waits for the relaunched job and ends exactly as an undisturbed run would, greedy and
// seeded sampling alike.
TEST_F(ServingTest, RequestsInFlightWhenARankDiesResumeUnchanged) {
  const int port = StartCluster(2);
  ASSERT_GT(port, 0);
  Client client(port);
  const pid_t victim = static_cast<pid_t>(client.Info().ranks(1).pid());
  constexpr int kGreedy = 4;
  constexpr uint32_t kTokens = 60;
  std::vector<v1::GenerateRequest> requests;
  for (int i = 0; i < kGreedy + 2; ++i) {
    v1::GenerateRequest r = Request({static_cast<int32_t>(5 + i), 17, 300, static_cast<int32_t>(40 + 3 * i)}, kTokens);
    r.set_ignore_eos(true);
    if (i >= kGreedy) {  // sampled, seeded
      r.mutable_sampling()->set_temperature(0.9f);
      r.mutable_sampling()->set_seed(100 + i);
    }
    requests.push_back(r);
  }
  std::vector<Outcome> outcomes(requests.size());
  std::vector<std::thread> callers;
  for (size_t i = 0; i < requests.size(); ++i) {
    callers.emplace_back([&, i] { outcomes[i] = client.Generate(requests[i], 120s); });
  }
  for (int i = 0; i < 400 && client.Info().steps() < 8; ++i) std::this_thread::sleep_for(10ms);
  ASSERT_EQ(kill(victim, SIGKILL), 0);
  for (auto& t : callers) t.join();
  for (size_t i = 0; i < requests.size(); ++i) {
    ASSERT_TRUE(outcomes[i].status.ok()) << i << ": " << outcomes[i].status.error_message();
    ASSERT_EQ(outcomes[i].tokens.size(), kTokens) << i;
  }
  EXPECT_GE(client.Info().worker_attachments(), 2) << "the job was never killed and relaunched";
  for (int i = 0; i < kGreedy; ++i) {
    const std::vector<int32_t> prompt(requests[i].prompt_token_ids().begin(), requests[i].prompt_token_ids().end());
    EXPECT_EQ(outcomes[i].tokens, EpicRun(prompt, kTokens, /*ignore_eos=*/true)) << "greedy request " << i;
  }
  // The sampled ones again on the undisturbed relaunched job: the same draws, the same tokens.
  for (size_t i = kGreedy; i < requests.size(); ++i) {
    const Outcome again = client.Generate(requests[i]);
    ASSERT_TRUE(again.status.ok()) << again.status.error_message();
    EXPECT_EQ(outcomes[i].tokens, again.tokens) << "sampled request " << i;
  }
  EXPECT_TRUE(client.WaitAllBlocksFree(5s));
}

// A fault while 56 requests are in flight or queued (prompts of 8 to 40 tokens, greedy
// and seeded sampling): every request ends exactly as it did on the undisturbed cluster
// just before, and none is lost.
enum class Fault { kKillInPrefill, kKillInDecode, kStopRankZero };

class FaultTest : public ServingTest, public ::testing::WithParamInterface<Fault> {};

TEST_P(FaultTest, FiftySixRequestsSurviveAndEndAsUndisturbed) {
  const Fault fault = GetParam();
  constexpr double kStepTimeout = 3;
  // No prefix cache: the second run must prefill its prompts as the first did.
  const int port = StartCluster(2, {"--prefix-cache", "off"}, /*max_waiting=*/64, static_cast<int>(kStepTimeout));
  ASSERT_GT(port, 0);
  Client client(port);
  std::vector<v1::GenerateRequest> requests;
  for (int i = 0; i < 56; ++i) {
    std::vector<int32_t> prompt;
    for (int j = 0; j < 8 + (i * 13) % 33; ++j) prompt.push_back(static_cast<int32_t>(3 + (i * 31 + j * 7) % 500));
    v1::GenerateRequest r = Request(prompt, 12);
    r.set_ignore_eos(true);
    if (i % 7 == 6) {
      r.mutable_sampling()->set_temperature(0.8f);
      r.mutable_sampling()->set_seed(1000 + i);
    }
    requests.push_back(r);
  }
  auto serve = [&](const std::function<void()>& disturb) {
    std::vector<Outcome> out(requests.size());
    std::vector<std::thread> callers;
    // Every caller started before any calls: the burst arrives at once, not over the
    // first steps (a fault must not find requests still to come).
    std::latch start(static_cast<std::ptrdiff_t>(requests.size()));
    for (size_t i = 0; i < requests.size(); ++i) {
      callers.emplace_back([&, i] {
        start.arrive_and_wait();
        out[i] = client.Generate(requests[i], 180s);
      });
    }
    if (disturb) disturb();
    for (auto& t : callers) t.join();
    return out;
  };
  const std::vector<Outcome> undisturbed = serve({});
  for (size_t i = 0; i < undisturbed.size(); ++i) {
    ASSERT_TRUE(undisturbed[i].status.ok()) << i << ": " << undisturbed[i].status.error_message();
  }

  const int64_t steps = client.Info().steps();
  const int64_t attachments = client.Info().worker_attachments();
  std::mt19937 rng(std::random_device{}());
  const int rank = fault == Fault::kStopRankZero ? 0 : static_cast<int>(rng() % 2);
  const pid_t victim = static_cast<pid_t>(client.Info().ranks(rank).pid());
  std::chrono::steady_clock::time_point hit;
  const std::vector<Outcome> disturbed = serve([&] {
    // Prefill: the burst's first steps are its prompts' chunks; decode: later, when
    // the first requests stream tokens while others still wait.
    int64_t at = steps + (fault == Fault::kKillInPrefill ? 2 : 30);
    // Requests of the burst the coordinator has seen: those in it and those it ended.
    const double ended_before = MetricValue(HttpGet(metrics_port_, "/metrics"), "epic:e2e_request_latency_seconds_count");
    auto arrived = [&] {
      const v1::ModelInfo info = client.Info();
      const double ended =
          MetricValue(HttpGet(metrics_port_, "/metrics"), "epic:e2e_request_latency_seconds_count") - ended_before;
      return info.requests_running() + info.requests_waiting() + static_cast<int64_t>(ended);
    };
    // The whole burst in first. On a loaded host the callers may take many steps to
    // arrive (early ones could end meanwhile): the fault then comes that many steps later.
    for (int i = 0; i < 2000 && arrived() < static_cast<int64_t>(requests.size()); ++i) {
      std::this_thread::sleep_for(2ms);
    }
    at = std::max(at, client.Info().steps() + 1);
    for (int i = 0; i < 3000 && client.Info().steps() < at; ++i) std::this_thread::sleep_for(5ms);
    const v1::ModelInfo now = client.Info();
    hit = std::chrono::steady_clock::now();
    ASSERT_EQ(kill(victim, fault == Fault::kStopRankZero ? SIGSTOP : SIGKILL), 0) << "rank " << rank;
    std::printf("fault at step %lld of the burst: %lld requests running, %lld waiting\n",
                static_cast<long long>(now.steps() - steps), static_cast<long long>(now.requests_running()),
                static_cast<long long>(now.requests_waiting()));
    // The fault lands while the work is there: prefill before any request could end.
    EXPECT_GT(now.requests_running(), 0);
    if (fault == Fault::kKillInPrefill) {
      EXPECT_GE(now.requests_running() + now.requests_waiting(), 50);
    }
  });
  const double recovered = std::chrono::duration<double>(std::chrono::steady_clock::now() - hit).count();
  std::printf("fault on rank %d: every request done %.1f s after it\n", rank, recovered);
  for (size_t i = 0; i < requests.size(); ++i) {
    ASSERT_TRUE(disturbed[i].status.ok()) << i << ": " << disturbed[i].status.error_message();
    EXPECT_EQ(disturbed[i].tokens, undisturbed[i].tokens) << "request " << i;
  }
  EXPECT_GT(client.Info().worker_attachments(), attachments) << "the job was never ended and relaunched";
  if (fault == Fault::kStopRankZero) {
    // Within the step timeout, the job ended 2 s after the coordinator dropped it, a
    // relaunch, and the rest of the work: not the MPI watchdog's 5 minutes.
    EXPECT_LT(recovered, kStepTimeout + 40) << "a stopped rank held the cluster down";
    bool gone = false;  // nothing is left of the stopped rank
    for (int i = 0; i < 50 && !gone; ++i, std::this_thread::sleep_for(100ms)) gone = kill(victim, 0) != 0;
    EXPECT_TRUE(gone) << "the stopped rank " << victim << " is still there";
    if (!gone) kill(victim, SIGKILL);
  }
  EXPECT_TRUE(client.WaitAllBlocksFree(5s));
}

INSTANTIATE_TEST_SUITE_P(Faults, FaultTest,
                         ::testing::Values(Fault::kKillInPrefill, Fault::kKillInDecode, Fault::kStopRankZero),
                         [](const ::testing::TestParamInfo<Fault>& info) {
                           return std::string(info.param == Fault::kKillInPrefill  ? "KillInPrefill"
                                              : info.param == Fault::kKillInDecode ? "KillInDecode"
                                                                                   : "StopRankZero");
                         });

// A worker host vanishes (its MPI daemon and ranks killed, and it no longer answers):
// the job is relaunched on the host that remains, with fewer ranks, the coordinator
// takes the smaller job, and requests in flight end as they would have.
TEST_F(ServingTest, AJobLosingAHostIsRelaunchedOnTheHostsThatRemain) {
  const fs::path hostfile = *dir_ / "hosts";
  const fs::path down = *dir_ / "hosts-down";
  {
    std::ofstream(hostfile) << "localhost slots=2\nghost slots=2\n";
    std::ofstream(down) << "";
  }
  // "ghost" is this machine too, reached through a stand-in for ssh.
  const int port = StartCluster(4, {}, kMaxWaiting, 20,
                                {"--hostfile", hostfile.string(), "--host-check", EPIC_FAKE_RSH, "--mpirun-arg",
                                 "--mca", "--mpirun-arg", "plm_rsh_agent", "--mpirun-arg", EPIC_FAKE_RSH,
                                 // Two "hosts" on one machine must not share memory segments:
                                 // Open MPI's shared-memory transport then crashes at times.
                                 "--mpirun-arg", "--mca", "--mpirun-arg", "btl", "--mpirun-arg", "self,tcp"},
                                {"EPIC_FAKE_HOSTS_DOWN=" + down.string()});
  ASSERT_GT(port, 0);
  Client client(port);
  ASSERT_EQ(client.Info().ranks_size(), 4);
  const std::vector<int32_t> prompt{5, 17, 300, 41};
  v1::GenerateRequest request = Request(prompt, 40);
  request.set_ignore_eos(true);
  const Outcome undisturbed = client.Generate(request);
  ASSERT_TRUE(undisturbed.status.ok()) << undisturbed.status.error_message();

  Outcome in_flight;
  std::jthread caller([&] { in_flight = client.Generate(request, 120s); });  // joined however the test ends
  const int64_t steps = client.Info().steps();
  for (int i = 0; i < 1000 && client.Info().steps() < steps + 5; ++i) std::this_thread::sleep_for(5ms);
  // The ghost host goes: it stops answering, and its daemon and ranks die.
  std::ofstream(down) << "ghost\n";
  std::vector<pid_t> mpirun = ChildrenOf(cluster_->pid(), "mpirun");
  ASSERT_EQ(mpirun.size(), 1u);
  const std::vector<pid_t> daemons = ChildrenOf(mpirun[0], "orted");
  ASSERT_EQ(daemons.size(), 1u) << "no MPI daemon of the ghost host";
  for (pid_t rank : ChildrenOf(daemons[0])) kill(rank, SIGKILL);
  kill(daemons[0], SIGKILL);
  const auto killed = std::chrono::steady_clock::now();
  const Outcome first = client.Generate(Request({7, 8}, 1), 60s);  // waits for the next job
  const double recovery = std::chrono::duration<double>(std::chrono::steady_clock::now() - killed).count();
  caller.join();
  ASSERT_TRUE(first.status.ok()) << first.status.error_message();
  std::printf("a host lost: first token served again %.1f s after its ranks died\n", recovery);
  EXPECT_LT(recovery, 20.0);
  ASSERT_TRUE(in_flight.status.ok()) << in_flight.status.error_message();
  EXPECT_EQ(in_flight.tokens, undisturbed.tokens);
  const v1::ModelInfo info = client.Info();
  EXPECT_EQ(info.ranks_size(), 2) << "the job was not relaunched on the remaining host";
  const std::string log = ReadAll(*dir_ / "cluster.log");
  EXPECT_NE(log.find("host ghost does not answer"), std::string::npos);
  // The smaller job's placement is planned from what the larger one measured.
  EXPECT_NE(log.find("a job of 2 rank(s) after one of 4: planned its placement"), std::string::npos);
  EXPECT_NE(log.find("rebalanced:"), std::string::npos);
  const Outcome after = client.Generate(request);
  ASSERT_TRUE(after.status.ok()) << after.status.error_message();
  EXPECT_EQ(after.tokens, undisturbed.tokens);
}

// Requests that share long prefixes (a 160-token system prompt for each of 12 "apps",
// two users each, twice over), with the prefix cache on and then off: the same tokens
// and log-probabilities, although the prefixes need twice the 64 blocks there are and
// shared blocks are evicted along the way.
TEST_F(ServingTest, ThePrefixCacheChangesNoAnswerAndSkipsSharedPrefill) {
  constexpr int kApps = 12, kUsers = 2, kRounds = 2, kSystem = 160;
  auto request_of = [](int round, int app, int user) {
    std::vector<int32_t> prompt;
    for (int i = 0; i < kSystem; ++i) prompt.push_back(3 + (app * 37 + i * 11) % 700);
    for (int i = 0; i < 5 + user; ++i) prompt.push_back(700 + user * 50 + round * 7 + i);
    v1::GenerateRequest r = Request(prompt, 6);
    r.set_ignore_eos(true);
    r.set_logprobs(true);
    return r;
  };
  std::vector<std::map<std::tuple<int, int, int>, Outcome>> runs;
  std::vector<std::string> metrics;
  for (const char* mode : {"on", "off"}) {
    const int port = StartCluster(2, {"--prefix-cache", mode});
    ASSERT_GT(port, 0) << mode;
    Client client(port);
    std::map<std::tuple<int, int, int>, Outcome> outcomes;
    std::mutex mu;
    // An app's users one after the other (the second finds the first's prompt cached),
    // two apps at a time.
    auto serve_app = [&](int round, int app) {
      for (int user = 0; user < kUsers; ++user) {
        Outcome o = client.Generate(request_of(round, app, user));
        std::lock_guard<std::mutex> lock(mu);
        outcomes[{round, app, user}] = std::move(o);
      }
    };
    for (int round = 0; round < kRounds; ++round) {
      for (int app = 0; app < kApps; app += 2) {
        std::jthread other([&] { serve_app(round, app + 1); });
        serve_app(round, app);
      }
    }
    EXPECT_TRUE(client.WaitAllBlocksFree(5s)) << mode;
    metrics.push_back(HttpGet(metrics_port_, "/metrics"));
    runs.push_back(std::move(outcomes));
    cluster_->Signal(SIGTERM);
    EXPECT_NE(cluster_->Wait(30s), -1);
    cluster_.reset();
    fs::remove(*dir_ / "ready.json");
  }
  int64_t cached = 0;
  for (const auto& [key, on] : runs[0]) {
    const Outcome& off = runs[1].at(key);
    ASSERT_TRUE(on.status.ok()) << on.status.error_message();
    ASSERT_TRUE(off.status.ok()) << off.status.error_message();
    EXPECT_EQ(on.tokens, off.tokens);
    ASSERT_EQ(on.logprobs.size(), off.logprobs.size());
    for (size_t i = 0; i < on.logprobs.size(); ++i) EXPECT_NEAR(on.logprobs[i], off.logprobs[i], 1e-5);
    EXPECT_EQ(off.last.usage().cached_tokens(), 0u);
    cached += on.last.usage().cached_tokens();
  }
  // Every app's second user finds at least the system prompt's 10 full blocks cached.
  EXPECT_GE(cached, int64_t{kRounds} * kApps * kSystem);
  EXPECT_GE(MetricValue(metrics[0], "epic:prefix_cache_hits_total"), static_cast<double>(cached));
  EXPECT_GT(MetricValue(metrics[0], "epic:prefix_cache_evictions_total"), 0) << "the cache never filled";
  EXPECT_EQ(MetricValue(metrics[1], "epic:prefix_cache_hits_total"), 0);
}

// Data-parallel attention, on more ranks than the model has heads, serves what
// tensor-parallel attention does: the same tokens and logprobs, sampled or greedy, with
// prefixes shared on a rank's own cache.
TEST_F(ServingTest, DataParallelAttentionServesWhatTensorParallelDoes) {
  constexpr int kRequests = 20, kRanksDp = 6;
  std::vector<v1::GenerateRequest> requests;
  for (int i = 0; i < kRequests; ++i) {
    std::vector<int32_t> prompt;
    if (i % 2 == 0) {
      for (int j = 0; j < 40; ++j) prompt.push_back(3 + j * 13 % 500);  // a shared system prompt
    }
    for (int j = 0; j <= (i * 13) % 50; ++j) prompt.push_back((i * 131 + j * 17 + 2) % 1024);
    v1::GenerateRequest r = Request(prompt, 6);
    r.set_ignore_eos(true);
    r.set_logprobs(true);
    if (i % 3 == 0) {
      r.mutable_sampling()->set_temperature(0.8f);
      r.mutable_sampling()->set_seed(100 + i);
    }
    requests.push_back(r);
  }
  std::vector<std::vector<Outcome>> runs;
  for (const auto& [mode, np] : {std::pair<std::string, int>{"tp", 2}, {"dp", kRanksDp}}) {
    SCOPED_TRACE(mode);
    const int port = StartCluster(np, {"--redundant-slots", "2"}, kMaxWaiting, 20, {"--attention", mode});
    ASSERT_GT(port, 0);
    Client client(port);
    const v1::ModelInfo info = client.Info();
    EXPECT_EQ(info.cache().attention(), mode);
    EXPECT_EQ(info.cache_footprint().attention(), mode);
    EXPECT_EQ(info.cache_footprint().ranks(), np);
    const v1::AttentionCacheCost& latent = info.cache_footprint().forms(0);
    EXPECT_EQ(latent.cluster_tokens_tp(), latent.tokens_in_budget());
    EXPECT_EQ(latent.cluster_tokens_dp(), latent.tokens_in_budget() * np);
    if (mode == "dp") {
      // A cache per rank: the cluster holds six times the blocks.
      EXPECT_EQ(info.cache().total_blocks(), int64_t{kCacheBlocks} * kRanksDp);
      EXPECT_EQ(info.cache().rank_free_blocks_size(), kRanksDp);
    } else {
      EXPECT_EQ(info.cache().total_blocks(), kCacheBlocks);
    }
    auto serve = [&] {
      std::vector<Outcome> outcomes(kRequests);
      std::vector<std::thread> threads;
      for (int i = 0; i < kRequests; ++i) {
        threads.emplace_back([&, i] { outcomes[i] = client.Generate(requests[i], 120s); });
      }
      for (auto& t : threads) t.join();
      EXPECT_TRUE(client.WaitAllBlocksFree(5s));
      return outcomes;
    };
    runs.push_back(serve());
    // One more after the burst, sharing its prefix: admitted where that prefix is cached
    // (requests of one burst are admitted before any of their blocks is cached).
    runs.back().push_back(client.Generate(requests[0], 60s));
    // The load report shows the same cache.
    const nlohmann::json report = client.Report();
    ASSERT_TRUE(report.contains("cache")) << report.dump();
    EXPECT_EQ(report["cache"]["attention"], mode);
    EXPECT_EQ(report["cache"]["ranks"], np);
    EXPECT_EQ(report["cache"]["blocks_total"], info.cache().total_blocks());
    EXPECT_EQ(report["cache"]["forms"][0]["cluster_tokens_dp"].get<int64_t>(), latent.cluster_tokens_dp());
    if (mode == "dp") {
      // Live rebalancing moves experts under data-parallel attention too, and changes no answer.
      v1::RebalanceResponse response;
      ASSERT_TRUE(client.Rebalance({}, &response).ok());
      EXPECT_TRUE(response.applied()) << response.reason();
      const std::vector<Outcome> after = serve();
      for (int i = 0; i < kRequests; ++i) EXPECT_EQ(after[i].tokens, runs.back()[i].tokens) << "request " << i;
    }
    cluster_->Signal(SIGTERM);
    EXPECT_NE(cluster_->Wait(30s), -1);
    cluster_.reset();
    fs::remove(*dir_ / "ready.json");
  }
  int64_t cached = 0;
  for (int i = 0; i <= kRequests; ++i) {  // the burst and the one after it
    const Outcome& tp = runs[0][i];
    const Outcome& dp = runs[1][i];
    ASSERT_TRUE(tp.status.ok()) << i << ": " << tp.status.error_message();
    ASSERT_TRUE(dp.status.ok()) << i << ": " << dp.status.error_message();
    EXPECT_EQ(dp.tokens, tp.tokens) << "request " << i;
    ASSERT_EQ(dp.logprobs.size(), tp.logprobs.size());
    for (size_t t = 0; t < tp.logprobs.size(); ++t) EXPECT_NEAR(dp.logprobs[t], tp.logprobs[t], 1e-5) << i;
    cached += dp.last.usage().cached_tokens();
  }
  EXPECT_GT(cached, 0) << "no request found its prefix on its rank";
}

// `epic info` shows what MLA's latent cache saves, worked out here from config.json.
// cluster.sh --precision fast reaches every rank: info says what each runs (and that
// the cache holds BF16 rows), and a dp job
// (every rank holding what one process holds, quantized alike) serves what epic-run
// --precision fast prints in one process.
TEST_F(ServingTest, FastPrecisionReachesTheRanksAndServesWhatEpicRunDoes) {
  const int port = StartCluster(2, {}, kMaxWaiting, 20, {"--precision", "fast", "--attention", "dp"});
  ASSERT_GT(port, 0);
  Client client(port);
  const v1::ModelInfo info = client.Info();
  ASSERT_EQ(info.ranks_size(), 2);
  const std::string want = cpu::HasInt8Products() ? "fast" : "exact";
  for (const v1::RankInfo& r : info.ranks()) EXPECT_EQ(r.precision(), want) << "rank " << r.rank();
  EXPECT_EQ(info.cache_footprint().bytes_per_value(), want == "fast" ? 2 : 4);  // fast caches BF16 rows
  for (const std::vector<int32_t>& prompt : {std::vector<int32_t>{5, 17, 300, 41}, std::vector<int32_t>{9, 8, 7}}) {
    v1::GenerateRequest request = Request(prompt, 12);
    request.set_ignore_eos(true);
    const Outcome got = client.Generate(request);
    ASSERT_TRUE(got.status.ok()) << got.status.error_message();
    EXPECT_EQ(got.tokens, EpicRun(prompt, 12, true, "--precision fast"));
  }
}

TEST_F(ServingTest, InfoShowsTheCacheMlaSavesAgainstMhaGqaAndMqa) {
  const int port = StartCluster(2);
  ASSERT_GT(port, 0);
  Client client(port);
  const v1::ModelInfo info = client.Info();
  const nlohmann::json config = nlohmann::json::parse(ReadAll(*dir_ / "model" / "config.json"));
  const int64_t layers = config["num_hidden_layers"], heads = config["num_attention_heads"];
  const int64_t latent = config["kv_lora_rank"].get<int64_t>() + config["qk_rope_head_dim"].get<int64_t>();
  const int64_t head = config["qk_nope_head_dim"].get<int64_t>() + config["qk_rope_head_dim"].get<int64_t>() +
                       config["v_head_dim"].get<int64_t>();
  const int64_t budget_tokens = int64_t{kCacheBlocks} * kBlockSize;
  const v1::CacheFootprint& f = info.cache_footprint();
  EXPECT_EQ(f.bytes_per_value(), 4);  // F32 rows on CPU workers
  EXPECT_EQ(f.budget_bytes(), budget_tokens * layers * latent * 4);
  ASSERT_EQ(f.forms_size(), 4);
  const int64_t gqa = heads >= 16 ? 8 : std::max<int64_t>(1, heads / 2);
  const int64_t values[] = {latent, heads * head, gqa * head, head};
  for (int i = 0; i < 4; ++i) {
    SCOPED_TRACE(f.forms(i).attention());
    EXPECT_EQ(f.forms(i).values_per_token_per_layer(), values[i]);
    EXPECT_EQ(f.forms(i).bytes_per_token_per_layer(), values[i] * 4);
    EXPECT_EQ(f.forms(i).tokens_in_budget(), budget_tokens * latent / values[i]);
    EXPECT_NEAR(f.forms(i).fraction_of_mha(), static_cast<double>(values[i]) / (heads * head), 1e-12);
  }
  EXPECT_EQ(f.forms(0).attention(), "MLA latent");
  EXPECT_EQ(f.forms(0).tokens_in_budget(), budget_tokens);
}

// Skewed traffic: prompts that repeat a few tokens send most tokens to few experts.
std::vector<std::vector<int32_t>> SkewedPrompts() {
  std::vector<std::vector<int32_t>> prompts;
  for (int i = 0; i < 6; ++i) prompts.push_back({5, 5, 5, 17, 5, 5, static_cast<int32_t>(300 + i), 5, 5});
  return prompts;
}

// Serves PROMPTS concurrently (batched as a server sees traffic), N tokens each.
std::vector<std::vector<int32_t>> Serve(Client& client, const std::vector<std::vector<int32_t>>& prompts, int n) {
  std::vector<std::vector<int32_t>> out(prompts.size());
  std::vector<std::thread> threads;
  for (size_t i = 0; i < prompts.size(); ++i) {
    threads.emplace_back([&, i] {
      v1::GenerateRequest r = Request(prompts[i], static_cast<uint32_t>(n));
      r.set_ignore_eos(true);
      const Outcome o = client.Generate(r);
      EXPECT_TRUE(o.status.ok()) << o.status.error_message();
      out[i] = o.tokens;
    });
  }
  for (auto& t : threads) t.join();
  return out;
}

TEST_F(ServingTest, RebalancingSkewedTrafficKeepsOutputsAndLowersImbalance) {
  const int port = StartCluster(2, {"--redundant-slots", "2"});
  ASSERT_GT(port, 0);
  Client client(port);
  v1::RebalanceRequest dry;
  dry.set_dry_run(true);
  v1::RebalanceResponse response;
  EXPECT_EQ(client.Rebalance(dry, &response).error_code(), grpc::StatusCode::FAILED_PRECONDITION)
      << "a plan without statistics";

  const auto before = Serve(client, SkewedPrompts(), 30);
  const nlohmann::json report = client.Report();
  ASSERT_EQ(report.value("schema", ""), "epic.load_report/1") << report.dump();
  EXPECT_TRUE(report["window"]["measured"].get<bool>());
  EXPECT_GE(report["window"]["steps"].get<int64_t>(), 25);
  const double imbalance = report["overall"]["current"]["imbalance"].get<double>();
  EXPECT_GT(imbalance, 1.0);
  EXPECT_EQ(report["all_to_all"].size(), 2u);
  EXPECT_GT(report["all_to_all"][1]["dispatch_bytes_received"].get<double>(), 0);

  ASSERT_TRUE(client.Rebalance(dry, &response).ok());
  EXPECT_FALSE(response.applied());
  EXPECT_EQ(client.Info().placement(0).ranks(0).experts_size(), 80) << "a dry run moved experts";

  ASSERT_TRUE(client.Rebalance({}, &response).ok());
  EXPECT_TRUE(response.applied()) << response.reason();
  EXPECT_GT(response.experts_moved(), 0);
  EXPECT_GT(response.bytes_loaded(), 0);
  EXPECT_LT(response.imbalance_after(), response.imbalance_before());
  // The new placement is in use: 80 + 2 replica slots a rank.
  const v1::ModelInfo info = client.Info();
  EXPECT_EQ(info.placement(0).ranks(0).experts_size(), 82);

  // Placement is not math: the same outputs, and the same as one process.
  const auto after = Serve(client, SkewedPrompts(), 30);
  EXPECT_EQ(after, before);
  EXPECT_EQ(after[0], EpicRun(SkewedPrompts()[0], 30, /*ignore_eos=*/true));
  // Measured on the same traffic, the ranks are more even than before.
  const nlohmann::json again = client.Report();
  EXPECT_LT(again["overall"]["current"]["imbalance"].get<double>(), imbalance) << again["overall"].dump();
  ASSERT_EQ(again["rebalances"].size(), 1u);
  EXPECT_EQ(again["rebalances"][0]["experts_moved"].get<int64_t>(), response.experts_moved());
}

TEST_F(ServingTest, ServedExpertCountsMatchEpicRun) {
  const int port = StartCluster(3);
  ASSERT_GT(port, 0);
  Client client(port);
  const std::vector<int32_t> prompt = {7, 300, 12, 5, 99, 41};
  v1::GenerateRequest r = Request(prompt, 9);
  r.set_ignore_eos(true);
  ASSERT_TRUE(client.Generate(r).status.ok());
  const fs::path loads = *dir_ / "loads.json";
  ASSERT_EQ(std::system((std::string(EPIC_RUN_BINARY) + " --model " + (*dir_ / "model").string() +
                         " --tokens 7,300,12,5,99,41 --max-new-tokens 9 --ignore-eos --loads-out " + loads.string() +
                         " >/dev/null 2>&1").c_str()),
            0);
  const nlohmann::json want = nlohmann::json::parse(ReadAll(loads));
  const nlohmann::json got = client.Report();
  ASSERT_EQ(got["layers"].size(), want["loads"].size());
  for (size_t l = 0; l < want["loads"].size(); ++l) {
    EXPECT_EQ(got["layers"][l]["layer"], want["layers"][l]);
    EXPECT_EQ(got["layers"][l]["expert_tokens"].get<std::vector<double>>(),
              want["loads"][l].get<std::vector<double>>())
        << "layer " << want["layers"][l];
    // What the ranks ran adds up to what was routed.
    double routed = 0, ran = 0;
    for (double v : got["layers"][l]["expert_tokens"]) routed += v;
    for (double v : got["layers"][l]["current"]["rank_load"]) ran += v;
    EXPECT_EQ(ran, routed);
  }
  fs::remove(loads);
}

TEST_F(ServingTest, AutomaticRebalancingKicksInUnderSkew) {
  const int port = StartCluster(2, {"--rebalance-every", "15", "--rebalance-threshold", "1.0001",
                                    "--redundant-slots", "1"});
  ASSERT_GT(port, 0);
  Client client(port);
  const auto outputs = Serve(client, SkewedPrompts(), 40);
  // The check runs after a step completes, possibly just after the last tokens went out.
  nlohmann::json report = client.Report();
  for (int i = 0; i < 50 && report["rebalances"].empty(); ++i) {
    std::this_thread::sleep_for(100ms);
    report = client.Report();
  }
  ASSERT_GE(report["rebalances"].size(), 1u) << report["overall"].dump();
  EXPECT_EQ(client.Info().placement(0).ranks(0).experts_size(), 81);
  EXPECT_EQ(outputs, Serve(client, SkewedPrompts(), 40));
}

// A coordinator on its own (no worker job yet) for the checks that need no model.
class CoordinatorTest : public ServingTest {
 protected:
  int StartCoordinator(const std::vector<std::string>& extra) {
    std::ofstream(*dir_ / "secret") << "test-secret\n";
    std::vector<std::string> argv = {EPIC_COORDINATOR_BINARY, "--listen", "127.0.0.1:0", "--metrics-listen", "off",
                                     "--http-listen", "off",
                                     "--worker-secret-file", (*dir_ / "secret").string(), "--ready-file",
                                     (*dir_ / "ready.json").string()};
    argv.insert(argv.end(), extra.begin(), extra.end());
    coordinator_ = std::make_unique<Process>(argv, *dir_ / "coordinator.log");
    for (int i = 0; i < 100 && !fs::exists(*dir_ / "ready.json"); ++i) std::this_thread::sleep_for(50ms);
    return JsonPort(ReadAll(*dir_ / "ready.json"), "port");
  }
  std::unique_ptr<Process> Worker(int port, const std::string& secret) {
    std::ofstream(*dir_ / "worker-secret") << secret << "\n";
    return std::make_unique<Process>(
        std::vector<std::string>{EPIC_WORKER_BINARY, "--model", (*dir_ / "model").string(), "--coordinator",
                                 "127.0.0.1:" + std::to_string(port), "--secret-file",
                                 (*dir_ / "worker-secret").string(), "--threads", "1", "--connect-timeout", "10"},
        *dir_ / "worker.log");
  }
  std::unique_ptr<Process> coordinator_;
};

TEST_F(CoordinatorTest, BearerTokenGuardsTheApiButNotHealth) {
  std::ofstream(*dir_ / "token") << "open-sesame\n";
  const int port = StartCoordinator({"--auth-token-file", (*dir_ / "token").string()});
  ASSERT_GT(port, 0);
  Client client(port);
  EXPECT_EQ(client.Generate(Request({5}, 2)).status.error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(client.Generate(Request({5}, 2), 5s, 0, "wrong").status.error_code(), grpc::StatusCode::UNAUTHENTICATED);
  // With the token: past authentication, refused only for want of a worker job.
  const Outcome o = client.Generate(Request({5}, 2), 5s, 0, "open-sesame");
  EXPECT_EQ(o.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_NE(o.status.error_message().find("no worker job is attached"), std::string::npos);
  EXPECT_EQ(client.Health(), "NOT_SERVING");
  coordinator_->Signal(SIGTERM);
  EXPECT_EQ(coordinator_->Wait(10s), 0);
}

TEST_F(CoordinatorTest, ReflectionDescribesTheApi) {
  const int port = StartCoordinator({});
  ASSERT_GT(port, 0);
  auto channel = grpc::CreateChannel("127.0.0.1:" + std::to_string(port), grpc::InsecureChannelCredentials());
  auto stub = grpc::reflection::v1alpha::ServerReflection::NewStub(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + 10s);
  auto stream = stub->ServerReflectionInfo(&ctx);
  grpc::reflection::v1alpha::ServerReflectionRequest list;
  list.set_list_services("");
  ASSERT_TRUE(stream->Write(list));
  grpc::reflection::v1alpha::ServerReflectionResponse response;
  ASSERT_TRUE(stream->Read(&response));
  std::vector<std::string> names;
  for (const auto& s : response.list_services_response().service()) names.push_back(s.name());
  EXPECT_NE(std::find(names.begin(), names.end(), "epic.v1.Epic"), names.end());
  EXPECT_NE(std::find(names.begin(), names.end(), "grpc.health.v1.Health"), names.end());
  // A generic tool can fetch the API's definition by a symbol in it.
  grpc::reflection::v1alpha::ServerReflectionRequest symbol;
  symbol.set_file_containing_symbol("epic.v1.GenerateRequest");
  ASSERT_TRUE(stream->Write(symbol));
  ASSERT_TRUE(stream->Read(&response));
  ASSERT_GT(response.file_descriptor_response().file_descriptor_proto_size(), 0);
  EXPECT_NE(response.file_descriptor_response().file_descriptor_proto(0).find("epic.proto"), std::string::npos);
  stream->WritesDone();
}

TEST_F(CoordinatorTest, AWorkerWithTheWrongSecretIsRefused) {
  const int port = StartCoordinator({});
  ASSERT_GT(port, 0);
  auto worker = Worker(port, "not-the-secret");
  const int status = worker->Wait(60s);
  ASSERT_NE(status, -1) << "the refused worker did not exit";
  EXPECT_NE(status, 0);
  // Exit code 4: a refusal a relaunch cannot fix (launch/cluster.sh stops there).
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 4) << "status " << status;
  EXPECT_NE(ReadAll(*dir_ / "worker.log").find("wrong worker secret"), std::string::npos);
  EXPECT_EQ(Client(port).Health(), "NOT_SERVING");
}

TEST_F(CoordinatorTest, SigtermDrainsRunningRequestsAndRefusesNewOnes) {
  const int port = StartCoordinator({"--drain-timeout", "60"});
  ASSERT_GT(port, 0);
  auto worker = Worker(port, "test-secret");
  Client client(port);
  for (int i = 0; i < 300 && client.Health() != "SERVING"; ++i) std::this_thread::sleep_for(100ms);
  ASSERT_EQ(client.Health(), "SERVING");
  v1::GenerateRequest long_request = Request({5, 17, 300}, 1500);
  long_request.set_ignore_eos(true);
  Outcome outcome;
  std::thread caller([&] { outcome = client.Generate(long_request); });
  for (int i = 0; i < 200 && client.Info().steps() < 3; ++i) std::this_thread::sleep_for(10ms);
  coordinator_->Signal(SIGTERM);
  std::this_thread::sleep_for(100ms);
  const Outcome refused = client.Generate(Request({5}, 2));
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  caller.join();
  EXPECT_TRUE(outcome.status.ok()) << outcome.status.error_message();
  EXPECT_EQ(outcome.tokens.size(), 1500u) << "the running request was not allowed to finish";
  EXPECT_EQ(coordinator_->Wait(20s), 0);
  // The worker job leaves when its coordinator does, told so: in order, exit code 0 (a
  // nonzero one makes mpirun abort the job).
  const int status = worker->Wait(30s);
  ASSERT_NE(status, -1) << "the worker job did not leave with its coordinator";
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "status " << status;
  EXPECT_NE(ReadAll(*dir_ / "worker.log").find("the coordinator stopped"), std::string::npos);
}

TEST_F(CoordinatorTest, AJobWhoseCoordinatorDiesExitsForItsLauncherToRelaunch) {
  const int port = StartCoordinator({});
  ASSERT_GT(port, 0);
  auto worker = Worker(port, "test-secret");
  Client client(port);
  for (int i = 0; i < 300 && client.Health() != "SERVING"; ++i) std::this_thread::sleep_for(100ms);
  ASSERT_EQ(client.Health(), "SERVING");
  coordinator_->Signal(SIGKILL);
  coordinator_->Wait(10s);
  // No word from the coordinator, only a broken link: exit code 3, which launch/cluster.sh
  // answers by starting the job again.
  const int status = worker->Wait(30s);
  ASSERT_NE(status, -1) << "the worker job outlived its coordinator";
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 3) << "status " << status;
  EXPECT_NE(ReadAll(*dir_ / "worker.log").find("closed the link"), std::string::npos);
}

TEST_F(CoordinatorTest, AJobThatStopsCompletingStepsIsDeclaredDead) {
  // No job follows this one: the request ends at once instead of waiting to resume.
  const int port = StartCoordinator({"--step-timeout", "2", "--resume-timeout", "0"});
  ASSERT_GT(port, 0);
  auto worker = Worker(port, "test-secret");
  Client client(port);
  for (int i = 0; i < 300 && client.Health() != "SERVING"; ++i) std::this_thread::sleep_for(100ms);
  ASSERT_EQ(client.Health(), "SERVING");
  v1::GenerateRequest long_request = Request({5, 17, 300}, 3000);
  long_request.set_ignore_eos(true);
  Outcome outcome;
  std::thread caller([&] { outcome = client.Generate(long_request); });
  for (int i = 0; i < 200 && client.Info().steps() < 3; ++i) std::this_thread::sleep_for(10ms);
  // A live process that makes no progress, as a rank stuck in a collective would be.
  worker->Signal(SIGSTOP);
  const auto stopped = std::chrono::steady_clock::now();
  caller.join();
  const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - stopped).count();
  EXPECT_EQ(outcome.status.error_code(), grpc::StatusCode::UNAVAILABLE) << outcome.status.error_message();
  EXPECT_NE(outcome.status.error_message().find("stuck"), std::string::npos) << outcome.status.error_message();
  EXPECT_GT(waited, 1.5);
  EXPECT_LT(waited, 10.0);
  EXPECT_EQ(client.Health(), "NOT_SERVING");
  EXPECT_TRUE(client.WaitAllBlocksFree(2s));
  worker->Signal(SIGKILL);
}

TEST_F(CoordinatorTest, ServesTlsWhenGivenACertificate) {
  const fs::path key = *dir_ / "key.pem", cert = *dir_ / "cert.pem";
  const std::string openssl = "openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=localhost "
                              "-addext subjectAltName=DNS:localhost,IP:127.0.0.1 -keyout " +
                              key.string() + " -out " + cert.string() + " >/dev/null 2>&1";
  ASSERT_EQ(std::system(openssl.c_str()), 0) << "openssl could not make a test certificate";
  const int port = StartCoordinator({"--tls-cert", cert.string(), "--tls-key", key.string()});
  ASSERT_GT(port, 0);
  const std::string epic = std::string(EPIC_BINARY) + " health --server 127.0.0.1:" + std::to_string(port);
  // Over TLS the server answers (NOT_SERVING: no worker job yet); in plaintext it does not.
  EXPECT_EQ(Capture(epic + " --tls-ca " + cert.string() + " 2>&1"), "NOT_SERVING\n");
  EXPECT_NE(Capture(epic + " 2>&1").find("UNAVAILABLE"), std::string::npos);
}

}  // namespace
}  // namespace epic
