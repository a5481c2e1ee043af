#include <cstdlib>

#include "worker/job.h"

namespace epic {
namespace {

class SingleJob final : public Job {
 public:
  parallel::Communicator* comm() override { return nullptr; }
  [[noreturn]] void Abort(int code) override { std::exit(code); }
};

}  // namespace

StatusOr<std::unique_ptr<Job>> Job::Join(int*, char***) {
  if (LaunchedAsMpiRank()) {
    return FailedPreconditionError(
        "launched by mpirun, but this build has no MPI (configured with EPIC_WITH_SERVING=OFF)");
  }
  return std::unique_ptr<Job>(new SingleJob());
}

}  // namespace epic
