// The coordinator's gRPC server: the client API (epic.v1.Epic), the worker link, the
// standard health service and reflection. It outlives worker jobs: when one leaves,
// requests in flight end UNAVAILABLE and the next job to attach takes over.
#pragma once

#include <chrono>
#include <memory>
#include <string>

#include "common/status.h"
#include "coordinator/generation.h"
#include "coordinator/load_stats.h"
#include "coordinator/metrics.h"
#include "coordinator/scheduler.h"

namespace epic::coordinator {

struct ServerOptions {
  std::string listen = "0.0.0.0:50051";  // HOST:PORT; port 0 picks a free one
  std::string worker_secret;              // a worker job must present it to attach
  std::string auth_token;                 // clients must send "authorization: Bearer <it>"; empty: open
  std::string tls_cert_pem, tls_key_pem;  // both set: TLS; else plaintext
  // The checkpoint's tokenizer and chat template: text prompts, chats and text deltas.
  // Null: token ids only.
  std::shared_ptr<const TextCodec> text;
  // The OpenAI-compatible HTTP API: HOST:PORT (port 0 picks a free one), or empty for none.
  std::string http_listen;
  int http_threads = 64;  // connections served at once (each stream holds one)
  std::string model_name = "epic";  // the model's name in the HTTP API
  // A worker link that sends no hello in this long is closed.
  std::chrono::milliseconds hello_timeout{std::chrono::seconds(10)};
  // A worker job that completes no step in this long is declared dead.
  std::chrono::milliseconds step_timeout{std::chrono::seconds(60)};
  SchedulerOptions scheduler;
  LoadStatsOptions stats;
  // Replica slots per rank in planned placements (reports, `epic rebalance` by default,
  // automatic rebalancing).
  int redundant_slots_per_rank = 0;
  // Automatic rebalancing: every this many steps (0: never), apply the plan when the
  // window's imbalance is above the threshold and the plan predicts less.
  int64_t rebalance_every = 0;
  double rebalance_threshold = 1.1;
};

class Server {
 public:
  // Starts serving. METRICS (optional) receives the serving metrics; it must outlive the server.
  static StatusOr<std::unique_ptr<Server>> Start(const ServerOptions& options, Metrics* metrics);
  ~Server();

  int port() const;
  int http_port() const;  // 0 without HTTP
  // Graceful stop: refuse new requests, let running ones finish for up to DRAIN,
  // end the rest UNAVAILABLE, close the worker link and stop serving.
  void Shutdown(std::chrono::milliseconds drain);

  struct Impl;

 private:
  explicit Server(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace epic::coordinator
