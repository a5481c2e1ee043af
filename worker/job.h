// The job this process runs in: a single process, or one rank of an mpirun job. The
// one place that knows whether the build has MPI.
#pragma once

#include <memory>

#include "common/status.h"
#include "parallel/communicator.h"

namespace epic {

class Job {
 public:
  // Joins the mpirun job that launched this process, if any (MPI is initialised here
  // and finalised when the Job is destroyed); otherwise a job of one rank.
  // FAILED_PRECONDITION when launched by mpirun but built without MPI.
  static StatusOr<std::unique_ptr<Job>> Join(int* argc, char*** argv);
  virtual ~Job() = default;

  // nullptr for a single process (the model then runs as a one-rank job).
  virtual parallel::Communicator* comm() = 0;
  // Ends the whole job with CODE: a rank that fails must not leave its peers waiting
  // in a collective (MPI_Abort in an mpirun job; exit otherwise).
  [[noreturn]] virtual void Abort(int code) = 0;
  // The communicator over device buffers that --device cuda uses in a job of several
  // ranks: NCCL on the GPU numbered by this rank's place among the ranks of its host
  // (modulo the GPUs it sees), made on first use. FAILED_PRECONDITION for a single
  // process or a build without NCCL.
  virtual StatusOr<parallel::Communicator*> DeviceComm();

  int rank() { return comm() ? comm()->rank() : 0; }
  int size() { return comm() ? comm()->size() : 1; }
};

// Whether the environment says mpirun (or another MPI launcher) started this process
// as one of several ranks.
bool LaunchedAsMpiRank();

}  // namespace epic
