// A worker job's Hello (a serialized epic.v1.internal.Hello) from the input, through the
// coordinator's check (ValidateHello); a hello it accepts is then used as the session
// uses it: the statistics sized by it, one step of loads shaped like it, and the load
// report and rebalance plan built from those (WorkerSession's FillLoadReport and
// PlanRebalance, which any client may ask for once the job attached).
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "coordinator/load_report.h"
#include "coordinator/load_stats.h"
#include "coordinator/worker_session.h"
#include "fuzz/fuzz_job.h"
#include "placement/placement_proto.h"
#include "worker_link.pb.h"

namespace coord = epic::coordinator;
namespace placement = epic::placement;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  epic::fuzz::QuietProtobuf();
  epic::v1::internal::Hello hello;
  if (!hello.ParseFromArray(data, static_cast<int>(size))) return 0;
  if (!coord::ValidateHello(hello).ok()) return 0;
  const epic::v1::ModelSummary& model = hello.model();
  const int ranks = hello.ranks_size();

  // As Attach: the statistics over the MoE layers the placement names.
  coord::LoadStats stats;
  std::vector<int32_t> moe_layers;
  for (const epic::v1::LayerPlacement& lp : hello.placement()) moe_layers.push_back(lp.layer());
  stats.Reset(moe_layers, model.n_routed_experts(), ranks);

  // One step whose loads have the hello's shape, as its worker would send.
  epic::v1::internal::StepResult result;
  result.set_step_id(1);
  for (const int32_t layer : moe_layers) {
    epic::v1::LayerLoad* load = result.add_expert_tokens();
    load->set_layer(layer);
    for (int64_t e = 0; e < model.n_routed_experts(); ++e) load->add_expert_tokens(e % 7);
  }
  for (int r = 0; r < ranks; ++r) {
    epic::v1::internal::RankStepStats* rank = result.add_ranks();
    for (size_t l = 0; l < moe_layers.size(); ++l) rank->add_layer_tokens(static_cast<int64_t>(l + r));
    rank->set_dispatch_bytes_sent(1024);
    rank->set_dispatch_seconds(0.001);
  }
  stats.Add(result);

  // As ReportInputLocked and CurrentPlacementLocked.
  for (const int redundant : {0, 1}) {
    coord::ReportInput in;
    stats.Fill(&in);
    in.model_type = model.model_type();
    in.num_groups = static_cast<int>(std::max<int64_t>(1, model.n_group()));
    auto full = placement::PlacementFromProto(hello.placement(), model.num_hidden_layers(), ranks);
    EPIC_FUZZ_CHECK(full.ok());  // ValidateHello accepted it
    in.placement = placement::MoeLayers(*full, nullptr);
    in.redundant_slots_per_rank = redundant;
    auto report = coord::BuildLoadReport(in);
    if (report.ok()) (void)report->dump();
    auto plan = coord::PlanFromReport(in);
    if (plan.ok() && !plan->placement.empty()) {
      // As the link sends a rebalance: the plan among all layers, as the proto.
      epic::v1::internal::Rebalance rebalance;
      placement::PlacementToProto(placement::WithAllLayers(plan->placement, stats.layers(), model.num_hidden_layers()),
                                  rebalance.mutable_placement());
    }
  }
  return 0;
}
