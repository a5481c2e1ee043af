// The coordinator's Prometheus metrics, served over HTTP at /metrics. Names follow
// what vLLM and SGLang users already chart, with the epic: prefix.
#pragma once

#include <memory>
#include <mutex>
#include <string>

#include "common/status.h"
#include "coordinator/scheduler.h"

namespace epic::coordinator {

class Metrics final : public SchedulerObserver {
 public:
  // Serves /metrics on LISTEN ("HOST:PORT"; port 0 picks a free one).
  static StatusOr<std::unique_ptr<Metrics>> Start(const std::string& listen);
  ~Metrics() override;

  int port() const;

  void FirstToken(double seconds) override;
  void InterToken(double seconds) override;
  void Finished(double e2e_seconds, int64_t prompt, int64_t completion, const std::string& outcome) override;
  void Load(int64_t running, int64_t waiting, double cache_usage) override;
  void PrefixCache(int64_t queried, int64_t hits, int64_t evictions) override;
  void WorkerAttached(bool attached);
  void StepCompleted(double seconds, int64_t tokens);
  // An HTTP API call answered with CODE on ROUTE (unknown routes count as "other").
  void HttpRequest(const std::string& route, int code);
  // Time spent turning a request's text (prompt or rendered chat) into ids.
  void Tokenized(double seconds);

 private:
  struct Impl;
  explicit Metrics(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace epic::coordinator
