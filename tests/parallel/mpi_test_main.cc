// GoogleTest main for tests that run as mpirun jobs: every rank runs every test.
// Rank 0 prints the usual log; other ranks print only their failures, each line
// prefixed with the rank. The verdict is reduced across ranks, so a test that fails
// on one rank only makes every rank, and so the job, exit non-zero.
#include <mpi.h>

#include <cstdio>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "parallel/communicator.h"

namespace {

// The failures of a rank other than 0, and nothing else.
class RankFailurePrinter : public testing::EmptyTestEventListener {
 public:
  explicit RankFailurePrinter(int rank) : rank_(rank) {}

  void OnTestPartResult(const testing::TestPartResult& result) override {
    if (!result.failed()) return;
    std::string line = "[rank " + std::to_string(rank_) + "] " +
                       (result.file_name() ? result.file_name() : "unknown file") + ":" +
                       std::to_string(result.line_number()) + ": Failure\n" + result.message() + "\n";
    std::fwrite(line.data(), 1, line.size(), stdout);
    std::fflush(stdout);
  }
  void OnTestEnd(const testing::TestInfo& info) override {
    if (!info.result()->Failed()) return;
    std::printf("[rank %d] [  FAILED  ] %s.%s\n", rank_, info.test_suite_name(), info.name());
    std::fflush(stdout);
  }

 private:
  const int rank_;
};

}  // namespace

int main(int argc, char** argv) {
  epic::parallel::MpiSession mpi(&argc, &argv);
  testing::InitGoogleTest(&argc, argv);
  if (mpi.rank() != 0) {
    testing::TestEventListeners& listeners = testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new RankFailurePrinter(mpi.rank()));
  }
  const int failed = RUN_ALL_TESTS() != 0 ? 1 : 0;

  std::vector<int> failed_on(static_cast<size_t>(mpi.size()));
  MPI_Gather(&failed, 1, MPI_INT, failed_on.data(), 1, MPI_INT, 0, MPI_COMM_WORLD);
  int any_failed = 0;
  MPI_Allreduce(&failed, &any_failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  if (mpi.rank() == 0 && any_failed) {
    std::string ranks;
    for (int r = 0; r < mpi.size(); ++r) {
      if (failed_on[r]) ranks += (ranks.empty() ? "" : ", ") + std::to_string(r);
    }
    std::printf("epic: tests failed on rank(s) %s of %d\n", ranks.c_str(), mpi.size());
    std::fflush(stdout);
  }
  return any_failed ? 1 : 0;
}
