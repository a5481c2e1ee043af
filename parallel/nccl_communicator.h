// The NCCL communicator: the same operations over device buffers, one rank per GPU.
// Built when CUDA is found. Every pointer passed is device memory on the
// communicator's device, except ExchangeCounts' host spans. Operations are enqueued on
// the communicator's stream and waited for under the watchdog's timeout: while
// waiting, NCCL's asynchronous error is polled, and a peer that never arrives makes
// the operation fail after the timeout with the communicator aborted
// (ncclCommAbort), instead of hanging.
#pragma once

#include <memory>

#include "common/status.h"
#include "parallel/communicator.h"

namespace epic::parallel {

// Bootstraps NCCL over BOOTSTRAP (rank 0's unique id is broadcast; the job's ranks
// and size are BOOTSTRAP's) on CUDA device DEVICE.
StatusOr<std::unique_ptr<Communicator>> MakeNcclCommunicator(Communicator& bootstrap, int device,
                                                             const WatchdogOptions& watchdog = {});

}  // namespace epic::parallel
