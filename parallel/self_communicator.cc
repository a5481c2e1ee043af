#include "parallel/self_communicator.h"

#include <cstring>

namespace epic::parallel {
namespace {

class SelfCommunicator final : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  const char* backend() const override { return "self"; }

  Status AllReduceSum(const float* in, float* out, int64_t count) override {
    return Copy(in, out, count * static_cast<int64_t>(sizeof(float)), "AllReduceSum");
  }
  Status ReduceScatterSum(const float* in, float* out, std::span<const int64_t> counts) override {
    EPIC_RETURN_IF_ERROR(CheckOne(counts, "ReduceScatterSum"));
    return Copy(in, out, counts[0] * static_cast<int64_t>(sizeof(float)), "ReduceScatterSum");
  }
  Status AllGather(const void* in, void* out, std::span<const int64_t> bytes) override {
    EPIC_RETURN_IF_ERROR(CheckOne(bytes, "AllGather"));
    return Copy(in, out, bytes[0], "AllGather");
  }
  Status AllToAllV(const void* send, std::span<const int64_t> send_bytes, void* recv,
                   std::span<const int64_t> recv_bytes) override {
    EPIC_RETURN_IF_ERROR(CheckOne(send_bytes, "AllToAllV"));
    EPIC_RETURN_IF_ERROR(CheckOne(recv_bytes, "AllToAllV"));
    if (send_bytes[0] != recv_bytes[0]) {
      return InvalidArgumentError("rank 0: AllToAllV: sends " + std::to_string(send_bytes[0]) +
                                  " bytes to itself but expects " + std::to_string(recv_bytes[0]));
    }
    return Copy(send, recv, send_bytes[0], "AllToAllV");
  }
  Status AllToAllRows(const void* x, int64_t row_bytes, std::span<const int32_t> rows,
                      std::span<const int64_t> send_rows, void* recv,
                      std::span<const int64_t> recv_rows) override {
    EPIC_RETURN_IF_ERROR(CheckOne(send_rows, "AllToAllRows"));
    EPIC_RETURN_IF_ERROR(CheckOne(recv_rows, "AllToAllRows"));
    if (send_rows[0] != recv_rows[0] || static_cast<int64_t>(rows.size()) != send_rows[0]) {
      return InvalidArgumentError("rank 0: AllToAllRows: row counts disagree");
    }
    const auto* in = static_cast<const std::byte*>(x);
    auto* out = static_cast<std::byte*>(recv);
    for (size_t i = 0; i < rows.size(); ++i) {
      std::memcpy(out + static_cast<int64_t>(i) * row_bytes, in + rows[i] * row_bytes,
                  static_cast<size_t>(row_bytes));
    }
    return OkStatus();
  }
  Status ExchangeCounts(std::span<const int64_t> send, std::span<int64_t> recv) override {
    if (send.size() != 1 || recv.size() != 1) {
      return InvalidArgumentError("rank 0: ExchangeCounts: spans must hold one entry per rank (1)");
    }
    recv[0] = send[0];
    return OkStatus();
  }
  Status Broadcast(void*, int64_t, int root) override {
    return root == 0 ? OkStatus() : InvalidArgumentError("rank 0: Broadcast: root must be 0 of 1");
  }
  Status Send(const void*, int64_t, int, int) override {
    return UnimplementedError("rank 0: Send: a job of one rank has no peer");
  }
  Status Recv(void*, int64_t, int, int) override {
    return UnimplementedError("rank 0: Recv: a job of one rank has no peer");
  }
  Status Barrier() override { return OkStatus(); }

 private:
  static Status CheckOne(std::span<const int64_t> counts, const char* op) {
    if (counts.size() != 1 || counts[0] < 0) {
      return InvalidArgumentError(std::string("rank 0: ") + op + ": counts must hold one entry >= 0");
    }
    return OkStatus();
  }
  static Status Copy(const void* in, void* out, int64_t bytes, const char*) {
    if (in != out && bytes > 0) std::memmove(out, in, static_cast<size_t>(bytes));
    return OkStatus();
  }
};

}  // namespace

std::unique_ptr<Communicator> MakeSelfCommunicator() { return std::make_unique<SelfCommunicator>(); }

}  // namespace epic::parallel
