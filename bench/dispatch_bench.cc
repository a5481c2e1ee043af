// MoE dispatch + combine against a plain MPI_Alltoallv of the same byte counts, under
// mpirun. The peer moves the same rows (hidden states out, outputs back) with no
// planning, packing or routing metadata: the ratio is what epic's two-phase exchange
// costs over the bare transport. Target <= 1.2.
//   mpirun -np N dispatch_bench [--tokens 256] [--hidden 5120] [--experts 160] [--top-k 6]
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>
#include <set>
#include <vector>

#include <CLI/CLI.hpp>

#include "bench/timing.h"
#include "parallel/communicator.h"
#include "parallel/dispatch.h"
#include "parallel/expert_placement.h"
#include "parallel/moe_exchange.h"

namespace {

using epic::bench::Clock;
using epic::bench::Median;
using epic::bench::Since;

}  // namespace

int main(int argc, char** argv) {
  epic::parallel::MpiSession session(&argc, &argv);
  CLI::App app{"dispatch_bench: MoE dispatch+combine vs a plain MPI_Alltoallv of the same bytes"};
  int64_t tokens = 256, hidden = 5120, experts = 160, top_k = 6;
  int repeats = 20;
  bool detail = false;
  app.add_option("--tokens", tokens, "tokens per rank")->capture_default_str();
  app.add_option("--hidden", hidden, "hidden size")->capture_default_str();
  app.add_option("--experts", experts, "routed experts")->capture_default_str();
  app.add_option("--top-k", top_k, "experts per token")->capture_default_str();
  app.add_option("--repeats", repeats, "timed repetitions (median)")->capture_default_str();
  app.add_flag("--detail", detail, "also print rank 0's dispatch and combine times beside each bare exchange");
  CLI11_PARSE(app, argc, argv);

  auto comm_or = epic::parallel::MakeMpiCommunicator();
  if (!comm_or.ok()) {
    std::fprintf(stderr, "dispatch_bench: %s\n", comm_or.status().ToString().c_str());
    return 1;
  }
  epic::parallel::Communicator& comm = **comm_or;
  const int rank = comm.rank(), ranks = comm.size();
  const auto placement = epic::parallel::ExpertPlacement::Contiguous(1, {true}, experts, ranks);

  std::mt19937 rng(7 + rank);
  std::vector<float> x(static_cast<size_t>(tokens * hidden), 0.5f), y(x.size());
  std::vector<int32_t> ids;
  std::vector<float> weights;
  for (int64_t t = 0; t < tokens; ++t) {
    std::set<int32_t> chosen;
    while (static_cast<int64_t>(chosen.size()) < top_k) chosen.insert(static_cast<int32_t>(rng() % experts));
    for (int32_t e : chosen) {
      ids.push_back(e);
      weights.push_back(0.1f);
    }
  }

  std::vector<double> epic_s, mpi_s, dispatch_s, combine_s, first_s, second_s;
  std::vector<float> out, send, recv, back;
  epic::parallel::HostRowSpace space;  // reused, as the model does
  epic::parallel::MoeExchange exchange(&comm, &space, rank);
  for (int r = 0; r < repeats + 2; ++r) {
    // epic: plan, dispatch, (experts skipped: the output is the input), combine.
    MPI_Barrier(MPI_COMM_WORLD);
    auto t0 = Clock::now();
    const auto plan = epic::parallel::PlanDispatch(placement, 0, rank, ids.data(), weights.data(), tokens,
                                                   top_k, rank * tokens);
    epic::parallel::ExchangeStats ds, cs;
    auto handle = exchange.Dispatch(plan, x.data(), hidden);
    if (!handle.ok()) return 1;
    ds = (*handle)->stats;
    if (!exchange.Combine(**handle, (*handle)->rows, hidden, y.data(), &cs).ok()) return 1;
    if (r >= 2) {
      dispatch_s.push_back(ds.seconds);
      combine_s.push_back(cs.seconds);
    }
    double mine = Since(t0), slowest = 0;
    MPI_Allreduce(&mine, &slowest, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    if (r >= 2) epic_s.push_back(slowest);

    // The peer: the same row counts each way, exchanged with bare MPI_Alltoallv.
    std::vector<int> sc(ranks), rc(ranks), sd(ranks), rd(ranks);
    std::vector<int64_t> rows_in(static_cast<size_t>(ranks));
    MPI_Alltoall(plan.send_rows.data(), 1, MPI_INT64_T, rows_in.data(), 1, MPI_INT64_T, MPI_COMM_WORLD);
    int64_t so = 0, ro = 0;
    for (int p = 0; p < ranks; ++p) {
      sc[p] = static_cast<int>(plan.send_rows[p] * hidden);
      rc[p] = static_cast<int>(rows_in[p] * hidden);
      sd[p] = static_cast<int>(so);
      rd[p] = static_cast<int>(ro);
      so += sc[p];
      ro += rc[p];
    }
    send.resize(static_cast<size_t>(so));
    recv.resize(static_cast<size_t>(ro));
    back.resize(static_cast<size_t>(so));
    MPI_Barrier(MPI_COMM_WORLD);
    t0 = Clock::now();
    MPI_Alltoallv(send.data(), sc.data(), sd.data(), MPI_FLOAT, recv.data(), rc.data(), rd.data(), MPI_FLOAT,
                  MPI_COMM_WORLD);
    const double half = Since(t0);
    MPI_Alltoallv(recv.data(), rc.data(), rd.data(), MPI_FLOAT, back.data(), sc.data(), sd.data(), MPI_FLOAT,
                  MPI_COMM_WORLD);
    if (r >= 2) {
      first_s.push_back(half);
      second_s.push_back(Since(t0) - half);
    }
    mine = Since(t0);
    MPI_Allreduce(&mine, &slowest, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    if (r >= 2) mpi_s.push_back(slowest);
  }
  if (rank == 0 && detail) {
    std::printf("rank 0: dispatch %.3f ms, combine %.3f ms; bare out %.3f ms, back %.3f ms\n",
                Median(dispatch_s) * 1e3, Median(combine_s) * 1e3, Median(first_s) * 1e3, Median(second_s) * 1e3);
  }
  if (rank == 0) {
    const double e = Median(epic_s), m = Median(mpi_s);
    std::printf("dispatch_bench: %d ranks, %lld tokens a rank, hidden %lld, %lld experts top-%lld: "
                "epic dispatch+combine %.3f ms, plain MPI_Alltoallv of the same rows %.3f ms; "
                "ratio %.2f (target <= 1.2)\n",
                ranks, static_cast<long long>(tokens), static_cast<long long>(hidden),
                static_cast<long long>(experts), static_cast<long long>(top_k), e * 1e3, m * 1e3, e / m);
  }
  return 0;
}
