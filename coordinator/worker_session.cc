#include "coordinator/worker_session.h"

#include <condition_variable>
#include <deque>
#include <thread>

#include "coordinator/cache_footprint.h"
#include "coordinator/rpc.h"
#include "placement/placement_proto.h"

namespace epic::coordinator {

WorkerSession::WorkerSession(const ServerOptions& options, Scheduler* scheduler, Metrics* metrics,
                             std::function<void(bool)> on_serving)
    : options_(options), scheduler_(scheduler), metrics_(metrics), on_serving_(std::move(on_serving)),
      stats_(options.stats) {}

std::optional<v1::ModelSummary> WorkerSession::Model() const {
  std::lock_guard<std::mutex> lock(mu_);
  if (!attached_) return std::nullopt;
  return worker_.model();
}

void WorkerSession::FillModelInfo(v1::ModelInfo* info) const {
  std::lock_guard<std::mutex> lock(mu_);
  info->set_worker_attached(attached_);
  info->set_worker_attachments(attachments_);
  if (attached_) {
    *info->mutable_model() = worker_.model();
    *info->mutable_ranks() = worker_.ranks();
    *info->mutable_placement() = worker_.placement();
    info->mutable_cache()->set_attention(worker_.attention() == "dp" ? "dp" : "tp");
    *info->mutable_cache_footprint() = CacheFootprintLocked();
  }
}

v1::CacheFootprint WorkerSession::CacheFootprintLocked() const {
  // Rows are BF16 on GPUs and on CPU workers running the fast precision, else F32.
  const bool bf16 = worker_.ranks_size() > 0 &&
                    (worker_.ranks(0).device() == "cuda" || worker_.ranks(0).precision() == "fast");
  return CacheFootprintOf(worker_.model(), bf16 ? 2 : 4, options_.scheduler.num_blocks * options_.scheduler.block_size,
                          worker_.ranks_size(), worker_.attention() == "dp" ? "dp" : "tp");
}

placement::PlacementTable WorkerSession::CurrentPlacementLocked() const {
  auto full = placement::PlacementFromProto(worker_.placement(), worker_.model().num_hidden_layers(),
                                            worker_.ranks_size());
  // The job described its own placement when it attached, and only plans that fit it replace it.
  return full.ok() ? placement::MoeLayers(*full, nullptr) : placement::PlacementTable();
}

ReportInput WorkerSession::ReportInputLocked(int redundant) const {
  ReportInput in;
  stats_.Fill(&in);
  in.model_type = worker_.model().model_type();
  in.num_groups = static_cast<int>(std::max<int64_t>(1, worker_.model().n_group()));
  in.placement = CurrentPlacementLocked();
  in.redundant_slots_per_rank = redundant;
  return in;
}

StatusOr<std::shared_ptr<WorkerSession::Rebalancing>> WorkerSession::PlanRebalance(int redundant) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!attached_) return UnavailableError("no worker job is attached");
  if (redundant < 0) return InvalidArgumentError("redundant_slots_per_rank must be >= 0");
  if (stats_.window_steps() == 0) {
    return FailedPreconditionError("no expert statistics yet: the window is empty (serve some requests first)");
  }
  EPIC_ASSIGN_OR_RETURN(PlannedPlacement plan, PlanFromReport(ReportInputLocked(redundant)));
  if (plan.tokens <= 0) return FailedPreconditionError("no expert statistics yet: no tokens in the window");
  return RebalancingOf(std::move(plan), stats_.window_steps());
}

std::shared_ptr<WorkerSession::Rebalancing> WorkerSession::RebalancingOf(PlannedPlacement plan, int64_t window_steps) {
  auto r = std::make_shared<Rebalancing>();
  r->table = std::move(plan.placement);
  r->response.set_imbalance_before(plan.imbalance_before);
  r->response.set_imbalance_after(plan.imbalance_after);
  r->response.set_experts_moved(plan.experts_moved);
  r->response.set_window_steps(window_steps);
  return r;
}


std::shared_ptr<WorkerSession::Rebalancing> WorkerSession::PlanForNewSizeLocked(const ReportInput& last,
                                                                                int last_ranks) {
  const int ranks = worker_.ranks_size();
  if (last_ranks == 0 || last_ranks == ranks || last.window_steps == 0 || last.layers != stats_.layers()) {
    return nullptr;
  }
  ReportInput in;
  in.layers = last.layers;
  in.expert_tokens = last.expert_tokens;
  in.num_ranks = ranks;
  in.num_groups = static_cast<int>(std::max<int64_t>(1, worker_.model().n_group()));
  in.placement = CurrentPlacementLocked();
  in.redundant_slots_per_rank = options_.redundant_slots_per_rank;
  auto plan = PlanFromReport(in);
  if (!plan.ok() || plan->tokens <= 0 || plan->experts_moved == 0 || plan->imbalance_after >= plan->imbalance_before) {
    return nullptr;
  }
  const double before = plan->imbalance_before, after = plan->imbalance_after;
  std::shared_ptr<Rebalancing> r = RebalancingOf(std::move(*plan), last.window_steps);
  r->done.get_future();  // nobody waits on it
  Log("a job of " + std::to_string(ranks) + " rank(s) after one of " + std::to_string(last_ranks) +
      ": planned its placement from the last job's loads over " + std::to_string(last.window_steps) +
      " steps (imbalance " + std::to_string(before) + " -> " + std::to_string(after) + " predicted)");
  return r;
}

grpc::Status WorkerSession::Rebalance(const v1::RebalanceRequest* request, v1::RebalanceResponse* response) {
  auto plan = PlanRebalance(request->has_redundant_slots_per_rank() ? request->redundant_slots_per_rank()
                                                                    : options_.redundant_slots_per_rank);
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
    std::lock_guard<std::mutex> lock(rebalance_mu_);
    if (pending_) return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, "a rebalance is already in progress");
    pending_ = r;
  }
  scheduler_->Wake();
  if (done.wait_for(std::chrono::minutes(30)) != std::future_status::ready) {
    return grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED, "the rebalance did not finish within 30 minutes");
  }
  const grpc::Status s = done.get();
  if (s.ok()) *response = r->response;
  return s;
}


grpc::Status WorkerSession::FillLoadReport(v1::LoadReport* report) const {
  const SchedulerStats cache = scheduler_->Stats();  // before mu_: the scheduler never waits on it
  std::lock_guard<std::mutex> lock(mu_);
  if (attached_) {
    ReportInput in = ReportInputLocked(options_.redundant_slots_per_rank);
    in.cache = CacheReport(CacheFootprintLocked(), options_.scheduler.block_size, options_.scheduler.num_blocks,
                           cache.total_blocks - cache.free_blocks, cache.total_blocks);
    auto full = BuildLoadReport(in);
    if (!full.ok()) return ToGrpc(full.status());
    report->set_json(full->dump());
  }
  report->set_steps(stats_.steps());
  const std::vector<std::vector<int64_t>>& totals = stats_.totals();
  for (size_t l = 0; l < totals.size(); ++l) {
    v1::LayerLoad* layer = report->add_layers();
    layer->set_layer(stats_.layers()[l]);
    layer->mutable_expert_tokens()->Add(totals[l].begin(), totals[l].end());
  }
  return grpc::Status::OK;
}


// Everything a job's hello says that the coordinator will size or index things by, checked
// before any state changes: nothing a peer sends may wedge the session.
Status ValidateHello(const v1::internal::Hello& hello) {
  const v1::ModelSummary& m = hello.model();
  auto range = [](const char* field, int64_t v, int64_t lo, int64_t hi) -> Status {
    if (v < lo || v > hi) {
      return InvalidArgumentError(std::string("hello: model.") + field + " is " + std::to_string(v) + ", not in [" +
                                  std::to_string(lo) + ", " + std::to_string(hi) + "]");
    }
    return OkStatus();
  };
  EPIC_RETURN_IF_ERROR(range("vocab_size", m.vocab_size(), 1, int64_t{1} << 24));
  EPIC_RETURN_IF_ERROR(range("num_hidden_layers", m.num_hidden_layers(), 1, 4096));
  EPIC_RETURN_IF_ERROR(range("n_routed_experts", m.n_routed_experts(), 0, 65536));
  EPIC_RETURN_IF_ERROR(range("num_experts_per_tok", m.num_experts_per_tok(), 0, 65536));
  EPIC_RETURN_IF_ERROR(range("max_position_embeddings", m.max_position_embeddings(), 1, int64_t{1} << 32));
  EPIC_RETURN_IF_ERROR(range("n_group", m.n_group(), 0, 65536));
  for (const int32_t eos : m.eos_token_ids()) EPIC_RETURN_IF_ERROR(range("eos_token_ids[]", eos, 0, m.vocab_size() - 1));
  if (hello.ranks_size() < 1 || hello.ranks_size() > 65536) {
    return InvalidArgumentError("hello: " + std::to_string(hello.ranks_size()) + " ranks");
  }
  if (!hello.attention().empty() && hello.attention() != "tp" && hello.attention() != "dp") {
    return InvalidArgumentError("hello: attention '" + hello.attention() + "', expected tp or dp");
  }
  auto table = placement::PlacementFromProto(hello.placement(), m.num_hidden_layers(), hello.ranks_size());
  if (!table.ok()) return InvalidArgumentError("hello: " + table.status().message());
  std::vector<bool> seen(static_cast<size_t>(m.num_hidden_layers()), false);
  for (const v1::LayerPlacement& lp : hello.placement()) {
    if (seen[static_cast<size_t>(lp.layer())]) {
      return InvalidArgumentError("hello: layer " + std::to_string(lp.layer()) + " is placed twice");
    }
    seen[static_cast<size_t>(lp.layer())] = true;
    // As the worker's ExpertPlacement checks its own: a rank holds an expert once, and every
    // expert is on some rank (the planner, and so every report, assumes both).
    std::vector<int> holder(static_cast<size_t>(m.n_routed_experts()), -1);  // [expert] -> last rank seen
    for (int r = 0; r < lp.ranks_size(); ++r) {
      for (const int32_t e : lp.ranks(r).experts()) {
        EPIC_RETURN_IF_ERROR(range("placement expert", e, 0, m.n_routed_experts() - 1));
        if (holder[static_cast<size_t>(e)] == r) {
          return InvalidArgumentError("hello: layer " + std::to_string(lp.layer()) + ", rank " + std::to_string(r) +
                                      " holds expert " + std::to_string(e) + " twice");
        }
        holder[static_cast<size_t>(e)] = r;
      }
    }
    for (size_t e = 0; e < holder.size(); ++e) {
      if (holder[e] < 0) {
        return InvalidArgumentError("hello: layer " + std::to_string(lp.layer()) + ": expert " + std::to_string(e) +
                                    " is on no rank");
      }
    }
  }
  return OkStatus();
}

grpc::Status WorkerSession::Attach(
  grpc::ServerContext* ctx,
  grpc::ServerReaderWriter<v1::internal::CoordinatorMessage, v1::internal::WorkerMessage>* stream) {
  v1::internal::WorkerMessage first;
  // A peer that never says hello must not hold a server thread: the link is cancelled
  // when no hello came within --hello-timeout.
  std::mutex hello_mu;
  std::condition_variable hello_cv;
  bool heard = false;
  std::thread guard([&] {
    std::unique_lock<std::mutex> lock(hello_mu);
    if (!hello_cv.wait_for(lock, options_.hello_timeout, [&] { return heard; })) ctx->TryCancel();
  });
  const bool read = stream->Read(&first);
  {
    std::lock_guard<std::mutex> lock(hello_mu);
    heard = true;
  }
  hello_cv.notify_all();
  guard.join();
  if (!read || !first.has_hello()) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "a worker must begin with its hello");
  }
  if (!SecretsMatch(first.hello().secret(), options_.worker_secret)) {
    Log("refused a worker job from " + ctx->peer() + ": wrong worker secret");
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED, "wrong worker secret");
  }
  if (stopping_) return grpc::Status(grpc::StatusCode::UNAVAILABLE, "the coordinator is shutting down");
  if (const Status s = ValidateHello(first.hello()); !s.ok()) {
    Log("refused a worker job from " + ctx->peer() + ": " + s.message());
    return ToGrpc(s);
  }
  // Under dp the coordinator keeps a block pool per rank: bound what a hello can make it hold.
  constexpr int64_t kMostPooledBlocks = int64_t{1} << 22;
  if (first.hello().attention() == "dp" &&
      first.hello().ranks_size() * options_.scheduler.num_blocks > kMostPooledBlocks) {
    const std::string why = "hello: " + std::to_string(first.hello().ranks_size()) +
                            " data-parallel ranks of --cache-blocks " + std::to_string(options_.scheduler.num_blocks) +
                            " are more cache blocks than the coordinator keeps (" +
                            std::to_string(kMostPooledBlocks) + ")";
    Log("refused a worker job from " + ctx->peer() + ": " + why);
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, why);
  }
  const v1::ModelSummary& model = first.hello().model();
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (attached_) {
      Log("refused a second worker job from " + ctx->peer());
      return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, "a worker job is already attached");
    }
    attached_ = true;
    // What the last job measured, for a job of another size (elastic restarts).
    ReportInput last;
    const int last_ranks = attachments_ > 0 ? worker_.ranks_size() : 0;
    if (last_ranks > 0) stats_.Fill(&last);
    ++attachments_;
    worker_ = first.hello();
    worker_.clear_secret();
    std::vector<int32_t> moe_layers;
    for (const v1::LayerPlacement& lp : worker_.placement()) moe_layers.push_back(lp.layer());
    stats_.Reset(moe_layers, model.n_routed_experts(), first.hello().ranks_size());
    steps_since_rebalance_ = 0;
    if (std::shared_ptr<Rebalancing> r = PlanForNewSizeLocked(last, last_ranks)) {
      std::lock_guard<std::mutex> pending(rebalance_mu_);
      if (!pending_) pending_ = std::move(r);  // applied before the job's first step
    }
  }
  v1::internal::CoordinatorMessage welcome;
  welcome.mutable_welcome()->set_block_size(options_.scheduler.block_size);
  welcome.mutable_welcome()->set_num_blocks(options_.scheduler.num_blocks);
  welcome.mutable_welcome()->set_max_step_tokens(options_.scheduler.max_step_tokens);
  std::string why = "the worker link closed";
  if (stream->Write(welcome)) {
    // Under data-parallel attention each rank holds a cache of its own.
    const bool data_parallel = first.hello().attention() == "dp";
    scheduler_->Attach(model, data_parallel ? first.hello().ranks_size() : 1);
    on_serving_(true);
    Log("worker job attached from " + ctx->peer() + ": " + std::to_string(first.hello().ranks_size()) +
        " rank(s), " + model.model_type() + " with " + std::to_string(model.num_hidden_layers()) + " layers, " +
        (data_parallel ? "data" : "tensor") + "-parallel attention");
    why = RunSteps(ctx, stream);
    on_serving_(false);
    // A job that died leaves its requests waiting for the next; a stopping coordinator ends them.
    scheduler_->Detach(why, /*resume=*/!stopping_);
    Log("worker job detached: " + why);
  }
  {
    std::lock_guard<std::mutex> lock(rebalance_mu_);
    if (pending_) {
      pending_->done.set_value(grpc::Status(grpc::StatusCode::UNAVAILABLE, "the worker job left: " + why));
      pending_.reset();
    }
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    attached_ = false;
  }
  return grpc::Status(grpc::StatusCode::UNAVAILABLE, why);
}

std::string WorkerSession::RunSteps(
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
      std::lock_guard<std::mutex> lock(mu_);
      request->set_rebalance_id(next_rebalance_id_++);
      // The plan's rows are the MoE layers the statistics keep, in order.
      placement::PlacementToProto(
          placement::WithAllLayers(r.table, stats_.layers(), worker_.model().num_hidden_layers()),
          request->mutable_placement());
    }
    if (!stream->Write(m)) {
      why = "the worker link closed";
      r.done.set_value(grpc::Status(grpc::StatusCode::UNAVAILABLE, why));
      return false;
    }
    // Reading experts from the checkpoint can take far longer than a step.
    auto reply = await(options_.step_timeout * 10, "rebalance");
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
      std::lock_guard<std::mutex> lock(mu_);
      *worker_.mutable_placement() = request->placement();
      stats_.ClearWindow();
      stats_.AddRebalance({stats_.steps(), r.response.experts_moved(), done.bytes_loaded(), done.seconds(),
                          r.response.imbalance_before(), r.response.imbalance_after()});
      steps_since_rebalance_ = 0;
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
    if (stopping_) {
      v1::internal::CoordinatorMessage bye;
      bye.mutable_shutdown();
      stream->Write(bye);  // a job that no longer listens learns it from the closed link
      return finish("the coordinator is shutting down");
    }
    {
      std::lock_guard<std::mutex> lock(inbox_mu);
      if (closed) return finish("the worker link closed");
    }
    std::shared_ptr<Rebalancing> asked;
    {
      std::lock_guard<std::mutex> lock(rebalance_mu_);
      asked = std::move(pending_);
      pending_.reset();
    }
    if (asked && !rebalance(*asked)) return finish(why);
    if (!scheduler_->NextStep(message.mutable_step())) {
      scheduler_->WaitForWork(std::chrono::milliseconds(100));
      continue;
    }
    const auto sent = Clock::now();
    if (!stream->Write(message)) return finish("the worker link closed");
    auto reply = await(options_.step_timeout, "step");
    if (!reply) return finish(why);
    if (reply->has_error()) return finish("the worker job failed: " + reply->error());
    if (!reply->has_result()) return finish("the worker sent something other than a step result");
    if (const Status s = scheduler_->Complete(reply->result()); !s.ok()) return finish(s.message());
    if (metrics_) {
      metrics_->StepCompleted(std::chrono::duration<double>(Clock::now() - sent).count(),
                             message.step().sequences_size());
    }
    bool automatic = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      stats_.Add(reply->result());
      automatic = options_.rebalance_every > 0 && ++steps_since_rebalance_ >= options_.rebalance_every;
      if (automatic) steps_since_rebalance_ = 0;
    }
    if (automatic) {
      auto plan = PlanRebalance(options_.redundant_slots_per_rank);
      if (plan.ok() && (*plan)->response.imbalance_before() > options_.rebalance_threshold &&
          (*plan)->response.experts_moved() > 0 &&
          (*plan)->response.imbalance_after() < (*plan)->response.imbalance_before()) {
        (*plan)->done.get_future();  // nobody waits on an automatic rebalance
        if (!rebalance(**plan)) return finish(why);
      }
    }
  }
}

}  // namespace epic::coordinator
