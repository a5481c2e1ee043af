// The OpenAI-compatible HTTP API the coordinator serves beside gRPC (cpp-httplib):
// GET /v1/models, POST /v1/completions, POST /v1/chat/completions (streams as server-sent
// events ending in `data: [DONE]`), POST /tokenize and /detokenize as vLLM has them, and
// GET /health. Errors take OpenAI's JSON shape: 400 a bad field (named), 401, 404 an
// unknown model or route, 429 a full queue, 503 no worker job or draining. A client that
// disconnects mid-stream cancels its request, which frees its cache blocks.
#pragma once

#include <functional>
#include <memory>
#include <optional>
#include <string>

#include "common/status.h"
#include "coordinator/generation.h"
#include "coordinator/metrics.h"
#include "coordinator/scheduler.h"

namespace epic::coordinator {

struct HttpOptions {
  std::string listen = "0.0.0.0:8000";  // HOST:PORT; port 0 picks a free one
  int threads = 64;                     // connections served at once (a stream holds one)
  std::string auth_token;               // "Authorization: Bearer <it>" required; empty: open
  std::string model_name;               // what /v1/models lists and requests may name
};

// What the HTTP API serves from; everything outlives the server.
struct HttpBackend {
  Scheduler* scheduler = nullptr;
  std::shared_ptr<const TextCodec> text;  // null: token ids only
  Metrics* metrics = nullptr;             // optional
  // The attached worker job's model, or nullopt while none is attached.
  std::function<std::optional<v1::ModelSummary>()> model;
};

class HttpServer {
 public:
  static StatusOr<std::unique_ptr<HttpServer>> Start(const HttpOptions& options, HttpBackend backend);
  ~HttpServer();  // stops serving; streams in flight are cut

  int port() const;
  void Stop();

  struct Impl;

 private:
  explicit HttpServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace epic::coordinator
