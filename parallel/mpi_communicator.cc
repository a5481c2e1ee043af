// The MPI communicator (host buffers) and the MPI session. Every call goes to a
// duplicate of MPI_COMM_WORLD with MPI_ERRORS_RETURN, so that MPI failures come back
// as Status values naming the rank and the operation, and library code cannot collide
// with the tags of whoever else uses MPI_COMM_WORLD. A watchdog thread per
// communicator ends the process when one MPI call runs past the timeout: mpirun then
// tears the whole job down instead of every rank waiting forever on a dead peer.
#include <mpi.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "parallel/communicator.h"

namespace epic::parallel {
namespace {

using Clock = std::chrono::steady_clock;

// MPI counts and displacements are int. Larger transfers are split into chunks of
// at most this many elements where the operation allows it (all-reduce, broadcast,
// send/recv); elsewhere they are refused with INVALID_ARGUMENT.
constexpr int64_t kMaxMpiCount = INT_MAX;

// Calls chunk(offset, n) over [0, total) in pieces that MPI's int counts can express;
// once with n == 0 when total is 0, so that every rank still takes part.
template <typename F>
Status InChunks(int64_t total, F&& chunk) {
  int64_t offset = 0;
  do {
    const int n = static_cast<int>(std::min(total - offset, kMaxMpiCount));
    EPIC_RETURN_IF_ERROR(chunk(offset, n));
    offset += n;
  } while (offset < total);
  return OkStatus();
}

std::string MpiErrorText(int code) {
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  if (MPI_Error_string(code, text, &length) != MPI_SUCCESS) return "MPI error " + std::to_string(code);
  return std::string(text, static_cast<size_t>(length));
}

// Ends the process when one MPI call has been running longer than the timeout.
// Only the owning thread calls Begin/End (MPI_THREAD_FUNNELED), so the two atomics
// need no lock; the watchdog thread only reads them.
class Watchdog {
 public:
  Watchdog(int rank, std::chrono::milliseconds timeout)
      : rank_(rank), timeout_(timeout), thread_([this] { Run(); }) {}

  ~Watchdog() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    wake_.notify_one();
    thread_.join();
  }

  Watchdog(const Watchdog&) = delete;
  Watchdog& operator=(const Watchdog&) = delete;

  // The start time is stored before the name, and read after it: the watchdog can
  // see a later start than the call it names (it then waits a little longer), never
  // an earlier one, so it cannot end a process whose call is within its time.
  void Begin(const char* mpi_function) {
    start_ns_.store(Clock::now().time_since_epoch().count());
    operation_.store(mpi_function);
  }
  void End() { operation_.store(nullptr); }

 private:
  void Run() {
    const auto poll = std::max(std::chrono::milliseconds(1),
                               std::min(std::chrono::milliseconds(50), timeout_ / 4));
    std::unique_lock<std::mutex> lock(mutex_);
    while (!wake_.wait_for(lock, poll, [this] { return stop_; })) {
      const char* operation = operation_.load();
      if (operation == nullptr) continue;
      const Clock::time_point start{Clock::duration(start_ns_.load())};
      const auto elapsed = Clock::now() - start;
      if (elapsed < timeout_) continue;
      // One write, so that lines from several ranks do not interleave.
      char line[320];
      const int n = std::snprintf(
          line, sizeof(line),
          "epic: rank %d: %s has not completed after %.1f s; a peer is dead or stuck; "
          "ending this process so mpirun ends the job\n",
          rank_, operation, std::chrono::duration<double>(elapsed).count());
      std::fwrite(line, 1, static_cast<size_t>(n > 0 ? std::min<int>(n, sizeof(line) - 1) : 0),
                  stderr);
      std::fflush(stderr);
      std::_Exit(3);
    }
  }

  const int rank_;
  const std::chrono::milliseconds timeout_;
  std::atomic<const char*> operation_{nullptr};
  std::atomic<Clock::rep> start_ns_{0};
  std::mutex mutex_;
  std::condition_variable wake_;
  bool stop_ = false;
  std::thread thread_;  // last: starts once everything above is constructed
};

class MpiCommunicator final : public Communicator {
 public:
  // REQUIRES: comm is a communicator with MPI_ERRORS_RETURN, owned from here on.
  MpiCommunicator(MPI_Comm comm, int rank, int size, int tag_upper_bound,
                  std::unique_ptr<Watchdog> watchdog)
      : comm_(comm), rank_(rank), size_(size), tag_upper_bound_(tag_upper_bound),
        watchdog_(std::move(watchdog)) {}

  ~MpiCommunicator() override {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized) MPI_Comm_free(&comm_);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const char* backend() const override { return "mpi"; }

  Status AllReduceSum(const float* in, float* out, int64_t count) override {
    constexpr const char* kOp = "AllReduceSum";
    EPIC_RETURN_IF_ERROR(CheckCount(kOp, "count", count));
    EPIC_RETURN_IF_ERROR(CheckBuffer(kOp, "in", in, count));
    EPIC_RETURN_IF_ERROR(CheckBuffer(kOp, "out", out, count));
    return InChunks(count, [&](int64_t offset, int n) {
      const void* send = in == out ? MPI_IN_PLACE : static_cast<const void*>(in + offset);
      return Call(kOp, "MPI_Allreduce", [&] {
        return MPI_Allreduce(send, out + offset, n, MPI_FLOAT, MPI_SUM, comm_);
      });
    });
  }

  Status ReduceScatterSum(const float* in, float* out, std::span<const int64_t> counts) override {
    constexpr const char* kOp = "ReduceScatterSum";
    EPIC_RETURN_IF_ERROR(CheckPerRank(kOp, "counts", counts.size()));
    int64_t total = 0;
    std::vector<int> mpi_counts(counts.size());
    for (int r = 0; r < size_; ++r) {
      EPIC_RETURN_IF_ERROR(CheckCount(kOp, "counts[" + std::to_string(r) + "]", counts[r]));
      total += counts[r];
      mpi_counts[r] = static_cast<int>(std::min(counts[r], kMaxMpiCount));
    }
    // Open MPI sums the counts into an int internally; the whole input must fit.
    if (total > kMaxMpiCount) {
      return Invalid(kOp, std::to_string(total) + " values in all exceeds MPI's int count limit (" +
                              std::to_string(kMaxMpiCount) + ")");
    }
    EPIC_RETURN_IF_ERROR(CheckBuffer(kOp, "in", in, total));
    EPIC_RETURN_IF_ERROR(CheckBuffer(kOp, "out", out, counts[rank_]));
    // IN == OUT: MPI's in-place form takes the input from OUT and leaves this rank's
    // block at its start, which is what the caller asked for.
    const void* send = in == out ? MPI_IN_PLACE : static_cast<const void*>(in);
    return Call(kOp, "MPI_Reduce_scatter", [&] {
      return MPI_Reduce_scatter(send, out, mpi_counts.data(), MPI_FLOAT, MPI_SUM, comm_);
    });
  }

  Status AllGather(const void* in, void* out, std::span<const int64_t> bytes) override {
    constexpr const char* kOp = "AllGather";
    std::vector<int> counts, displs;
    int64_t total = 0;
    EPIC_RETURN_IF_ERROR(Layout(kOp, "bytes", bytes, &counts, &displs, &total));
    EPIC_RETURN_IF_ERROR(CheckBuffer(kOp, "in", in, bytes[rank_]));
    EPIC_RETURN_IF_ERROR(CheckBuffer(kOp, "out", out, total));
    // IN already in place (this rank's block of OUT): MPI forbids aliased buffers,
    // and MPI_IN_PLACE says exactly this.
    const bool in_place = in == static_cast<const char*>(out) + displs[rank_];
    const void* send = in_place ? MPI_IN_PLACE : in;
    return Call(kOp, "MPI_Allgatherv", [&] {
      return MPI_Allgatherv(send, counts[rank_], MPI_BYTE, out, counts.data(), displs.data(),
                            MPI_BYTE, comm_);
    });
  }

  Status AllToAllV(const void* send, std::span<const int64_t> send_bytes, void* recv,
                   std::span<const int64_t> recv_bytes) override {
    constexpr const char* kOp = "AllToAllV";
    std::vector<int> send_counts, send_displs, recv_counts, recv_displs;
    int64_t send_total = 0, recv_total = 0;
    EPIC_RETURN_IF_ERROR(Layout(kOp, "send_bytes", send_bytes, &send_counts, &send_displs, &send_total));
    EPIC_RETURN_IF_ERROR(Layout(kOp, "recv_bytes", recv_bytes, &recv_counts, &recv_displs, &recv_total));
    EPIC_RETURN_IF_ERROR(CheckBuffer(kOp, "send", send, send_total));
    EPIC_RETURN_IF_ERROR(CheckBuffer(kOp, "recv", recv, recv_total));
    return Call(kOp, "MPI_Alltoallv", [&] {
      return MPI_Alltoallv(send, send_counts.data(), send_displs.data(), MPI_BYTE, recv,
                           recv_counts.data(), recv_displs.data(), MPI_BYTE, comm_);
    });
  }

  Status AllToAllRows(const void* x, int64_t row_bytes, std::span<const int32_t> rows,
                      std::span<const int64_t> send_rows, void* recv,
                      std::span<const int64_t> recv_rows) override {
    return ExchangeRows("AllToAllRows", x, row_bytes, rows, send_rows, recv, recv_rows, nullptr, 0, nullptr);
  }

  Status AllToAllRowsWithTail(const void* x, int64_t row_bytes, std::span<const int32_t> rows,
                              std::span<const int64_t> send_rows, void* recv, std::span<const int64_t> recv_rows,
                              const void* tail, int64_t tail_bytes, void* tail_recv) override {
    return ExchangeRows("AllToAllRowsWithTail", x, row_bytes, rows, send_rows, recv, recv_rows, tail, tail_bytes,
                        tail_recv);
  }

  Status ExchangeCounts(std::span<const int64_t> send, std::span<int64_t> recv) override {
    constexpr const char* kOp = "ExchangeCounts";
    EPIC_RETURN_IF_ERROR(CheckPerRank(kOp, "send", send.size()));
    EPIC_RETURN_IF_ERROR(CheckPerRank(kOp, "recv", recv.size()));
    return Call(kOp, "MPI_Alltoall", [&] {
      return MPI_Alltoall(send.data(), 1, MPI_INT64_T, recv.data(), 1, MPI_INT64_T, comm_);
    });
  }

  Status Broadcast(void* data, int64_t bytes, int root) override {
    constexpr const char* kOp = "Broadcast";
    EPIC_RETURN_IF_ERROR(CheckCount(kOp, "bytes", bytes));
    EPIC_RETURN_IF_ERROR(CheckRank(kOp, "root", root));
    EPIC_RETURN_IF_ERROR(CheckBuffer(kOp, "data", data, bytes));
    char* p = static_cast<char*>(data);
    return InChunks(bytes, [&](int64_t offset, int n) {
      return Call(kOp, "MPI_Bcast", [&] { return MPI_Bcast(p + offset, n, MPI_BYTE, root, comm_); });
    });
  }

  Status AwaitBroadcast(void* data, int64_t bytes, int root) override {
    constexpr const char* kOp = "AwaitBroadcast";
    EPIC_RETURN_IF_ERROR(CheckCount(kOp, "bytes", bytes));
    EPIC_RETURN_IF_ERROR(CheckRank(kOp, "root", root));
    EPIC_RETURN_IF_ERROR(CheckBuffer(kOp, "data", data, bytes));
    if (bytes > kMaxMpiCount) return Invalid(kOp, "is for small messages, not " + std::to_string(bytes) + " bytes");
    // A blocking MPI_Bcast spins its core until the root speaks; polling a nonblocking
    // one with growing sleeps after a while costs at most ~1 ms after a long silence.
    return Call(kOp, "MPI_Ibcast", [&] {
      MPI_Request request;
      int rc = MPI_Ibcast(data, static_cast<int>(bytes), MPI_BYTE, root, comm_, &request);
      if (rc != MPI_SUCCESS) return rc;
      // While serving, the next step follows within a few milliseconds: spin that long.
      const auto spin_until = std::chrono::steady_clock::now() + std::chrono::milliseconds(5);
      auto sleep = std::chrono::microseconds(25);
      for (;;) {
        int done = 0;
        rc = MPI_Test(&request, &done, MPI_STATUS_IGNORE);
        if (rc != MPI_SUCCESS || done) return rc;
        if (std::chrono::steady_clock::now() < spin_until) continue;
        std::this_thread::sleep_for(sleep);
        sleep = std::min(std::chrono::microseconds(1000), sleep * 2);
      }
    });
  }

  Status Send(const void* data, int64_t bytes, int peer, int tag) override {
    constexpr const char* kOp = "Send";
    EPIC_RETURN_IF_ERROR(CheckPointToPoint(kOp, data, bytes, peer, tag));
    const char* p = static_cast<const char*>(data);
    // Chunks of one message travel in order: MPI does not overtake messages with the
    // same source, tag and communicator.
    return InChunks(bytes, [&](int64_t offset, int n) {
      return Call(kOp, "MPI_Send", [&] { return MPI_Send(p + offset, n, MPI_BYTE, peer, tag, comm_); });
    });
  }

  Status Recv(void* data, int64_t bytes, int peer, int tag) override {
    constexpr const char* kOp = "Recv";
    EPIC_RETURN_IF_ERROR(CheckPointToPoint(kOp, data, bytes, peer, tag));
    char* p = static_cast<char*>(data);
    return InChunks(bytes, [&](int64_t offset, int n) -> Status {
      MPI_Status status;
      EPIC_RETURN_IF_ERROR(Call(kOp, "MPI_Recv", [&] {
        return MPI_Recv(p + offset, n, MPI_BYTE, peer, tag, comm_, &status);
      }));
      // A longer message fails above (MPI_ERR_TRUNCATE); a shorter one would leave
      // the rest of DATA stale without any error from MPI.
      int received = 0;
      EPIC_RETURN_IF_ERROR(Call(kOp, "MPI_Get_count", [&] {
        return MPI_Get_count(&status, MPI_BYTE, &received);
      }));
      if (received != n) {
        return InternalError(Prefix(kOp) + "received " + std::to_string(offset + received) +
                             " bytes from rank " + std::to_string(peer) + " (tag " +
                             std::to_string(tag) + "), expected " + std::to_string(bytes));
      }
      return OkStatus();
    });
  }

  Status Barrier() override {
    return Call("Barrier", "MPI_Barrier", [&] { return MPI_Barrier(comm_); });
  }

 private:
  std::string Prefix(const char* op) const {
    return "rank " + std::to_string(rank_) + ": " + op + ": ";
  }
  Status Invalid(const char* op, const std::string& what) const {
    return InvalidArgumentError(Prefix(op) + what);
  }

  // Both row exchanges: rows picked out of X where they lie and, when TAIL_BYTES > 0,
  // each row's tail, in one MPI_Alltoallw.
  Status ExchangeRows(const char* op, const void* x, int64_t row_bytes, std::span<const int32_t> rows,
                      std::span<const int64_t> send_rows, void* recv, std::span<const int64_t> recv_rows,
                      const void* tail, int64_t tail_bytes, void* tail_recv) {
    EPIC_RETURN_IF_ERROR(CheckPerRank(op, "send_rows", send_rows.size()));
    EPIC_RETURN_IF_ERROR(CheckPerRank(op, "recv_rows", recv_rows.size()));
    EPIC_RETURN_IF_ERROR(CheckCount(op, "row_bytes", row_bytes));
    EPIC_RETURN_IF_ERROR(CheckCount(op, "tail_bytes", tail_bytes));
    if (row_bytes > kMaxMpiCount || tail_bytes > kMaxMpiCount) {
      return Invalid(op, "row_bytes or tail_bytes passes MPI's int count limit");
    }
    int64_t listed = 0, received = 0;
    for (int r = 0; r < size_; ++r) {
      EPIC_RETURN_IF_ERROR(CheckCount(op, "send_rows[" + std::to_string(r) + "]", send_rows[r]));
      EPIC_RETURN_IF_ERROR(CheckCount(op, "recv_rows[" + std::to_string(r) + "]", recv_rows[r]));
      listed += send_rows[r];
      received += recv_rows[r];
    }
    if (listed != static_cast<int64_t>(rows.size())) {
      return Invalid(op, "send_rows add up to " + std::to_string(listed) + " but " + std::to_string(rows.size()) +
                              " rows are listed");
    }
    if (received * std::max(row_bytes, tail_bytes) > kMaxMpiCount) {
      return Invalid(op, std::to_string(received) + " rows to receive pass MPI's int count limit");
    }
    EPIC_RETURN_IF_ERROR(CheckBuffer(op, "x", x, listed * row_bytes));
    EPIC_RETURN_IF_ERROR(CheckBuffer(op, "tail", tail, listed * tail_bytes));
    EPIC_RETURN_IF_ERROR(CheckBuffer(op, "recv", recv, received * row_bytes));
    EPIC_RETURN_IF_ERROR(CheckBuffer(op, "tail_recv", tail_recv, received * tail_bytes));

    // Absolute addresses (buffers at MPI_BOTTOM): to each peer one datatype naming its
    // rows where they lie in X and then its run of tails; from each peer one naming
    // where its rows and its tails land.
    auto address = [](const void* p) {
      MPI_Aint a;
      MPI_Get_address(p, &a);
      return a;
    };
    std::vector<MPI_Datatype> send_types(static_cast<size_t>(size_), MPI_BYTE);
    std::vector<MPI_Datatype> recv_types(static_cast<size_t>(size_), MPI_BYTE);
    std::vector<int> send_counts(static_cast<size_t>(size_), 0), recv_counts(static_cast<size_t>(size_), 0);
    std::vector<int> zeros(static_cast<size_t>(size_), 0);
    std::vector<int> lengths;
    std::vector<MPI_Aint> where;
    const char* xs = static_cast<const char*>(x);
    const char* ts = static_cast<const char*>(tail);
    char* rs = static_cast<char*>(recv);
    char* trs = static_cast<char*>(tail_recv);
    Status status;
    auto make = [&](MPI_Datatype* type) {
      status = Call(op, "MPI_Type_create_hindexed", [&] {
        return MPI_Type_create_hindexed(static_cast<int>(lengths.size()), lengths.data(), where.data(), MPI_BYTE, type);
      });
      if (status.ok()) status = Call(op, "MPI_Type_commit", [&] { return MPI_Type_commit(type); });
    };
    int64_t first = 0, landed = 0;
    for (int r = 0; r < size_ && status.ok(); ++r) {
      const int64_t n = send_rows[r];
      if (n > 0) {
        lengths.assign(static_cast<size_t>(n), static_cast<int>(row_bytes));
        where.resize(static_cast<size_t>(n));
        for (int64_t i = 0; i < n; ++i) where[i] = address(xs + static_cast<int64_t>(rows[first + i]) * row_bytes);
        if (tail_bytes > 0) {
          lengths.push_back(static_cast<int>(n * tail_bytes));
          where.push_back(address(ts + first * tail_bytes));
        }
        make(&send_types[r]);
        send_counts[r] = 1;
      }
      first += n;
      const int64_t m = recv_rows[r];
      if (m > 0 && status.ok()) {
        lengths = {static_cast<int>(m * row_bytes)};
        where = {address(rs + landed * row_bytes)};
        if (tail_bytes > 0) {
          lengths.push_back(static_cast<int>(m * tail_bytes));
          where.push_back(address(trs + landed * tail_bytes));
        }
        make(&recv_types[r]);
        recv_counts[r] = 1;
      }
      landed += m;
    }
    if (status.ok()) {
      status = Call(op, "MPI_Alltoallw", [&] {
        return MPI_Alltoallw(MPI_BOTTOM, send_counts.data(), zeros.data(), send_types.data(), MPI_BOTTOM,
                             recv_counts.data(), zeros.data(), recv_types.data(), comm_);
      });
    }
    for (auto* types : {&send_types, &recv_types}) {
      for (MPI_Datatype& t : *types) {
        if (t != MPI_BYTE) MPI_Type_free(&t);
      }
    }
    return status;
  }

  // Runs one MPI call under the watchdog; a failure names the rank, the operation,
  // the MPI function and MPI's own text.
  template <typename F>
  Status Call(const char* op, const char* mpi_function, F&& call) {
    watchdog_->Begin(mpi_function);
    const int rc = call();
    watchdog_->End();
    if (rc == MPI_SUCCESS) return OkStatus();
    return InternalError(Prefix(op) + mpi_function + ": " + MpiErrorText(rc));
  }

  Status CheckCount(const char* op, const std::string& name, int64_t count) const {
    if (count < 0) return Invalid(op, name + " is negative (" + std::to_string(count) + ")");
    return OkStatus();
  }
  Status CheckBuffer(const char* op, const char* name, const void* p, int64_t count) const {
    if (p == nullptr && count > 0) {
      return Invalid(op, std::string(name) + " is null but " + std::to_string(count) +
                             " elements are to be transferred");
    }
    return OkStatus();
  }
  Status CheckPerRank(const char* op, const char* name, size_t entries) const {
    if (entries != static_cast<size_t>(size_)) {
      return Invalid(op, std::string(name) + " has " + std::to_string(entries) +
                             " entries; expected " + std::to_string(size_) + " (one per rank)");
    }
    return OkStatus();
  }
  Status CheckRank(const char* op, const char* name, int r) const {
    if (r < 0 || r >= size_) {
      return Invalid(op, std::string(name) + " " + std::to_string(r) + " is not a rank (size " +
                             std::to_string(size_) + ")");
    }
    return OkStatus();
  }
  Status CheckPointToPoint(const char* op, const void* data, int64_t bytes, int peer, int tag) const {
    EPIC_RETURN_IF_ERROR(CheckCount(op, "bytes", bytes));
    EPIC_RETURN_IF_ERROR(CheckRank(op, "peer", peer));
    EPIC_RETURN_IF_ERROR(CheckBuffer(op, "data", data, bytes));
    if (tag < 0 || tag > tag_upper_bound_) {
      return Invalid(op, "tag " + std::to_string(tag) + " is outside [0, " +
                             std::to_string(tag_upper_bound_) + "]");
    }
    return OkStatus();
  }

  // Per-rank byte counts to MPI's int counts and displacements (packed, rank order).
  Status Layout(const char* op, const char* name, std::span<const int64_t> bytes,
                std::vector<int>* counts, std::vector<int>* displs, int64_t* total) const {
    EPIC_RETURN_IF_ERROR(CheckPerRank(op, name, bytes.size()));
    counts->resize(bytes.size());
    displs->resize(bytes.size());
    int64_t offset = 0;
    for (int r = 0; r < size_; ++r) {
      const std::string entry = std::string(name) + "[" + std::to_string(r) + "]";
      EPIC_RETURN_IF_ERROR(CheckCount(op, entry, bytes[r]));
      // The last block's end must fit too: MPI addresses blocks by int displacement.
      if (bytes[r] > kMaxMpiCount || offset + bytes[r] > kMaxMpiCount) {
        return Invalid(op, entry + " = " + std::to_string(bytes[r]) + " at offset " +
                               std::to_string(offset) + " passes MPI's int count limit (" +
                               std::to_string(kMaxMpiCount) + " bytes in all)");
      }
      (*counts)[r] = static_cast<int>(bytes[r]);
      (*displs)[r] = static_cast<int>(offset);
      offset += bytes[r];
    }
    *total = offset;
    return OkStatus();
  }

  MPI_Comm comm_;
  const int rank_;
  const int size_;
  const int tag_upper_bound_;
  std::unique_ptr<Watchdog> watchdog_;
};

}  // namespace

StatusOr<std::unique_ptr<Communicator>> MakeMpiCommunicator(const WatchdogOptions& watchdog) {
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (!initialized || finalized) {
    return FailedPreconditionError("MakeMpiCommunicator: MPI is not initialised (create an MpiSession first)");
  }
  if (watchdog.timeout <= std::chrono::milliseconds(0)) {
    return InvalidArgumentError("MakeMpiCommunicator: watchdog timeout must be positive, got " +
                                std::to_string(watchdog.timeout.count()) + " ms");
  }
  int rank = 0, size = 0;
  // MPI_COMM_WORLD keeps MPI_ERRORS_ARE_FATAL; these two cannot fail on it anyway.
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  const std::string prefix = "rank " + std::to_string(rank) + ": MakeMpiCommunicator: ";

  // MPI_Comm_dup is collective: it already runs under the watchdog.
  auto dog = std::make_unique<Watchdog>(rank, watchdog.timeout);
  MPI_Comm comm = MPI_COMM_NULL;
  dog->Begin("MPI_Comm_dup");
  int rc = MPI_Comm_dup(MPI_COMM_WORLD, &comm);
  dog->End();
  if (rc != MPI_SUCCESS) return InternalError(prefix + "MPI_Comm_dup: " + MpiErrorText(rc));
  rc = MPI_Comm_set_errhandler(comm, MPI_ERRORS_RETURN);
  if (rc != MPI_SUCCESS) {
    MPI_Comm_free(&comm);
    return InternalError(prefix + "MPI_Comm_set_errhandler: " + MpiErrorText(rc));
  }
  int* tag_ub = nullptr;
  int flag = 0;
  rc = MPI_Comm_get_attr(comm, MPI_TAG_UB, &tag_ub, &flag);
  if (rc != MPI_SUCCESS || !flag) {
    MPI_Comm_free(&comm);
    return InternalError(prefix + "MPI_Comm_get_attr(MPI_TAG_UB): " +
                         (rc != MPI_SUCCESS ? MpiErrorText(rc) : std::string("not set")));
  }
  return std::unique_ptr<Communicator>(
      std::make_unique<MpiCommunicator>(comm, rank, size, *tag_ub, std::move(dog)));
}

MpiSession::MpiSession(int* argc, char*** argv) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (initialized) {
    std::fprintf(stderr, "epic: MpiSession: MPI is already initialised; create one MpiSession per process\n");
    std::abort();
  }
  int provided = MPI_THREAD_SINGLE;
  const int rc = MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided);
  if (rc != MPI_SUCCESS) {
    std::fprintf(stderr, "epic: MpiSession: MPI_Init_thread failed: %s\n", MpiErrorText(rc).c_str());
    std::exit(1);
  }
  MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
  MPI_Comm_size(MPI_COMM_WORLD, &size_);
  // The communicators' watchdog threads never call MPI, which FUNNELED permits.
  if (provided < MPI_THREAD_FUNNELED) {
    std::fprintf(stderr,
                 "epic: rank %d: MPI provides thread level %d, below MPI_THREAD_FUNNELED (%d); "
                 "the watchdog threads need it\n",
                 rank_, provided, MPI_THREAD_FUNNELED);
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
}

MpiSession::~MpiSession() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) MPI_Finalize();
}

}  // namespace epic::parallel
