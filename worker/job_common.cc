#include <cstdlib>

#include "worker/job.h"

namespace epic {

StatusOr<parallel::Communicator*> Job::DeviceComm() {
  return FailedPreconditionError(size() > 1 ? "this build has no NCCL: the ranks cannot exchange device buffers"
                                            : "a single process has no device communicator");
}

bool LaunchedAsMpiRank() {
  // Open MPI, MPICH/Hydra and PMIx launchers each set one of these.
  for (const char* var : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"}) {
    if (std::getenv(var) != nullptr) return true;
  }
  return false;
}

}  // namespace epic
