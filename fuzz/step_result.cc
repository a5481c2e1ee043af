// A worker job's StepResult (a serialized epic.v1.internal.StepResult) from the input, as
// the coordinator's link takes it (WorkerSession::RunSteps): the scheduler checks it
// against the step in flight and applies it, the statistics add it, the requests' streams
// turn its tokens into text, and the load report and rebalance plan are built over it.
// The job is fuzz_job.h's; two requests run, one from text with stop strings, one from ids.
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "coordinator/generation.h"
#include "coordinator/load_report.h"
#include "coordinator/load_stats.h"
#include "coordinator/scheduler.h"
#include "coordinator/worker_session.h"
#include "fuzz/fuzz_job.h"
#include "placement/placement_proto.h"
#include "worker_link.pb.h"

namespace coord = epic::coordinator;


extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  epic::fuzz::QuietProtobuf();
  epic::v1::internal::StepResult result;
  if (!result.ParseFromArray(data, static_cast<int>(size))) return 0;
  const epic::v1::internal::Hello& hello = epic::fuzz::JobHello();

  const coord::SchedulerOptions options = epic::fuzz::JobSchedulerOptions();
  coord::Scheduler scheduler(options);
  scheduler.Attach(hello.model());
  coord::LoadStats stats;
  std::vector<int32_t> moe_layers;
  for (const epic::v1::LayerPlacement& lp : hello.placement()) moe_layers.push_back(lp.layer());
  stats.Reset(moe_layers, hello.model().n_routed_experts(), hello.ranks_size());

  std::vector<std::unique_ptr<coord::Generation>> generations;
  {
    epic::v1::GenerateRequest text;
    text.set_prompt("Hello, world! 你好");
    text.set_max_tokens(8);
    text.add_stop("lo");
    text.add_stop("\xe4\xbd");
    auto g = coord::Generation::Start(&scheduler, epic::fuzz::JobText(), text);
    EPIC_FUZZ_CHECK(g.ok());
    generations.push_back(std::move(g).value());
    epic::v1::GenerateRequest ids;
    for (int32_t id : {5, 300, 42, 7}) ids.add_prompt_token_ids(id);
    ids.set_max_tokens(4);
    ids.set_logprobs(true);
    ids.add_stop_token_ids(9);
    g = coord::Generation::Start(&scheduler, epic::fuzz::JobText(), ids);
    EPIC_FUZZ_CHECK(g.ok());
    generations.push_back(std::move(g).value());
  }

  // The input answers the first step; its copies (renumbered) answer the next ones, so
  // that the tokens it samples go on through the streams.
  for (int s = 0; s < 6; ++s) {
    epic::v1::internal::Step step;
    if (!scheduler.NextStep(&step)) break;
    epic::fuzz::CheckStep(step, options, /*check_tokens=*/false);
    if (s > 0) result.set_step_id(step.step_id());
    if (!scheduler.Complete(result).ok()) break;  // the link ends here
    stats.Add(result);
    for (auto& g : generations) {
      while (!g->finished() && g->Next(std::chrono::milliseconds(0))) {
      }
    }
  }

  // As FillLoadReport and PlanRebalance.
  coord::ReportInput in;
  stats.Fill(&in);
  in.model_type = hello.model().model_type();
  in.num_groups = static_cast<int>(hello.model().n_group());
  auto full = epic::placement::PlacementFromProto(hello.placement(), hello.model().num_hidden_layers(),
                                                  hello.ranks_size());
  EPIC_FUZZ_CHECK(full.ok());
  in.placement = epic::placement::MoeLayers(*full, nullptr);
  auto report = coord::BuildLoadReport(in);
  if (report.ok()) (void)report->dump();
  (void)coord::PlanFromReport(in);
  return 0;
}
