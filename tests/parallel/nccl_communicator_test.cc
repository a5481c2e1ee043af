// The NCCL communicator on device buffers, under mpirun, one rank per GPU. Without a
// GPU (or with fewer GPUs than ranks) every test reports SKIPPED, never passed.
#include <cuda_runtime.h>

#include <vector>

#include <gtest/gtest.h>

#include "parallel/communicator.h"
#include "parallel/nccl_communicator.h"

namespace epic::parallel {
namespace {

class NcclCommunicatorTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto mpi = MakeMpiCommunicator();
    ASSERT_TRUE(mpi.ok()) << mpi.status().ToString();
    mpi_ = std::move(*mpi);
    int devices = 0;
    if (cudaGetDeviceCount(&devices) != cudaSuccess || devices < mpi_->size()) {
      GTEST_SKIP() << "needs one GPU a rank: " << devices << " GPU(s) for " << mpi_->size() << " rank(s)";
    }
    auto nccl = MakeNcclCommunicator(*mpi_, mpi_->rank(), WatchdogOptions{std::chrono::seconds(60)});
    ASSERT_TRUE(nccl.ok()) << nccl.status().ToString();
    comm_ = std::move(*nccl);
  }

  template <typename T>
  T* Device(const std::vector<T>& host) {
    void* p = nullptr;
    EXPECT_EQ(cudaMalloc(&p, host.size() * sizeof(T) + 1), cudaSuccess);
    EXPECT_EQ(cudaMemcpy(p, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
    buffers_.push_back(p);
    return static_cast<T*>(p);
  }
  template <typename T>
  std::vector<T> Host(const T* device, size_t n) {
    std::vector<T> v(n);
    EXPECT_EQ(cudaMemcpy(v.data(), device, n * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
    return v;
  }
  void TearDown() override {
    for (void* p : buffers_) cudaFree(p);
  }

  std::unique_ptr<Communicator> mpi_;
  std::unique_ptr<Communicator> comm_;
  std::vector<void*> buffers_;
};

TEST_F(NcclCommunicatorTest, AllReduceAndBroadcast) {
  const int size = comm_->size(), me = comm_->rank();
  std::vector<float> v(1000);
  for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<float>((me + 1) * (i % 7));
  float* d = Device(v);
  ASSERT_TRUE(comm_->AllReduceSum(d, d, 1000).ok());
  const std::vector<float> sum = Host(d, 1000);
  for (size_t i = 0; i < sum.size(); ++i) ASSERT_EQ(sum[i], static_cast<float>(size * (size + 1) / 2 * (i % 7)));
  std::vector<float> b(16, static_cast<float>(me));
  float* db = Device(b);
  ASSERT_TRUE(comm_->Broadcast(db, 16 * sizeof(float), size - 1).ok());
  for (float x : Host(db, 16)) ASSERT_EQ(x, static_cast<float>(size - 1));
}

TEST_F(NcclCommunicatorTest, UnevenAllToAllVAndCounts) {
  const int size = comm_->size(), me = comm_->rank();
  std::vector<int64_t> send_bytes(size), recv_bytes(size);
  for (int r = 0; r < size; ++r) {
    send_bytes[r] = (me * 3 + r) % 4 * 8;  // some blocks empty
    recv_bytes[r] = (r * 3 + me) % 4 * 8;
  }
  std::vector<int64_t> exchanged(size);
  ASSERT_TRUE(comm_->ExchangeCounts(send_bytes, exchanged).ok());
  EXPECT_EQ(exchanged, recv_bytes);
  std::vector<uint8_t> send, want;
  for (int r = 0; r < size; ++r) {
    for (int64_t i = 0; i < send_bytes[r]; ++i) send.push_back(static_cast<uint8_t>(me * 31 + r * 7 + i));
    for (int64_t i = 0; i < recv_bytes[r]; ++i) want.push_back(static_cast<uint8_t>(r * 31 + me * 7 + i));
  }
  uint8_t* ds = Device(send);
  uint8_t* dr = Device(std::vector<uint8_t>(want.size() + 1, 0));
  ASSERT_TRUE(comm_->AllToAllV(ds, send_bytes, dr, recv_bytes).ok());
  EXPECT_EQ(Host(dr, want.size()), want);
}

}  // namespace
}  // namespace epic::parallel
