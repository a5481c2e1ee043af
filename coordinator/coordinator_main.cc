// epic-coordinator: the front of an epic cluster. Takes gRPC generation calls, batches
// them into steps for the attached worker job, owns the latent-cache budget and
// serves Prometheus metrics. Runs outside the mpirun job and outlives it.
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>

#include <CLI/CLI.hpp>

#include "common/text_file.h"
#include "coordinator/metrics.h"
#include "coordinator/server.h"

int main(int argc, char** argv) {
  CLI::App app{"epic-coordinator: serves the epic.v1.Epic gRPC API (plus grpc.health.v1 and reflection),\n"
               "batches requests into steps for a worker job (`mpirun ... epic-worker --coordinator\n"
               "HOST:PORT`), owns the latent-cache budget and serves Prometheus metrics.\n"
               "SIGTERM or Ctrl-C drains: no new requests, running ones finish (up to --drain-timeout)."};
  epic::coordinator::ServerOptions options;
  std::string metrics_listen = "0.0.0.0:9400";
  std::string secret_file, auth_token_file, tls_cert, tls_key, ready_file;
  double step_timeout = 60, drain_timeout = 30, hello_timeout = 10, resume_timeout = 30;
  auto& s = options.scheduler;
  app.add_option("--listen", options.listen, "gRPC address HOST:PORT (port 0: pick a free one)")
      ->capture_default_str();
  app.add_option("--metrics-listen", metrics_listen,
                 "HOST:PORT for Prometheus /metrics (port 0: pick a free one; 'off': none)")
      ->capture_default_str();
  app.add_option("--worker-secret-file", secret_file,
                 "file holding the secret worker jobs must present (default: $EPIC_WORKER_SECRET)");
  app.add_option("--auth-token-file", auth_token_file,
                 "file holding a bearer token clients must send (health stays open); default: none");
  app.add_option("--tls-cert", tls_cert, "PEM certificate chain: serve TLS (with --tls-key)");
  app.add_option("--tls-key", tls_key, "PEM private key of --tls-cert");
  std::string tokenizer_dir;
  std::string http_listen = "0.0.0.0:8000";
  app.add_option("--tokenizer", tokenizer_dir,
                 "checkpoint directory (or one holding tokenizer.json + tokenizer_config.json): text prompts, "
                 "chats and text deltas; without it the coordinator takes token ids only");
  app.add_option("--http-listen", http_listen,
                 "HOST:PORT of the OpenAI-compatible HTTP API (port 0: pick a free one; 'off': none)")
      ->capture_default_str();
  app.add_option("--http-threads", options.http_threads,
                 "HTTP connections served at once (each streaming request holds one)")
      ->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--served-model-name", options.model_name,
                 "the model's name in the HTTP API (/v1/models; requests naming another get 404); "
                 "default: the --tokenizer directory's name, else 'epic'");
  app.add_option("--block-size", s.block_size, "tokens per latent-cache block")
      ->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--cache-blocks", s.num_blocks,
                 "latent-cache blocks of each worker rank: the budget requests are admitted against (a job "
                 "with --attention tp holds the same blocks on every rank; with dp each rank holds its own "
                 "sequences' blocks, so the cluster holds ranks times as many)")
      ->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--max-waiting", s.max_waiting, "queued requests beyond which calls get RESOURCE_EXHAUSTED")
      ->check(CLI::NonNegativeNumber)->capture_default_str();
  app.add_option("--max-running", s.max_running, "most sequences in one step (per rank under --attention dp)")
      ->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--max-step-tokens", s.max_step_tokens,
                 "token budget of one step: decodes first, then prefill chunks of long prompts (per rank "
                 "under --attention dp); a worker job runs one step of this size before serving")
      ->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--step-timeout", step_timeout,
                 "seconds without a completed step after which the worker job is declared dead")
      ->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--resume-timeout", resume_timeout,
                 "seconds requests wait for a new worker job when theirs dies; the next job prefills what "
                 "each has so far and its stream goes on unchanged (0: they end UNAVAILABLE at once)")
      ->check(CLI::NonNegativeNumber)->capture_default_str();
  std::string prefix_cache = "on";
  app.add_option("--prefix-cache", prefix_cache,
                 "on: full latent-cache blocks stay cached after their requests end (least recently used "
                 "out first), and a request whose prompt begins with cached blocks shares them and "
                 "prefills only the rest; off: every request prefills its whole prompt")
      ->check(CLI::IsMember({"on", "off"}))->capture_default_str();
  app.add_option("--hello-timeout", hello_timeout,
                 "seconds a worker link may take to present its hello before it is closed")
      ->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--drain-timeout", drain_timeout, "seconds running requests get to finish on SIGTERM")
      ->check(CLI::NonNegativeNumber)->capture_default_str();
  app.add_option("--stats-window", options.stats.window_steps,
                 "steps of expert statistics the load reports and rebalancing look at")
      ->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--stats-ema-alpha", options.stats.ema_alpha,
                 "weight of the newest step in the moving average of expert loads, in (0, 1]")
      ->check(CLI::Range(1e-6, 1.0))->capture_default_str();
  app.add_option("--redundant-slots", options.redundant_slots_per_rank,
                 "replica slots per rank in planned placements (reports, rebalancing): hot experts get copies")
      ->check(CLI::NonNegativeNumber)->capture_default_str();
  app.add_option("--rebalance-every", options.rebalance_every,
                 "automatic rebalancing: look every this many steps (0: only on `epic rebalance`)")
      ->check(CLI::NonNegativeNumber)->capture_default_str();
  app.add_option("--rebalance-threshold", options.rebalance_threshold,
                 "automatic rebalancing applies a plan only when the window's imbalance (max/mean rank "
                 "load) is above this")
      ->check(CLI::Range(1.0, 1e9))->capture_default_str();
  app.add_option("--ready-file", ready_file,
                 "write {\"port\": P, \"metrics_port\": M} here once serving (for scripts)");
  CLI11_PARSE(app, argc, argv);

  auto fail = [](const std::string& message) {
    std::fprintf(stderr, "epic-coordinator: %s\n", message.c_str());
    return 2;
  };
  if (!secret_file.empty()) {
    auto secret = epic::ReadSecretFile(secret_file);
    if (!secret.ok()) return fail("--worker-secret-file " + secret.status().message());
    options.worker_secret = std::move(secret).value();
  } else if (const char* env = std::getenv("EPIC_WORKER_SECRET")) {
    options.worker_secret = env;
  }
  if (options.worker_secret.empty()) {
    return fail("no worker secret: pass --worker-secret-file FILE or set EPIC_WORKER_SECRET");
  }
  if (!auth_token_file.empty()) {
    auto token = epic::ReadSecretFile(auth_token_file);
    if (!token.ok()) return fail("--auth-token-file " + token.status().message());
    options.auth_token = std::move(token).value();
    if (options.auth_token.empty()) return fail("--auth-token-file " + auth_token_file + " is empty");
  }
  if (tls_cert.empty() != tls_key.empty()) return fail("--tls-cert and --tls-key go together");
  if (!tls_cert.empty()) {
    auto cert = epic::ReadTextFile(tls_cert);
    if (!cert.ok()) return fail("--tls-cert " + cert.status().message());
    auto key = epic::ReadTextFile(tls_key);
    if (!key.ok()) return fail("--tls-key " + key.status().message());
    options.tls_cert_pem = std::move(cert).value();
    options.tls_key_pem = std::move(key).value();
  }
  options.step_timeout = std::chrono::milliseconds(static_cast<int64_t>(step_timeout * 1000));
  options.hello_timeout = std::chrono::milliseconds(static_cast<int64_t>(hello_timeout * 1000));
  s.resume_timeout = std::chrono::milliseconds(static_cast<int64_t>(resume_timeout * 1000));
  s.prefix_cache = prefix_cache == "on";
  if (!tokenizer_dir.empty()) {
    auto text = epic::coordinator::TextCodec::Load(tokenizer_dir);
    if (!text.ok()) return fail("--tokenizer " + text.status().message());
    options.text = std::move(text).value();
    if (options.model_name == "epic") {
      std::string name = tokenizer_dir;
      while (name.size() > 1 && name.back() == '/') name.pop_back();
      options.model_name = name.substr(name.rfind('/') == std::string::npos ? 0 : name.rfind('/') + 1);
    }
  }
  if (http_listen != "off") options.http_listen = http_listen;

  // Signals are taken by sigwait below, never by a handler in a random thread.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGINT);
  sigaddset(&stop_signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);
  std::signal(SIGPIPE, SIG_IGN);

  std::unique_ptr<epic::coordinator::Metrics> metrics;
  if (metrics_listen != "off") {
    auto m = epic::coordinator::Metrics::Start(metrics_listen);
    if (!m.ok()) return fail(m.status().message());
    metrics = std::move(m).value();
  }
  auto server = epic::coordinator::Server::Start(options, metrics.get());
  if (!server.ok()) return fail(server.status().message());
  const int port = (*server)->port();
  const int metrics_port = metrics ? metrics->port() : 0;
  const int http_port = (*server)->http_port();
  std::fprintf(stderr, "epic-coordinator: serving gRPC on port %d%s; OpenAI HTTP %s; metrics %s; text %s; waiting for a worker job\n",
               port, options.tls_cert_pem.empty() ? "" : " (TLS)",
               http_port ? ("on port " + std::to_string(http_port)).c_str() : "off",
               metrics ? ("on http port " + std::to_string(metrics_port) + " /metrics").c_str() : "off",
               options.text ? ("from " + tokenizer_dir).c_str() : "off (ids only; --tokenizer DIR)");
  if (!ready_file.empty()) {
    const std::string tmp = ready_file + ".tmp";
    std::ofstream(tmp) << "{\"port\": " << port << ", \"metrics_port\": " << metrics_port
                       << ", \"http_port\": " << http_port << "}\n";
    std::rename(tmp.c_str(), ready_file.c_str());
  }

  int signal = 0;
  sigwait(&stop_signals, &signal);
  std::fprintf(stderr, "epic-coordinator: %s: draining (up to %.0f s)\n", signal == SIGTERM ? "SIGTERM" : "SIGINT",
               drain_timeout);
  (*server)->Shutdown(std::chrono::milliseconds(static_cast<int64_t>(drain_timeout * 1000)));
  std::fprintf(stderr, "epic-coordinator: stopped\n");
  return 0;
}
