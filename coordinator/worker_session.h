// The coordinator's side of the worker link. A worker job attaches (WorkerLink.Attach)
// with the model, its ranks and the expert placement; the session then feeds it the
// scheduler's steps until it leaves or fails, keeps the job's expert statistics, and
// switches the placement between steps when a rebalance asks (or on its own, every
// --rebalance-every steps). The client API (server.cc) reads the job through it.
#pragma once

#include <atomic>
#include <functional>
#include <future>
#include <memory>
#include <mutex>
#include <optional>
#include <string>

#include <grpcpp/grpcpp.h>

#include "coordinator/load_report.h"
#include "coordinator/load_stats.h"
#include "coordinator/metrics.h"
#include "coordinator/scheduler.h"
#include "coordinator/server.h"
#include "epic.pb.h"
#include "worker_link.grpc.pb.h"

namespace epic::coordinator {

// The checks a job's hello passes before it may attach: every size and index the session
// and its reports are built from (model fields, ranks, the placement's layers and experts).
// INVALID_ARGUMENT naming the field. Attach calls it; exposed for fuzz/worker_hello.cc.
Status ValidateHello(const v1::internal::Hello& hello);

class WorkerSession final : public v1::internal::WorkerLink::Service {
 public:
  // ON_SERVING hears true when a job attaches and false when it leaves.
  WorkerSession(const ServerOptions& options, Scheduler* scheduler, Metrics* metrics,
                std::function<void(bool)> on_serving);

  grpc::Status Attach(
      grpc::ServerContext* ctx,
      grpc::ServerReaderWriter<v1::internal::CoordinatorMessage, v1::internal::WorkerMessage>* stream) override;

  // The attached job's model; nullopt while none is attached.
  std::optional<v1::ModelSummary> Model() const;
  // Whether a job is attached, how many have, and the job's model, ranks and placement.
  void FillModelInfo(v1::ModelInfo* info) const;
  // Expert tokens since the job attached and the report over the statistics window.
  grpc::Status FillLoadReport(v1::LoadReport* report) const;
  // Plans a placement from the statistics window and, unless a dry run, has the link
  // switch the job to it between steps; returns once the job has switched.
  grpc::Status Rebalance(const v1::RebalanceRequest* request, v1::RebalanceResponse* response);
  // The coordinator is stopping: no job may attach, and the attached one is let go.
  void Stop() { stopping_ = true; }

 private:
  // A rebalance waiting for the link thread, which applies it between steps.
  struct Rebalancing {
    placement::PlacementTable table;  // [moe layer][rank][experts]
    v1::RebalanceResponse response;
    std::promise<grpc::Status> done;
  };

  // What the attached job's latent cache holds, per token and in its budget (epic info).
  v1::CacheFootprint CacheFootprintLocked() const;
  // The current placement as a table over the MoE layers.
  placement::PlacementTable CurrentPlacementLocked() const;
  // The statistics window as the report and the planner read it, planned with REDUNDANT
  // replica slots per rank.
  ReportInput ReportInputLocked(int redundant) const;
  // A rebalance to PLAN's placement, planned over WINDOW_STEPS steps.
  static std::shared_ptr<Rebalancing> RebalancingOf(PlannedPlacement plan, int64_t window_steps);
  // What a rebalance would do now. FAILED_PRECONDITION without statistics.
  StatusOr<std::shared_ptr<Rebalancing>> PlanRebalance(int redundant);
  // A job of another size than the last one: a placement for it planned from the last
  // job's expert loads (IN, its statistics window), or nullptr when there is nothing to
  // plan from or nothing to move.
  std::shared_ptr<Rebalancing> PlanForNewSizeLocked(const ReportInput& last, int last_ranks);
  // Feeds steps to the attached job until it leaves or fails; returns why it ended.
  std::string RunSteps(grpc::ServerContext* ctx,
                       grpc::ServerReaderWriter<v1::internal::CoordinatorMessage, v1::internal::WorkerMessage>* stream);

  const ServerOptions options_;
  Scheduler* scheduler_;
  Metrics* metrics_;
  std::function<void(bool)> on_serving_;
  std::atomic<bool> stopping_{false};

  mutable std::mutex mu_;  // guards what follows
  bool attached_ = false;
  v1::internal::Hello worker_;  // the attached job's hello (secret cleared), placement kept current
  int64_t attachments_ = 0;
  LoadStats stats_;  // expert statistics since the job attached, and over the window
  int64_t steps_since_rebalance_ = 0;

  std::mutex rebalance_mu_;
  std::shared_ptr<Rebalancing> pending_;
  uint64_t next_rebalance_id_ = 1;
};

}  // namespace epic::coordinator
