// A worker job serving a coordinator: rank 0 holds the link, every rank runs each
// step together. Step execution is separate from the link so that tests can drive it.
#pragma once

#include <chrono>
#include <memory>
#include <string>

#include "common/status.h"
#include "epic.pb.h"
#include "worker/latent_cache.h"
#include "worker/model.h"
#include "worker_link.pb.h"

namespace epic {

// The model and placement as the coordinator and clients see them.
v1::ModelSummary SummarizeModel(const ModelConfig& config);
void DescribePlacement(const parallel::ExpertPlacement& placement,
                       google::protobuf::RepeatedPtrField<v1::LayerPlacement>* out);

// Runs one step on every rank (the same STEP everywhere) and, on rank 0, fills RESULT
// with the sampled tokens and the step's routed-token counts (summed over ranks).
// INVALID_ARGUMENT when the step does not fit the model or the cache (a coordinator
// bug or a stranger): checked before any row is written.
Status RunStep(Model& model, LatentCache& cache, const v1::internal::Step& step, v1::internal::StepResult* result);

struct WorkerOptions {
  std::string coordinator;             // HOST:PORT
  std::string secret;                  // shared with the coordinator
  std::string tls_ca;                  // PEM of the CA to trust; empty: plaintext
  std::chrono::seconds connect_timeout{60};
  // Idle ranks hear from rank 0 this often, so that a quiet cluster never trips the
  // collective watchdog while a hung step still does.
  std::chrono::milliseconds heartbeat{1000};
};

// Serves steps until the coordinator link closes (then an error: the launcher
// relaunches the job, and it attaches again). Every rank calls it.
Status ServeCoordinator(Model& model, const WorkerOptions& options, const std::string& device);

}  // namespace epic
