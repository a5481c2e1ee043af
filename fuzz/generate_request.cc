// A client's GenerateRequest (a serialized epic.v1.GenerateRequest) from the input, as
// the gRPC Generate handler takes it (Generation::Start: the prompt form, stop strings,
// tokenizing text and chats, then the scheduler's checks); a request it accepts is run to
// its end against a fabricated worker (fuzz_job.h), every step checked as the worker
// would, and must finish within its max_tokens.
#include <chrono>
#include <cstddef>
#include <cstdint>

#include "coordinator/generation.h"
#include "coordinator/scheduler.h"
#include "fuzz/fuzz_job.h"

namespace coord = epic::coordinator;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  epic::fuzz::QuietProtobuf();
  epic::v1::GenerateRequest request;
  if (!request.ParseFromArray(data, static_cast<int>(size))) return 0;
  const coord::SchedulerOptions options = epic::fuzz::JobSchedulerOptions();
  coord::Scheduler scheduler(options);
  scheduler.Attach(epic::fuzz::JobHello().model());
  auto started = coord::Generation::Start(&scheduler, epic::fuzz::JobText(), request);
  if (!started.ok()) {
    const epic::StatusCode code = started.status().code();
    EPIC_FUZZ_CHECK(code == epic::StatusCode::kInvalidArgument || code == epic::StatusCode::kFailedPrecondition);
    return 0;
  }
  coord::Generation& g = **started;
  const uint32_t salt = request.sampling().seed() % 2 == 0 ? 0 : static_cast<uint32_t>(request.sampling().seed());
  uint32_t tokens = 0;
  // Every prompt fits the context of 256 and the steps take 32 tokens: 8 prefill steps,
  // then one a token.
  for (int s = 0; s < 300 && !g.finished(); ++s) {
    epic::v1::internal::Step step;
    if (scheduler.NextStep(&step)) {
      epic::fuzz::CheckStep(step, options);
      EPIC_FUZZ_CHECK(scheduler.Complete(epic::fuzz::AnswerStep(step, salt)).ok());
    }
    while (auto response = g.Next(std::chrono::milliseconds(0))) {
      tokens += static_cast<uint32_t>(response->token_ids_size());
      if (g.finished() && g.status().ok()) EPIC_FUZZ_CHECK(response->finish_reason() != epic::v1::FINISH_REASON_UNSPECIFIED);
    }
  }
  EPIC_FUZZ_CHECK(g.finished());
  EPIC_FUZZ_CHECK(g.status().ok());
  EPIC_FUZZ_CHECK(tokens >= 1 && tokens <= request.max_tokens());
  return 0;
}
