#include <mpi.h>

#include <cstdio>
#include <cstdlib>

#include "parallel/communicator.h"
#include "worker/job.h"

#ifdef EPIC_HAVE_NCCL
#include "kernels/cuda/device.h"
#include "parallel/nccl_communicator.h"
#endif

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

#ifdef EPIC_HAVE_NCCL
  StatusOr<parallel::Communicator*> DeviceComm() override {
    if (device_comm_) return device_comm_.get();
    // This rank's place among the ranks sharing its host picks its GPU.
    // (MPI_COMM_WORLD's default error handler ends the job on a failing call.)
    MPI_Comm node = MPI_COMM_NULL;
    int local = 0, on_host = 0;
    MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node);
    MPI_Comm_rank(node, &local);
    MPI_Comm_size(node, &on_host);
    MPI_Comm_free(&node);
    EPIC_ASSIGN_OR_RETURN(const int devices, cuda::DeviceCount());
    // NCCL needs a GPU of its own for every rank.
    if (on_host > devices) {
      return FailedPreconditionError(std::to_string(on_host) + " ranks on this host but " + std::to_string(devices) +
                                     " GPU(s) visible: --device cuda needs one GPU per rank");
    }
    EPIC_ASSIGN_OR_RETURN(device_comm_, parallel::MakeNcclCommunicator(*comm_, local));
    return device_comm_.get();
  }
#endif
  [[noreturn]] void Abort(int code) override {
    std::fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, code);
    std::_Exit(code);  // MPI_Abort does not return; this satisfies [[noreturn]]
  }

 private:
  parallel::MpiSession session_;  // outlives the communicator
  std::unique_ptr<parallel::Communicator> comm_;
  std::unique_ptr<parallel::Communicator> device_comm_;  // destroyed before comm_, its bootstrap
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
