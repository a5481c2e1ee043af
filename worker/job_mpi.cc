#include <mpi.h>

#include <cstdio>
#include <cstdlib>

#include "parallel/communicator.h"
#include "worker/job.h"

namespace epic {
namespace {

class MpiJob final : public Job {
 public:
  MpiJob(int* argc, char*** argv) : session_(argc, argv) {}
  Status Start() {
    EPIC_ASSIGN_OR_RETURN(comm_, parallel::MakeMpiCommunicator());
    return OkStatus();
  }
  parallel::Communicator* comm() override { return comm_.get(); }
  [[noreturn]] void Abort(int code) override {
    std::fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, code);
    std::_Exit(code);  // MPI_Abort does not return; this satisfies [[noreturn]]
  }

 private:
  parallel::MpiSession session_;  // outlives the communicator
  std::unique_ptr<parallel::Communicator> comm_;
};

class SingleJob final : public Job {
 public:
  parallel::Communicator* comm() override { return nullptr; }
  [[noreturn]] void Abort(int code) override { std::exit(code); }
};

}  // namespace

StatusOr<std::unique_ptr<Job>> Job::Join(int* argc, char*** argv) {
  if (!LaunchedAsMpiRank()) return std::unique_ptr<Job>(new SingleJob());
  auto job = std::make_unique<MpiJob>(argc, argv);
  EPIC_RETURN_IF_ERROR(job->Start());
  return std::unique_ptr<Job>(std::move(job));
}

}  // namespace epic
