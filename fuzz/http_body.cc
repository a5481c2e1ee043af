// A body for the OpenAI-compatible HTTP API from the input, POSTed to a real HttpServer on
// 127.0.0.1 (started once, serving the job of fuzz_job.h with a fabricated worker behind
// it). The first byte picks the route: /v1/completions, /v1/chat/completions, /tokenize
// or /detokenize; the rest is the body. Whatever the body, the answer is 200, or 400 or
// 404 in OpenAI's error shape: a 500 (an exception that escaped a handler), a lost
// connection or a body that is not JSON is a bug.
#include <httplib.h>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <string>
#include <thread>

#include <nlohmann/json.hpp>

#include "coordinator/http_server.h"
#include "coordinator/scheduler.h"
#include "fuzz/fuzz_job.h"

namespace coord = epic::coordinator;

namespace {

// The server, its scheduler and the worker that answers its steps: made once, and never
// destroyed (the process exits with them running).
struct Service {
  coord::Scheduler scheduler{epic::fuzz::JobSchedulerOptions()};
  std::unique_ptr<coord::HttpServer> server;
  std::thread worker;
  std::unique_ptr<httplib::Client> client;

  Service() {
    scheduler.Attach(epic::fuzz::JobHello().model());
    coord::HttpOptions options;
    options.listen = "127.0.0.1:0";
    options.threads = 4;
    options.model_name = "epic-fuzz";
    coord::HttpBackend backend;
    backend.scheduler = &scheduler;
    backend.text = epic::fuzz::JobText();
    backend.model = [] { return std::optional<epic::v1::ModelSummary>(epic::fuzz::JobHello().model()); };
    auto started = coord::HttpServer::Start(options, std::move(backend));
    EPIC_FUZZ_CHECK(started.ok());
    server = std::move(started).value();
    worker = std::thread([this] {
      const coord::SchedulerOptions options = epic::fuzz::JobSchedulerOptions();
      for (uint32_t salt = 1;; ++salt) {
        epic::v1::internal::Step step;
        if (!scheduler.NextStep(&step)) {
          scheduler.WaitForWork(std::chrono::milliseconds(20));
          continue;
        }
        epic::fuzz::CheckStep(step, options);
        EPIC_FUZZ_CHECK(scheduler.Complete(epic::fuzz::AnswerStep(step, salt)).ok());
      }
    });
    worker.detach();
    client = std::make_unique<httplib::Client>("127.0.0.1", server->port());
    client->set_keep_alive(false);  // httplib polls a kept-alive socket every 10 ms
    client->set_tcp_nodelay(true);  // no 40 ms wait on the ACK of the headers before the body
    client->set_read_timeout(10, 0);
  }
};

Service& TheService() {
  static Service* service = new Service();
  return *service;
}

constexpr const char* kRoutes[] = {"/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  Service& s = TheService();
  const char* route = kRoutes[data[0] % 4];
  const std::string body(reinterpret_cast<const char*>(data + 1), size - 1);
  httplib::Result res = s.client->Post(route, body, "application/json");
  if (!res) {
    std::fprintf(stderr, "POST %s: no answer (%s)\n", route, httplib::to_string(res.error()).c_str());
    EPIC_FUZZ_CHECK(res);
  }
  if (res->status != 200 && res->status != 400 && res->status != 404) {
    std::fprintf(stderr, "POST %s: HTTP %d: %s\n", route, res->status, res->body.c_str());
    EPIC_FUZZ_CHECK(false);
  }
  if (res->get_header_value("Content-Type") == "application/json") {
    const nlohmann::json answer = nlohmann::json::parse(res->body, nullptr, false);
    EPIC_FUZZ_CHECK(!answer.is_discarded() && answer.is_object());
    EPIC_FUZZ_CHECK((res->status == 200) == !answer.contains("error"));
  } else {
    // A stream: server-sent events of JSON, ending in [DONE].
    EPIC_FUZZ_CHECK(res->status == 200);
    size_t at = 0;
    bool done = false;
    while (at < res->body.size()) {
      const size_t end = res->body.find("\n\n", at);
      EPIC_FUZZ_CHECK(end != std::string::npos && res->body.compare(at, 6, "data: ") == 0);
      const std::string event = res->body.substr(at + 6, end - at - 6);
      done = event == "[DONE]";
      if (!done) EPIC_FUZZ_CHECK(!nlohmann::json::parse(event, nullptr, false).is_discarded());
      at = end + 2;
    }
    EPIC_FUZZ_CHECK(done);
  }
  return 0;
}
