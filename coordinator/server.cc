#include "coordinator/server.h"

#include <optional>

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>

#include "coordinator/http_server.h"
#include "coordinator/rpc.h"
#include "coordinator/worker_session.h"
#include "epic.grpc.pb.h"

namespace epic::coordinator {

// The client API (epic.v1.Epic) over the scheduler and the worker session, and the
// servers that carry it: gRPC (with the link, health and reflection) and HTTP.
struct Server::Impl final : v1::Epic::Service {
  ServerOptions options;
  Metrics* metrics = nullptr;
  Scheduler scheduler;
  WorkerSession session;
  std::unique_ptr<grpc::Server> server;
  std::unique_ptr<HttpServer> http;
  int port = 0;

  Impl(const ServerOptions& o, Metrics* m)
      : options(o), metrics(m), scheduler(o.scheduler, m),
        session(o, &scheduler, m, [this](bool serving) { SetServing(serving); }) {}

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
    session.FillModelInfo(info);
    v1::CacheInfo* cache = info->mutable_cache();
    cache->set_block_size(options.scheduler.block_size);
    cache->set_total_blocks(stats.total_blocks);
    cache->set_free_blocks(stats.attached ? stats.free_blocks : stats.total_blocks);
    cache->set_cached_blocks(stats.cached_blocks);
    const std::string attention = cache->attention() == "dp" ? "dp" : "tp";  // the attached job's
    cache->set_attention(attention);
    if (attention == "dp") {
      cache->mutable_rank_free_blocks()->Add(stats.cache_free_blocks.begin(), stats.cache_free_blocks.end());
      cache->mutable_rank_running()->Add(stats.cache_running.begin(), stats.cache_running.end());
    }
    info->set_requests_running(stats.running);
    info->set_requests_waiting(stats.waiting);
    info->set_steps(stats.steps);
    return grpc::Status::OK;
  }

  grpc::Status GetLoadReport(grpc::ServerContext* ctx, const v1::GetLoadReportRequest*,
                             v1::LoadReport* report) override {
    if (grpc::Status s = Authorize(ctx); !s.ok()) return s;
    return session.FillLoadReport(report);
  }

  grpc::Status Rebalance(grpc::ServerContext* ctx, const v1::RebalanceRequest* request,
                         v1::RebalanceResponse* response) override {
    if (grpc::Status s = Authorize(ctx); !s.ok()) return s;
    return session.Rebalance(request, response);
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
  builder.RegisterService(impl.get());
  builder.RegisterService(&impl->session);
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
    backend.model = [self] { return self->session.Model(); };
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
  impl_->session.Stop();
  impl_->scheduler.Detach("the coordinator is shutting down");
  if (impl_->http) impl_->http->Stop();
  impl_->server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  impl_->server->Wait();
  impl_->server.reset();
}

}  // namespace epic::coordinator
