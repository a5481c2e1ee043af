// Checks that a stuck MPI job ends instead of hanging: run with two ranks or more.
// Rank 0 waits in Recv for a message rank 1 never sends (rank 1 sleeps for 30 s
// instead). The watchdog, with a 500 ms timeout, must end rank 0 with its message on
// stderr and exit code 3, and mpirun must then end rank 1 and fail the job within
// seconds. The job succeeding, or running for the full 30 s, is the failure.
#include <chrono>
#include <cstdio>
#include <thread>

#include "parallel/communicator.h"

int main(int argc, char** argv) {
  epic::parallel::MpiSession mpi(&argc, &argv);
  if (mpi.size() < 2) {
    std::fprintf(stderr, "watchdog_probe: needs at least two ranks\n");
    return 2;
  }
  auto made = epic::parallel::MakeMpiCommunicator({std::chrono::milliseconds(500)});
  if (!made.ok()) {
    std::fprintf(stderr, "watchdog_probe: %s\n", made.status().ToString().c_str());
    return 2;
  }
  epic::parallel::Communicator& comm = **made;
  if (comm.rank() == 0) {
    char byte = 0;
    const epic::Status s = comm.Recv(&byte, 1, 1, 0);
    std::fprintf(stderr, "watchdog_probe: rank 0: Recv returned (%s); the watchdog did not fire\n",
                 s.ToString().c_str());
  } else if (comm.rank() == 1) {
    std::this_thread::sleep_for(std::chrono::seconds(30));
    std::fprintf(stderr, "watchdog_probe: rank 1 slept 30 s and was not ended\n");
  }
  // Reached only when the watchdog failed: exit 0 so that the ctest case fails.
  return 0;
}
