// Communicator: the collectives and point-to-point transfers the distributed step
// needs, behind one interface with an MPI implementation (host buffers; the CPU path)
// and, later, an NCCL one (device buffers). Every failure comes back as a Status
// naming the rank and the operation. No operation waits forever: a watchdog ends the
// process when one has not finished within the timeout, so that mpirun tears the
// whole job down instead of hanging on a dead or stuck peer.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "common/status.h"

namespace epic::parallel {

class Communicator {
 public:
  virtual ~Communicator() = default;

  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual const char* backend() const = 0;  // "mpi", "nccl"

  // out[i] = sum over ranks of in[i]; IN may equal OUT.
  virtual Status AllReduceSum(const float* in, float* out, int64_t count) = 0;
  // IN holds sum(counts) values, block r of counts[r] values destined for rank r;
  // OUT receives this rank's block summed over ranks. counts.size() == size().
  virtual Status ReduceScatterSum(const float* in, float* out, std::span<const int64_t> counts) = 0;
  // Concatenates each rank's IN (bytes[r] bytes from rank r) into OUT in rank order.
  // bytes.size() == size(); IN holds bytes[rank()] bytes.
  virtual Status AllGather(const void* in, void* out, std::span<const int64_t> bytes) = 0;
  // SEND holds size() blocks, send_bytes[r] bytes for rank r, in rank order; RECV
  // receives recv_bytes[r] bytes from each rank r, in rank order. Zero-sized blocks
  // are allowed. The counts must agree pairwise (see ExchangeCounts).
  virtual Status AllToAllV(const void* send, std::span<const int64_t> send_bytes, void* recv,
                           std::span<const int64_t> recv_bytes) = 0;
  // AllToAllV of rows gathered in place: to rank r go the rows of X listed in
  // ROWS[sum(send_rows[<r]) .. + send_rows[r]) (row i is X + i * row_bytes), so no
  // packed copy is made; RECV receives recv_rows[r] rows from each rank r, contiguous
  // in rank order.
  virtual Status AllToAllRows(const void* x, int64_t row_bytes, std::span<const int32_t> rows,
                              std::span<const int64_t> send_rows, void* recv,
                              std::span<const int64_t> recv_rows) = 0;
  // AllToAllRows that also carries TAIL_BYTES of TAIL with each row: the i-th listed
  // row's tail is TAIL + i * TAIL_BYTES, and the tails arrive contiguously in TAIL_RECV
  // in the order of RECV's rows. One exchange instead of two (rows, then their tails).
  virtual Status AllToAllRowsWithTail(const void* x, int64_t row_bytes, std::span<const int32_t> rows,
                                      std::span<const int64_t> send_rows, void* recv,
                                      std::span<const int64_t> recv_rows, const void* tail, int64_t tail_bytes,
                                      void* tail_recv);
  // recv[r] = what rank r passed as send[rank()]: the counts step before AllToAllV.
  virtual Status ExchangeCounts(std::span<const int64_t> send, std::span<int64_t> recv) = 0;
  virtual Status Broadcast(void* data, int64_t bytes, int root) = 0;
  // A Broadcast whose root may stay silent for long (a worker waiting for its next
  // step): ranks wait without keeping a core busy. Every rank must call this form,
  // not Broadcast, for the same message. For small messages.
  virtual Status AwaitBroadcast(void* data, int64_t bytes, int root) { return Broadcast(data, bytes, root); }
  virtual Status Send(const void* data, int64_t bytes, int peer, int tag) = 0;
  virtual Status Recv(void* data, int64_t bytes, int peer, int tag) = 0;
  virtual Status Barrier() = 0;
};

// Every rank's VALUES, however many each has, one rank's after another; COUNTS (optional)
// gets how many came from each rank. Two collectives: the counts, then the values.
template <typename T>
StatusOr<std::vector<T>> AllGatherVarying(Communicator& comm, const std::vector<T>& values,
                                          std::vector<int64_t>* counts = nullptr) {
  const int ranks = comm.size();
  const int64_t mine = static_cast<int64_t>(values.size());
  std::vector<int64_t> each(static_cast<size_t>(ranks));
  EPIC_RETURN_IF_ERROR(comm.AllGather(&mine, each.data(), std::vector<int64_t>(ranks, sizeof mine)));
  std::vector<int64_t> bytes(static_cast<size_t>(ranks));
  int64_t total = 0;
  for (int r = 0; r < ranks; ++r) {
    bytes[r] = each[r] * static_cast<int64_t>(sizeof(T));
    total += each[r];
  }
  std::vector<T> all(static_cast<size_t>(std::max<int64_t>(total, 1)));
  EPIC_RETURN_IF_ERROR(comm.AllGather(values.data(), all.data(), bytes));
  all.resize(static_cast<size_t>(total));
  if (counts != nullptr) *counts = std::move(each);
  return all;
}

// Bounds every operation of a communicator in time.
struct WatchdogOptions {
  std::chrono::milliseconds timeout{std::chrono::minutes(5)};
};

// The MPI communicator over MPI_COMM_WORLD. REQUIRES: MPI is initialised (MpiSession).
// MPI errors are returned, not fatal (MPI_ERRORS_RETURN).
StatusOr<std::unique_ptr<Communicator>> MakeMpiCommunicator(const WatchdogOptions& watchdog = {});

// Initialises MPI for the process's lifetime (MPI_Init_thread, FUNNELED) and
// finalises it on destruction. One per process, in main.
class MpiSession {
 public:
  MpiSession(int* argc, char*** argv);
  ~MpiSession();
  MpiSession(const MpiSession&) = delete;
  MpiSession& operator=(const MpiSession&) = delete;
  int rank() const { return rank_; }
  int size() const { return size_; }

 private:
  int rank_ = 0;
  int size_ = 1;
};

}  // namespace epic::parallel
