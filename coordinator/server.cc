#include "coordinator/server.h"

#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <future>
#include <mutex>
#include <optional>
#include <thread>

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>

#include "coordinator/http_server.h"
#include "epic.grpc.pb.h"
#include "worker_link.grpc.pb.h"

namespace epic::coordinator {

namespace {

grpc::Status ToGrpc(const Status& s) {
  if (s.ok()) return grpc::Status::OK;
  grpc::StatusCode code = grpc::StatusCode::INTERNAL;
  switch (s.code()) {
    case StatusCode::kOk: code = grpc::StatusCode::OK; break;
    case StatusCode::kInvalidArgument: code = grpc::StatusCode::INVALID_ARGUMENT; break;
    case StatusCode::kNotFound: code = grpc::StatusCode::NOT_FOUND; break;
    case StatusCode::kDataLoss: code = grpc::StatusCode::DATA_LOSS; break;
    case StatusCode::kFailedPrecondition: code = grpc::StatusCode::FAILED_PRECONDITION; break;
    case StatusCode::kResourceExhausted: code = grpc::StatusCode::RESOURCE_EXHAUSTED; break;
    case StatusCode::kUnimplemented: code = grpc::StatusCode::UNIMPLEMENTED; break;
    case StatusCode::kInternal: code = grpc::StatusCode::INTERNAL; break;
    case StatusCode::kUnavailable: code = grpc::StatusCode::UNAVAILABLE; break;
    case StatusCode::kCancelled: code = grpc::StatusCode::CANCELLED; break;
    case StatusCode::kDeadlineExceeded: code = grpc::StatusCode::DEADLINE_EXCEEDED; break;
    case StatusCode::kUnauthenticated: code = grpc::StatusCode::UNAUTHENTICATED; break;
  }
  return grpc::Status(code, s.message());
}

// Equal strings, in time that does not depend on where they differ.
bool SecretsMatch(const std::string& a, const std::string& b) {
  if (a.size() != b.size()) return false;
  unsigned char diff = 0;
  for (size_t i = 0; i < a.size(); ++i) diff |= static_cast<unsigned char>(a[i] ^ b[i]);
  return diff == 0;
}

void Log(const std::string& line) {
  const std::string text = "epic-coordinator: " + line + "\n";
  std::fputs(text.c_str(), stderr);
}

}  // namespace

struct Server::Impl final : v1::Epic::Service, v1::internal::WorkerLink::Service {
  ServerOptions options;
  Metrics* metrics = nullptr;
  Scheduler scheduler;
  std::unique_ptr<grpc::Server> server;
  std::unique_ptr<HttpServer> http;
  int port = 0;
  std::atomic<bool> stopping{false};

  std::mutex mu;  // guards what follows
  bool attached = false;
  v1::internal::Hello worker;  // the attached job's hello (secret cleared), placement kept current
  int64_t attachments = 0;
  int64_t load_steps = 0;
  std::vector<std::vector<int64_t>> loads;  // [layer][expert], since the job attached
  LoadStats stats;
  int64_t steps_since_rebalance = 0;

  // A rebalance waiting for the link thread, which applies it between steps.
  struct Rebalancing {
    PlacementTable table;  // [moe layer][rank][experts]
    v1::RebalanceResponse response;
    std::promise<grpc::Status> done;
  };
  std::mutex rebalance_mu;
  std::shared_ptr<Rebalancing> pending;
  uint64_t next_rebalance_id = 1;

  Impl(const ServerOptions& o, Metrics* m) : options(o), metrics(m), scheduler(o.scheduler, m), stats(o.stats) {}

  // The current placement as a table over the MoE layers, and those layers' ids.
  PlacementTable CurrentPlacementLocked(std::vector<int32_t>* layers) const {
    PlacementTable table;
    for (const v1::LayerPlacement& lp : worker.placement()) {
      if (layers) layers->push_back(lp.layer());
      std::vector<std::vector<int32_t>> ranks;
      for (const v1::RankSlots& r : lp.ranks()) ranks.emplace_back(r.experts().begin(), r.experts().end());
      table.push_back(std::move(ranks));
    }
    return table;
  }

  // The load report of the window, planned with REDUNDANT replica slots per rank.
  StatusOr<nlohmann::json> ReportLocked(int redundant) const {
    ReportInput in;
    stats.Fill(&in);
    in.model_type = worker.model().model_type();
    in.num_groups = static_cast<int>(std::max<int64_t>(1, worker.model().n_group()));
    in.placement = CurrentPlacementLocked(nullptr);
    in.redundant_slots_per_rank = redundant;
    return BuildLoadReport(in);
  }

  // What a rebalance would do now. FAILED_PRECONDITION without statistics.
  StatusOr<std::shared_ptr<Rebalancing>> PlanRebalance(int redundant) {
    std::lock_guard<std::mutex> lock(mu);
    if (!attached) return UnavailableError("no worker job is attached");
    if (redundant < 0) return InvalidArgumentError("redundant_slots_per_rank must be >= 0");
    if (stats.window_steps() == 0) {
      return FailedPreconditionError("no expert statistics yet: the window is empty (serve some requests first)");
    }
    EPIC_ASSIGN_OR_RETURN(nlohmann::json report, ReportLocked(redundant));
    if (report["overall"]["tokens"].get<double>() <= 0) {
      return FailedPreconditionError("no expert statistics yet: no tokens in the window");
    }
    auto r = std::make_shared<Rebalancing>();
    for (const nlohmann::json& layer : report["layers"]) {
      r->table.push_back(layer["planned"]["placement"].get<std::vector<std::vector<int32_t>>>());
    }
    r->response.set_imbalance_before(report["overall"]["current"]["imbalance"].get<double>());
    r->response.set_imbalance_after(report["overall"]["planned"]["imbalance"].get<double>());
    r->response.set_experts_moved(report["overall"]["experts_moved"].get<int64_t>());
    r->response.set_window_steps(stats.window_steps());
    return r;
  }

  void SetServing(bool serving) {
    auto* health = server->GetHealthCheckService();
    health->SetServingStatus(serving);
    health->SetServingStatus("epic.v1.Epic", serving);
    if (metrics) metrics->WorkerAttached(serving);
  }

  grpc::Status Authorize(grpc::ServerContext* ctx) const {
    if (options.auth_token.empty()) return grpc::Status::OK;
    const auto& md = ctx->client_metadata();
    auto it = md.find("authorization");
    if (it != md.end() &&
        SecretsMatch(std::string(it->second.data(), it->second.size()), "Bearer " + options.auth_token)) {
      return grpc::Status::OK;
    }
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                        "this server needs 'authorization: Bearer <token>' metadata (epic --auth-token-file)");
  }

  // --- epic.v1.Epic ---

  grpc::Status Generate(grpc::ServerContext* ctx, const v1::GenerateRequest* request,
                        grpc::ServerWriter<v1::GenerateResponse>* writer) override {
    if (grpc::Status s = Authorize(ctx); !s.ok()) return s;
    auto generation = Generation::Start(&scheduler, options.text, *request, metrics);
    if (!generation.ok()) return ToGrpc(generation.status());
    Generation& g = **generation;
    while (!g.finished()) {
      std::optional<v1::GenerateResponse> response = g.Next(std::chrono::milliseconds(50));
      if (response && (response->token_ids_size() > 0 || !response->text().empty() || g.finished()) &&
          (g.status().ok() || response->token_ids_size() > 0) && !writer->Write(*response)) {
        g.Cancel();
        return grpc::Status(grpc::StatusCode::CANCELLED, "the client went away");
      }
      if (g.finished()) return ToGrpc(g.status());
      if (ctx->IsCancelled()) {
        g.Cancel();
        if (std::chrono::system_clock::now() >= ctx->deadline()) {
          return grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED, "the request's deadline passed");
        }
        return grpc::Status(grpc::StatusCode::CANCELLED, "the client cancelled the request");
      }
    }
    return ToGrpc(g.status());
  }

  grpc::Status GetModelInfo(grpc::ServerContext* ctx, const v1::GetModelInfoRequest*, v1::ModelInfo* info) override {
    if (grpc::Status s = Authorize(ctx); !s.ok()) return s;
    const SchedulerStats stats = scheduler.Stats();
    {
      std::lock_guard<std::mutex> lock(mu);
      info->set_worker_attached(attached);
      info->set_worker_attachments(attachments);
      if (attached) {
        *info->mutable_model() = worker.model();
        *info->mutable_ranks() = worker.ranks();
        *info->mutable_placement() = worker.placement();
      }
    }
    v1::CacheInfo* cache = info->mutable_cache();
    cache->set_block_size(options.scheduler.block_size);
    cache->set_total_blocks(stats.total_blocks);
    cache->set_free_blocks(stats.attached ? stats.free_blocks : stats.total_blocks);
    info->set_requests_running(stats.running);
    info->set_requests_waiting(stats.waiting);
    info->set_steps(stats.steps);
    return grpc::Status::OK;
  }

  grpc::Status GetLoadReport(grpc::ServerContext* ctx, const v1::GetLoadReportRequest*,
                             v1::LoadReport* report) override {
    if (grpc::Status s = Authorize(ctx); !s.ok()) return s;
    std::lock_guard<std::mutex> lock(mu);
    if (attached) {
      auto full = ReportLocked(options.redundant_slots_per_rank);
      if (!full.ok()) return ToGrpc(full.status());
      report->set_json(full->dump());
    }
    report->set_steps(load_steps);
    for (size_t l = 0; l < loads.size(); ++l) {
      if (loads[l].empty()) continue;
      v1::LayerLoad* layer = report->add_layers();
      layer->set_layer(static_cast<int32_t>(l));
      layer->mutable_expert_tokens()->Add(loads[l].begin(), loads[l].end());
    }
    return grpc::Status::OK;
  }

  grpc::Status Rebalance(grpc::ServerContext* ctx, const v1::RebalanceRequest* request,
                         v1::RebalanceResponse* response) override {
    if (grpc::Status s = Authorize(ctx); !s.ok()) return s;
    auto plan = PlanRebalance(request->has_redundant_slots_per_rank() ? request->redundant_slots_per_rank()
                                                                      : options.redundant_slots_per_rank);
    if (!plan.ok()) return ToGrpc(plan.status());
    std::shared_ptr<Rebalancing> r = *plan;
    *response = r->response;
    if (request->dry_run()) {
      response->set_reason("dry run");
      return grpc::Status::OK;
    }
    if (r->response.experts_moved() == 0) {
      response->set_reason("the current placement is already the plan");
      return grpc::Status::OK;
    }
    std::future<grpc::Status> done = r->done.get_future();
    {
      std::lock_guard<std::mutex> lock(rebalance_mu);
      if (pending) return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, "a rebalance is already in progress");
      pending = r;
    }
    scheduler.Wake();
    if (done.wait_for(std::chrono::minutes(30)) != std::future_status::ready) {
      return grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED, "the rebalance did not finish within 30 minutes");
    }
    const grpc::Status s = done.get();
    if (s.ok()) *response = r->response;
    return s;
  }

  // --- the worker link ---

  grpc::Status Attach(grpc::ServerContext* ctx,
                      grpc::ServerReaderWriter<v1::internal::CoordinatorMessage, v1::internal::WorkerMessage>* stream)
      override {
    v1::internal::WorkerMessage first;
    if (!stream->Read(&first) || !first.has_hello()) {
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "a worker must begin with its hello");
    }
    if (!SecretsMatch(first.hello().secret(), options.worker_secret)) {
      Log("refused a worker job from " + ctx->peer() + ": wrong worker secret");
      return grpc::Status(grpc::StatusCode::UNAUTHENTICATED, "wrong worker secret");
    }
    if (stopping) return grpc::Status(grpc::StatusCode::UNAVAILABLE, "the coordinator is shutting down");
    const v1::ModelSummary& model = first.hello().model();
    {
      std::lock_guard<std::mutex> lock(mu);
      if (attached) {
        Log("refused a second worker job from " + ctx->peer());
        return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, "a worker job is already attached");
      }
      attached = true;
      ++attachments;
      worker = first.hello();
      worker.clear_secret();
      load_steps = 0;
      loads.assign(static_cast<size_t>(model.num_hidden_layers()), {});
      std::vector<int32_t> moe_layers;
      for (const v1::LayerPlacement& lp : worker.placement()) moe_layers.push_back(lp.layer());
      stats.Reset(moe_layers, model.n_routed_experts(), first.hello().ranks_size());
      steps_since_rebalance = 0;
    }
    v1::internal::CoordinatorMessage welcome;
    welcome.mutable_welcome()->set_block_size(options.scheduler.block_size);
    welcome.mutable_welcome()->set_num_blocks(options.scheduler.num_blocks);
    std::string why = "the worker link closed";
    if (stream->Write(welcome)) {
      scheduler.Attach(model);
      SetServing(true);
      Log("worker job attached from " + ctx->peer() + ": " + std::to_string(first.hello().ranks_size()) +
          " rank(s), " + model.model_type() + " with " + std::to_string(model.num_hidden_layers()) + " layers");
      why = RunSteps(ctx, stream);
      SetServing(false);
      {
        std::lock_guard<std::mutex> lock(rebalance_mu);
        if (pending) {
          pending->done.set_value(grpc::Status(grpc::StatusCode::UNAVAILABLE, "the worker job left: " + why));
          pending.reset();
        }
      }
      scheduler.Detach(why);
      Log("worker job detached: " + why);
    }
    {
      std::lock_guard<std::mutex> lock(mu);
      attached = false;
    }
    return grpc::Status(grpc::StatusCode::UNAVAILABLE, why);
  }

  // Feeds steps to the attached job until it leaves or fails; returns why it ended.
  std::string RunSteps(
      grpc::ServerContext* ctx,
      grpc::ServerReaderWriter<v1::internal::CoordinatorMessage, v1::internal::WorkerMessage>* stream) {
    std::mutex inbox_mu;
    std::condition_variable inbox_cv;
    std::deque<v1::internal::WorkerMessage> inbox;
    bool closed = false;
    std::thread reader([&] {
      v1::internal::WorkerMessage m;
      while (stream->Read(&m)) {
        std::lock_guard<std::mutex> lock(inbox_mu);
        inbox.push_back(std::move(m));
        inbox_cv.notify_all();
      }
      std::lock_guard<std::mutex> lock(inbox_mu);
      closed = true;
      inbox_cv.notify_all();
    });
    auto finish = [&](std::string why) {
      ctx->TryCancel();
      reader.join();
      return why;
    };
    // The worker's next message, or why none came within TIMEOUT.
    std::string why;
    auto await = [&](std::chrono::milliseconds timeout, const char* what) -> std::optional<v1::internal::WorkerMessage> {
      std::unique_lock<std::mutex> lock(inbox_mu);
      if (!inbox_cv.wait_for(lock, timeout, [&] { return !inbox.empty() || closed; })) {
        why = std::string("no ") + what + " completed in " + std::to_string(timeout.count() / 1000.0) +
              " s: the worker job is stuck";
        return std::nullopt;
      }
      if (inbox.empty()) {
        why = std::string("the worker link closed during a ") + what;
        return std::nullopt;
      }
      v1::internal::WorkerMessage m = std::move(inbox.front());
      inbox.pop_front();
      return m;
    };
    // Sends R to the job and waits for the switch; false (WHY set) when the job failed.
    auto rebalance = [&](Rebalancing& r) -> bool {
      v1::internal::CoordinatorMessage m;
      v1::internal::Rebalance* request = m.mutable_rebalance();
      {
        std::lock_guard<std::mutex> lock(mu);
        request->set_rebalance_id(next_rebalance_id++);
        for (size_t l = 0; l < r.table.size(); ++l) {
          v1::LayerPlacement* lp = request->add_placement();
          lp->set_layer(worker.placement(static_cast<int>(l)).layer());
          for (const auto& experts : r.table[l]) lp->add_ranks()->mutable_experts()->Add(experts.begin(), experts.end());
        }
      }
      if (!stream->Write(m)) {
        why = "the worker link closed";
        r.done.set_value(grpc::Status(grpc::StatusCode::UNAVAILABLE, why));
        return false;
      }
      // Reading experts from the checkpoint can take far longer than a step.
      auto reply = await(options.step_timeout * 10, "rebalance");
      if (!reply || !reply->has_rebalanced()) {
        if (reply) why = reply->has_error() ? "the worker job failed: " + reply->error() : "unexpected reply to a rebalance";
        r.done.set_value(grpc::Status(grpc::StatusCode::UNAVAILABLE, why));
        return false;
      }
      const v1::internal::RebalanceResult& done = reply->rebalanced();
      r.response.set_applied(true);
      r.response.set_bytes_loaded(done.bytes_loaded());
      r.response.set_seconds(done.seconds());
      {
        std::lock_guard<std::mutex> lock(mu);
        *worker.mutable_placement() = request->placement();
        stats.ClearWindow();
        stats.AddRebalance({load_steps, r.response.experts_moved(), done.bytes_loaded(), done.seconds(),
                            r.response.imbalance_before(), r.response.imbalance_after()});
        steps_since_rebalance = 0;
      }
      Log("rebalanced: " + std::to_string(r.response.experts_moved()) + " expert copies moved (" +
          std::to_string(done.bytes_loaded() >> 10) + " KiB read) in " + std::to_string(done.seconds()) +
          " s; imbalance " + std::to_string(r.response.imbalance_before()) + " -> " +
          std::to_string(r.response.imbalance_after()) + " predicted");
      r.done.set_value(grpc::Status::OK);
      return true;
    };
    v1::internal::CoordinatorMessage message;
    for (;;) {
      if (stopping) return finish("the coordinator is shutting down");
      {
        std::lock_guard<std::mutex> lock(inbox_mu);
        if (closed) return finish("the worker link closed");
      }
      std::shared_ptr<Rebalancing> asked;
      {
        std::lock_guard<std::mutex> lock(rebalance_mu);
        asked = std::move(pending);
        pending.reset();
      }
      if (asked && !rebalance(*asked)) return finish(why);
      if (!scheduler.NextStep(message.mutable_step())) {
        scheduler.WaitForWork(std::chrono::milliseconds(100));
        continue;
      }
      const auto sent = Clock::now();
      if (!stream->Write(message)) return finish("the worker link closed");
      auto reply = await(options.step_timeout, "step");
      if (!reply) return finish(why);
      if (reply->has_error()) return finish("the worker job failed: " + reply->error());
      if (!reply->has_result()) return finish("the worker sent something other than a step result");
      if (const Status s = scheduler.Complete(reply->result()); !s.ok()) return finish(s.message());
      if (metrics) {
        metrics->StepCompleted(std::chrono::duration<double>(Clock::now() - sent).count(),
                               message.step().sequences_size());
      }
      bool automatic = false;
      {
        std::lock_guard<std::mutex> lock(mu);
        ++load_steps;
        for (const v1::LayerLoad& layer : reply->result().expert_tokens()) {
          if (layer.layer() < 0 || static_cast<size_t>(layer.layer()) >= loads.size()) continue;
          auto& row = loads[static_cast<size_t>(layer.layer())];
          row.resize(std::max(row.size(), static_cast<size_t>(layer.expert_tokens_size())));
          for (int e = 0; e < layer.expert_tokens_size(); ++e) row[static_cast<size_t>(e)] += layer.expert_tokens(e);
        }
        stats.Add(load_steps, reply->result());
        automatic = options.rebalance_every > 0 && ++steps_since_rebalance >= options.rebalance_every;
        if (automatic) steps_since_rebalance = 0;
      }
      if (automatic) {
        auto plan = PlanRebalance(options.redundant_slots_per_rank);
        if (plan.ok() && (*plan)->response.imbalance_before() > options.rebalance_threshold &&
            (*plan)->response.experts_moved() > 0 &&
            (*plan)->response.imbalance_after() < (*plan)->response.imbalance_before()) {
          (*plan)->done.get_future();  // nobody waits on an automatic rebalance
          if (!rebalance(**plan)) return finish(why);
        }
      }
    }
  }
};

Server::Server(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

Server::~Server() {
  if (impl_ && impl_->server) Shutdown(std::chrono::milliseconds(0));
}

StatusOr<std::unique_ptr<Server>> Server::Start(const ServerOptions& options, Metrics* metrics) {
  if (options.worker_secret.empty()) return InvalidArgumentError("a worker secret is required");
  auto impl = std::make_unique<Impl>(options, metrics);
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  std::shared_ptr<grpc::ServerCredentials> creds = grpc::InsecureServerCredentials();
  if (!options.tls_cert_pem.empty()) {
    grpc::SslServerCredentialsOptions ssl;
    ssl.pem_key_cert_pairs.push_back({options.tls_key_pem, options.tls_cert_pem});
    creds = grpc::SslServerCredentials(ssl);
  }
  builder.AddListeningPort(options.listen, creds, &impl->port);
  builder.RegisterService(static_cast<v1::Epic::Service*>(impl.get()));
  builder.RegisterService(static_cast<v1::internal::WorkerLink::Service*>(impl.get()));
  impl->server = builder.BuildAndStart();
  if (!impl->server || impl->port == 0) {
    return UnavailableError("cannot listen on " + options.listen + " (address in use, or not an address)");
  }
  impl->SetServing(false);
  if (!options.http_listen.empty()) {
    HttpOptions http;
    http.listen = options.http_listen;
    http.threads = options.http_threads;
    http.auth_token = options.auth_token;
    http.model_name = options.model_name;
    HttpBackend backend;
    backend.scheduler = &impl->scheduler;
    backend.text = options.text;
    backend.metrics = metrics;
    Impl* self = impl.get();
    backend.model = [self]() -> std::optional<v1::ModelSummary> {
      std::lock_guard<std::mutex> lock(self->mu);
      if (!self->attached) return std::nullopt;
      return self->worker.model();
    };
    auto started = HttpServer::Start(http, std::move(backend));
    if (!started.ok()) {
      impl->server->Shutdown();
      return started.status();
    }
    impl->http = std::move(started).value();
  }
  return std::unique_ptr<Server>(new Server(std::move(impl)));
}

int Server::port() const { return impl_->port; }
int Server::http_port() const { return impl_->http ? impl_->http->port() : 0; }

void Server::Shutdown(std::chrono::milliseconds drain) {
  if (!impl_->server) return;
  impl_->scheduler.Drain();
  impl_->server->GetHealthCheckService()->SetServingStatus(false);
  if (!impl_->scheduler.WaitIdle(drain)) Log("drain timed out; ending the requests still running");
  impl_->stopping = true;
  impl_->scheduler.Detach("the coordinator is shutting down");
  if (impl_->http) impl_->http->Stop();
  impl_->server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  impl_->server->Wait();
  impl_->server.reset();
}

}  // namespace epic::coordinator
