#include "coordinator/metrics.h"

#include <algorithm>

#include <chrono>
#include <deque>

#include <prometheus/counter.h>
#include <prometheus/exposer.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

namespace epic::coordinator {

namespace pm = prometheus;

struct Metrics::Impl {
  std::unique_ptr<pm::Exposer> exposer;
  std::shared_ptr<pm::Registry> registry = std::make_shared<pm::Registry>();

  pm::Family<pm::Histogram>& ttft_family = pm::BuildHistogram()
      .Name("epic:time_to_first_token_seconds").Help("Time from arrival to the first generated token")
      .Register(*registry);
  pm::Family<pm::Histogram>& itl_family = pm::BuildHistogram()
      .Name("epic:inter_token_latency_seconds").Help("Time between two generated tokens of a request")
      .Register(*registry);
  pm::Family<pm::Histogram>& e2e_family = pm::BuildHistogram()
      .Name("epic:e2e_request_latency_seconds").Help("Time from arrival to the end of a request")
      .Register(*registry);
  pm::Family<pm::Histogram>& step_family = pm::BuildHistogram()
      .Name("epic:step_duration_seconds").Help("Time the worker job took for one step")
      .Register(*registry);
  pm::Family<pm::Gauge>& running_family = pm::BuildGauge().Name("epic:num_requests_running")
      .Help("Requests in the running batch").Register(*registry);
  pm::Family<pm::Gauge>& waiting_family = pm::BuildGauge().Name("epic:num_requests_waiting")
      .Help("Requests queued for admission").Register(*registry);
  pm::Family<pm::Gauge>& cache_family = pm::BuildGauge().Name("epic:cache_usage_perc")
      .Help("Fraction of latent-cache blocks held by requests (0 to 1)").Register(*registry);
  pm::Family<pm::Gauge>& throughput_family = pm::BuildGauge().Name("epic:avg_generation_throughput_toks_per_s")
      .Help("Generated tokens per second over the last 10 seconds").Register(*registry);
  pm::Family<pm::Gauge>& attached_family = pm::BuildGauge().Name("epic:worker_attached")
      .Help("1 while a worker job is attached and making progress").Register(*registry);
  pm::Family<pm::Counter>& generation_family = pm::BuildCounter().Name("epic:generation_tokens_total")
      .Help("Generated tokens").Register(*registry);
  pm::Family<pm::Counter>& prompt_family = pm::BuildCounter().Name("epic:prompt_tokens_total")
      .Help("Prompt tokens of finished requests").Register(*registry);
  pm::Family<pm::Counter>& requests_family = pm::BuildCounter().Name("epic:request_finished_total")
      .Help("Requests ended, by outcome (stop, length, cancelled, unavailable)").Register(*registry);
  pm::Family<pm::Counter>& http_family = pm::BuildCounter().Name("epic:http_requests_total")
      .Help("HTTP API calls, by route and status code").Register(*registry);
  pm::Family<pm::Histogram>& tokenize_family = pm::BuildHistogram()
      .Name("epic:tokenization_seconds").Help("Time to tokenize a request's prompt or chat")
      .Register(*registry);
  pm::Family<pm::Counter>& steps_family = pm::BuildCounter().Name("epic:steps_total")
      .Help("Steps completed by the worker job").Register(*registry);
  pm::Family<pm::Counter>& prefix_queries_family = pm::BuildCounter().Name("epic:prefix_cache_queries_total")
      .Help("Prompt tokens looked up in the prefix cache").Register(*registry);
  pm::Family<pm::Counter>& prefix_hits_family = pm::BuildCounter().Name("epic:prefix_cache_hits_total")
      .Help("Prompt tokens found in the prefix cache (their prefill skipped)").Register(*registry);
  pm::Family<pm::Counter>& prefix_evictions_family = pm::BuildCounter().Name("epic:prefix_cache_evictions_total")
      .Help("Cached blocks evicted to make room").Register(*registry);

  static pm::Histogram::BucketBoundaries Latency() {
    return {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120};
  }
  pm::Histogram& ttft = ttft_family.Add({}, Latency());
  pm::Histogram& itl = itl_family.Add({}, Latency());
  pm::Histogram& e2e = e2e_family.Add({}, Latency());
  pm::Histogram& step = step_family.Add({}, Latency());
  pm::Histogram& tokenize = tokenize_family.Add(
      {}, pm::Histogram::BucketBoundaries{1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1});
  pm::Gauge& running = running_family.Add({});
  pm::Gauge& waiting = waiting_family.Add({});
  pm::Gauge& cache = cache_family.Add({});
  pm::Gauge& throughput = throughput_family.Add({});
  pm::Gauge& attached = attached_family.Add({});
  pm::Counter& generated = generation_family.Add({});
  pm::Counter& prompt = prompt_family.Add({});
  pm::Counter& steps = steps_family.Add({});
  pm::Counter& prefix_queries = prefix_queries_family.Add({});
  pm::Counter& prefix_hits = prefix_hits_family.Add({});
  pm::Counter& prefix_evictions = prefix_evictions_family.Add({});
  int64_t prefix_totals[3] = {0, 0, 0};  // what the counters hold, to add the difference

  std::mutex mu;
  std::deque<std::pair<std::chrono::steady_clock::time_point, int64_t>> recent;  // (when, tokens)
  void Generated(int64_t tokens) {
    generated.Increment(static_cast<double>(tokens));
    const auto now = std::chrono::steady_clock::now();
    std::lock_guard<std::mutex> lock(mu);
    recent.emplace_back(now, tokens);
    const auto window = std::chrono::seconds(10);
    while (!recent.empty() && now - recent.front().first > window) recent.pop_front();
    int64_t sum = 0;
    for (const auto& r : recent) sum += r.second;
    throughput.Set(static_cast<double>(sum) / 10.0);
  }
};

Metrics::Metrics(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Metrics::~Metrics() = default;

StatusOr<std::unique_ptr<Metrics>> Metrics::Start(const std::string& listen) {
  auto impl = std::make_unique<Impl>();
  try {
    impl->exposer = std::make_unique<pm::Exposer>(listen);
  } catch (const std::exception& e) {
    return UnavailableError("--metrics-listen " + listen + ": cannot serve metrics there (" + e.what() + ")");
  }
  impl->exposer->RegisterCollectable(impl->registry);
  return std::unique_ptr<Metrics>(new Metrics(std::move(impl)));
}

int Metrics::port() const {
  const auto ports = impl_->exposer->GetListeningPorts();
  return ports.empty() ? 0 : ports.front();
}

void Metrics::PrefixCache(int64_t queried, int64_t hits, int64_t evictions) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  int64_t* last = impl_->prefix_totals;
  pm::Counter* counters[3] = {&impl_->prefix_queries, &impl_->prefix_hits, &impl_->prefix_evictions};
  const int64_t now[3] = {queried, hits, evictions};
  for (int i = 0; i < 3; ++i) {
    if (now[i] > last[i]) counters[i]->Increment(static_cast<double>(now[i] - last[i]));
    last[i] = std::max(last[i], now[i]);
  }
}

void Metrics::FirstToken(double seconds) {
  impl_->ttft.Observe(seconds);
  impl_->Generated(1);
}

void Metrics::InterToken(double seconds) {
  impl_->itl.Observe(seconds);
  impl_->Generated(1);
}

void Metrics::Finished(double e2e_seconds, int64_t prompt, int64_t, const std::string& outcome) {
  impl_->e2e.Observe(e2e_seconds);
  impl_->prompt.Increment(static_cast<double>(prompt));
  impl_->requests_family.Add({{"outcome", outcome}}).Increment();
}

void Metrics::Load(int64_t running, int64_t waiting, double cache_usage) {
  impl_->running.Set(static_cast<double>(running));
  impl_->waiting.Set(static_cast<double>(waiting));
  impl_->cache.Set(cache_usage);
}

void Metrics::HttpRequest(const std::string& route, int code) {
  impl_->http_family.Add({{"route", route}, {"code", std::to_string(code)}}).Increment();
}

void Metrics::Tokenized(double seconds) { impl_->tokenize.Observe(seconds); }

void Metrics::WorkerAttached(bool attached) { impl_->attached.Set(attached ? 1.0 : 0.0); }

void Metrics::StepCompleted(double seconds, int64_t) {
  impl_->step.Observe(seconds);
  impl_->steps.Increment();
}

}  // namespace epic::coordinator
