// What the job's MoE layers did over some steps, gathered in one collective: for every
// rank and MoE layer, the tokens each of its expert slots ran and the layer's dispatch
// and combine exchanges. The worker's step results (serve.cc) and epic-run's reports
// read this one record.
#pragma once

#include <cstdint>
#include <vector>

#include "common/status.h"
#include "parallel/dispatch.h"
#include "parallel/expert_placement.h"
#include "worker/model.h"

namespace epic {

struct JobStepStats {
  std::vector<int64_t> moe_layers;                                // the placement's MoE layers
  std::vector<std::vector<std::vector<int64_t>>> slot_tokens;     // [rank][moe layer][slot]
  std::vector<std::vector<parallel::ExchangeStats>> dispatch;     // [rank][moe layer]
  std::vector<std::vector<parallel::ExchangeStats>> combine;      // [rank][moe layer]

  // [moe layer][logical expert]: the job's tokens per expert, from the slots' tokens.
  std::vector<std::vector<int64_t>> ExpertTokens(const parallel::ExpertPlacement& placement,
                                                 int64_t num_experts) const;
};

// Gathers COUNTS (this rank's, as Model::Forward accumulates them) from every rank of
// MODEL's job onto every rank. Every rank calls it.
StatusOr<JobStepStats> GatherStepStats(Model& model, const ExpertCounts& counts);

}  // namespace epic
