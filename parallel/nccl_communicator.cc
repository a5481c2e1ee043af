#include "parallel/nccl_communicator.h"

#include <cuda_runtime.h>
#include <nccl.h>

#include <chrono>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "kernels/cuda/ops.h"

namespace epic::parallel {
namespace {

using Clock = std::chrono::steady_clock;

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(int rank, int size, int device, std::chrono::milliseconds timeout)
      : rank_(rank), size_(size), device_(device), timeout_(timeout) {}

  ~NcclCommunicator() override {
    if (comm_ != nullptr && !aborted_) {  // an aborted communicator is already torn down
      ncclCommFinalize(comm_);
      (void)WaitForComm("ncclCommFinalize");
      if (!aborted_) ncclCommDestroy(comm_);  // a finalize that timed out aborted it
    }
    if (scratch_ != nullptr) cudaFree(scratch_);
    if (staging_ != nullptr) cudaFree(staging_);
    if (indices_ != nullptr) cudaFree(indices_);
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }

  Status Init(const ncclUniqueId& id) {
    EPIC_RETURN_IF_ERROR(Cuda("Init", "cudaSetDevice", cudaSetDevice(device_)));
    EPIC_RETURN_IF_ERROR(Cuda("Init", "cudaStreamCreate", cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking)));
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;  // so that a stuck peer can be given up on (ncclCommAbort)
    const ncclResult_t r = ncclCommInitRankConfig(&comm_, size_, id, rank_, &config);
    if (r != ncclSuccess && r != ncclInProgress) return Nccl("Init", "ncclCommInitRankConfig", r);
    return WaitForComm("ncclCommInitRankConfig");
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const char* backend() const override { return "nccl"; }

  Status AllReduceSum(const float* in, float* out, int64_t count) override {
    return Run("AllReduceSum", [&] {
      return ncclAllReduce(in, out, static_cast<size_t>(count), ncclFloat, ncclSum, comm_, stream_);
    });
  }

  // Uneven blocks: one reduce per block, rooted at the rank that keeps it, grouped.
  Status ReduceScatterSum(const float* in, float* out, std::span<const int64_t> counts) override {
    EPIC_RETURN_IF_ERROR(CheckPerRank("ReduceScatterSum", counts.size()));
    return Run("ReduceScatterSum", [&] {
      ncclGroupStart();
      int64_t offset = 0;
      for (int r = 0; r < size_; ++r) {
        ncclReduce(in + offset, r == rank_ ? out : nullptr, static_cast<size_t>(counts[r]), ncclFloat, ncclSum, r,
                   comm_, stream_);
        offset += counts[r];
      }
      return ncclGroupEnd();
    });
  }

  // Uneven blocks: one broadcast per root, grouped.
  Status AllGather(const void* in, void* out, std::span<const int64_t> bytes) override {
    EPIC_RETURN_IF_ERROR(CheckPerRank("AllGather", bytes.size()));
    return Run("AllGather", [&] {
      ncclGroupStart();
      int64_t offset = 0;
      for (int r = 0; r < size_; ++r) {
        ncclBroadcast(r == rank_ ? in : nullptr, static_cast<char*>(out) + offset, static_cast<size_t>(bytes[r]),
                      ncclChar, r, comm_, stream_);
        offset += bytes[r];
      }
      return ncclGroupEnd();
    });
  }

  Status AllToAllV(const void* send, std::span<const int64_t> send_bytes, void* recv,
                   std::span<const int64_t> recv_bytes) override {
    EPIC_RETURN_IF_ERROR(CheckPerRank("AllToAllV", send_bytes.size()));
    EPIC_RETURN_IF_ERROR(CheckPerRank("AllToAllV", recv_bytes.size()));
    return Run("AllToAllV", [&] { return SendRecvAll(send, send_bytes, recv, recv_bytes); });
  }

  // Rows are gathered on the device into a staging buffer first (one kernel).
  Status AllToAllRows(const void* x, int64_t row_bytes, std::span<const int32_t> rows,
                      std::span<const int64_t> send_rows, void* recv,
                      std::span<const int64_t> recv_rows) override {
    EPIC_RETURN_IF_ERROR(CheckPerRank("AllToAllRows", send_rows.size()));
    EPIC_RETURN_IF_ERROR(CheckPerRank("AllToAllRows", recv_rows.size()));
    const int64_t bytes = static_cast<int64_t>(rows.size()) * row_bytes;
    EPIC_RETURN_IF_ERROR(Staging("AllToAllRows", bytes));
    // The row indices to the device, then one gather kernel on the communicator's stream.
    const int64_t index_bytes = static_cast<int64_t>(rows.size() * sizeof(int32_t));
    if (index_bytes > index_bytes_) {
      if (indices_ != nullptr) cudaFree(indices_);
      indices_ = nullptr;
      index_bytes_ = 0;
      EPIC_RETURN_IF_ERROR(Cuda("AllToAllRows", "cudaMalloc", cudaMalloc(&indices_, static_cast<size_t>(index_bytes))));
      index_bytes_ = index_bytes;
    }
    if (!rows.empty()) {
      EPIC_RETURN_IF_ERROR(Cuda("AllToAllRows", "cudaMemcpyAsync",
                                cudaMemcpyAsync(indices_, rows.data(), static_cast<size_t>(index_bytes),
                                                cudaMemcpyHostToDevice, stream_)));
      EPIC_RETURN_IF_ERROR(
          cuda::GatherRowBytes(x, row_bytes, indices_, static_cast<int64_t>(rows.size()), staging_, stream_));
    }
    std::vector<int64_t> send_bytes(static_cast<size_t>(size_)), recv_bytes(static_cast<size_t>(size_));
    for (int r = 0; r < size_; ++r) {
      send_bytes[r] = send_rows[r] * row_bytes;
      recv_bytes[r] = recv_rows[r] * row_bytes;
    }
    return Run("AllToAllRows", [&] { return SendRecvAll(staging_, send_bytes, recv, recv_bytes); });
  }

  Status ExchangeCounts(std::span<const int64_t> send, std::span<int64_t> recv) override {
    EPIC_RETURN_IF_ERROR(CheckPerRank("ExchangeCounts", send.size()));
    EPIC_RETURN_IF_ERROR(CheckPerRank("ExchangeCounts", recv.size()));
    const size_t bytes = static_cast<size_t>(size_) * sizeof(int64_t);
    if (scratch_ == nullptr) {
      EPIC_RETURN_IF_ERROR(Cuda("ExchangeCounts", "cudaMalloc", cudaMalloc(&scratch_, 2 * bytes)));
    }
    int64_t* d_send = scratch_;
    int64_t* d_recv = scratch_ + size_;
    EPIC_RETURN_IF_ERROR(Cuda("ExchangeCounts", "cudaMemcpyAsync",
                              cudaMemcpyAsync(d_send, send.data(), bytes, cudaMemcpyHostToDevice, stream_)));
    EPIC_RETURN_IF_ERROR(Run("ExchangeCounts", [&] {
      ncclGroupStart();
      for (int r = 0; r < size_; ++r) {
        ncclSend(d_send + r, sizeof(int64_t), ncclChar, r, comm_, stream_);
        ncclRecv(d_recv + r, sizeof(int64_t), ncclChar, r, comm_, stream_);
      }
      return ncclGroupEnd();
    }));
    EPIC_RETURN_IF_ERROR(Cuda("ExchangeCounts", "cudaMemcpyAsync",
                              cudaMemcpyAsync(recv.data(), d_recv, bytes, cudaMemcpyDeviceToHost, stream_)));
    return Wait("ExchangeCounts");
  }

  Status Broadcast(void* data, int64_t bytes, int root) override {
    if (root < 0 || root >= size_) return Invalid("Broadcast", "root " + std::to_string(root) + " is not a rank");
    return Run("Broadcast", [&] {
      return ncclBroadcast(data, data, static_cast<size_t>(bytes), ncclChar, root, comm_, stream_);
    });
  }
  Status Send(const void* data, int64_t bytes, int peer, int) override {
    return Run("Send", [&] { return ncclSend(data, static_cast<size_t>(bytes), ncclChar, peer, comm_, stream_); });
  }
  Status Recv(void* data, int64_t bytes, int peer, int) override {
    return Run("Recv", [&] { return ncclRecv(data, static_cast<size_t>(bytes), ncclChar, peer, comm_, stream_); });
  }
  Status Barrier() override {
    if (scratch_ == nullptr) {
      EPIC_RETURN_IF_ERROR(Cuda("Barrier", "cudaMalloc",
                                cudaMalloc(&scratch_, 2 * static_cast<size_t>(size_) * sizeof(int64_t))));
    }
    float* one = reinterpret_cast<float*>(scratch_);
    return Run("Barrier", [&] { return ncclAllReduce(one, one, 1, ncclFloat, ncclSum, comm_, stream_); });
  }

 private:
  std::string Prefix(const char* op) const { return "rank " + std::to_string(rank_) + ": " + op + ": "; }
  Status Invalid(const char* op, const std::string& what) const { return InvalidArgumentError(Prefix(op) + what); }
  Status CheckPerRank(const char* op, size_t entries) const {
    if (entries == static_cast<size_t>(size_)) return OkStatus();
    return Invalid(op, "counts have " + std::to_string(entries) + " entries; expected " +
                           std::to_string(size_) + " (one per rank)");
  }
  Status Cuda(const char* op, const char* fn, cudaError_t e) const {
    if (e == cudaSuccess) return OkStatus();
    return InternalError(Prefix(op) + fn + ": " + cudaGetErrorName(e) + ": " + cudaGetErrorString(e));
  }
  Status Nccl(const char* op, const char* fn, ncclResult_t r) const {
    const char* last = comm_ != nullptr ? ncclGetLastError(comm_) : "";
    return InternalError(Prefix(op) + fn + ": " + ncclGetErrorString(r) + (last && *last ? std::string(": ") + last : ""));
  }

  Status SendRecvAll(const void* send, std::span<const int64_t> send_bytes, void* recv,
                     std::span<const int64_t> recv_bytes) {
    ncclGroupStart();
    int64_t so = 0, ro = 0;
    for (int r = 0; r < size_; ++r) {
      if (send_bytes[r] > 0) {
        ncclSend(static_cast<const char*>(send) + so, static_cast<size_t>(send_bytes[r]), ncclChar, r, comm_, stream_);
      }
      if (recv_bytes[r] > 0) {
        ncclRecv(static_cast<char*>(recv) + ro, static_cast<size_t>(recv_bytes[r]), ncclChar, r, comm_, stream_);
      }
      so += send_bytes[r];
      ro += recv_bytes[r];
    }
    const ncclResult_t result = ncclGroupEnd();
    return result == ncclSuccess || result == ncclInProgress ? OkStatus() : Nccl("AllToAllV", "ncclGroupEnd", result);
  }

  template <typename Enqueue>
  Status Run(const char* op, Enqueue enqueue) {
    if (aborted_) return FailedPreconditionError(Prefix(op) + "the communicator was aborted after an earlier failure");
    EPIC_RETURN_IF_ERROR(Cuda(op, "cudaSetDevice", cudaSetDevice(device_)));
    const auto r = enqueue();
    if constexpr (std::is_same_v<decltype(r), const Status>) {
      EPIC_RETURN_IF_ERROR(r);
    } else {
      if (r != ncclSuccess && r != ncclInProgress) return Nccl(op, "enqueue", r);
    }
    return Wait(op);
  }

  // Waits for the stream, polling NCCL's asynchronous error, under the timeout.
  Status Wait(const char* op) {
    const auto start = Clock::now();
    // A non-blocking communicator may return from the call while it is still setting up
    // (ncclInProgress): until that ends, the work is not on the stream yet, and an empty
    // stream would look finished.
    while (true) {
      ncclResult_t state = ncclSuccess;
      ncclCommGetAsyncError(comm_, &state);
      if (state == ncclSuccess) break;
      if (state != ncclInProgress) {
        Abort();
        return Nccl(op, "asynchronous error", state);
      }
      if (Clock::now() - start > timeout_) return TimedOut(op);
      std::this_thread::yield();
    }
    while (true) {
      const cudaError_t q = cudaStreamQuery(stream_);
      if (q == cudaSuccess) return OkStatus();
      if (q != cudaErrorNotReady) return Cuda(op, "cudaStreamQuery", q);
      ncclResult_t async = ncclSuccess;
      ncclCommGetAsyncError(comm_, &async);
      if (async != ncclSuccess && async != ncclInProgress) {
        Abort();
        return Nccl(op, "asynchronous error", async);
      }
      if (Clock::now() - start > timeout_) return TimedOut(op);
      std::this_thread::sleep_for(std::chrono::microseconds(20));
    }
  }

  Status TimedOut(const char* op) {
    Abort();
    return InternalError(Prefix(op) + "not completed after " +
                         std::to_string(std::chrono::duration<double>(timeout_).count()) +
                         " s; a peer is dead or stuck; the NCCL communicator was aborted");
  }

  Status WaitForComm(const char* what) {
    const auto start = Clock::now();
    ncclResult_t state = ncclInProgress;
    while (state == ncclInProgress) {
      ncclCommGetAsyncError(comm_, &state);
      if (Clock::now() - start > timeout_) {
        Abort();
        return InternalError(Prefix("Init") + what + " not completed after the timeout; aborted");
      }
      std::this_thread::yield();
    }
    return state == ncclSuccess ? OkStatus() : Nccl("Init", what, state);
  }

  Status Staging(const char* op, int64_t bytes) {
    if (bytes <= staging_bytes_) return OkStatus();
    if (staging_ != nullptr) cudaFree(staging_);
    staging_ = nullptr;
    staging_bytes_ = 0;
    EPIC_RETURN_IF_ERROR(Cuda(op, "cudaMalloc", cudaMalloc(&staging_, static_cast<size_t>(bytes))));
    staging_bytes_ = bytes;
    return OkStatus();
  }

  void Abort() {
    if (!aborted_ && comm_ != nullptr) ncclCommAbort(comm_);
    aborted_ = true;
  }

  const int rank_;
  const int size_;
  const int device_;
  const std::chrono::milliseconds timeout_;
  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;
  int64_t* scratch_ = nullptr;
  char* staging_ = nullptr;
  int64_t staging_bytes_ = 0;
  int32_t* indices_ = nullptr;  // AllToAllRows' row indices on the device
  int64_t index_bytes_ = 0;
  bool aborted_ = false;
};

}  // namespace

StatusOr<std::unique_ptr<Communicator>> MakeNcclCommunicator(Communicator& bootstrap, int device,
                                                             const WatchdogOptions& watchdog) {
  int devices = 0;
  const cudaError_t e = cudaGetDeviceCount(&devices);
  if (e != cudaSuccess || devices == 0) {
    return FailedPreconditionError("rank " + std::to_string(bootstrap.rank()) + ": NCCL: no usable CUDA device" +
                                   (e != cudaSuccess ? std::string(": ") + cudaGetErrorString(e) : std::string()));
  }
  if (device < 0 || device >= devices) {
    return InvalidArgumentError("rank " + std::to_string(bootstrap.rank()) + ": NCCL: device " +
                                std::to_string(device) + " does not exist (" + std::to_string(devices) + " visible)");
  }
  ncclUniqueId id{};
  if (bootstrap.rank() == 0) {
    const ncclResult_t r = ncclGetUniqueId(&id);
    if (r != ncclSuccess) return InternalError(std::string("rank 0: ncclGetUniqueId: ") + ncclGetErrorString(r));
  }
  EPIC_RETURN_IF_ERROR(bootstrap.Broadcast(&id, sizeof id, 0));
  auto comm = std::make_unique<NcclCommunicator>(bootstrap.rank(), bootstrap.size(), device, watchdog.timeout);
  EPIC_RETURN_IF_ERROR(comm->Init(id));
  return std::unique_ptr<Communicator>(std::move(comm));
}

}  // namespace epic::parallel
