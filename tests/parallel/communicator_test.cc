// The MPI communicator under mpirun (1, 2, 3, 4 and 8 ranks). Every value a rank
// receives is a function of (sender, receiver, index) that the receiver computes on
// its own, and the block sizes depend on sender and receiver: uneven, with empty
// blocks, a rank that sends nothing at all, a rank that receives nothing, and one
// block large enough to leave MPI's eager protocol. Buffers carry a guard tail that
// must come back untouched.
#include <mpi.h>

#include <chrono>
#include <climits>
#include <cstdint>
#include <cstring>
#include <ctime>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "parallel/communicator.h"

namespace epic::parallel {
namespace {

constexpr int kRounds = 3;
constexpr uint8_t kFill = 0xAA;   // receive buffers before the operation
constexpr uint8_t kGuard = 0x5C;  // the tail past the last block
constexpr int64_t kGuardBytes = 64;
constexpr int64_t kLarge = 300017;  // past the shared-memory eager limit (4 KiB)

// The byte a sender puts at INDEX of its block for RECEIVER.
uint8_t Byte(int sender, int receiver, int64_t index) {
  uint64_t x = (static_cast<uint64_t>(sender) << 48) ^ (static_cast<uint64_t>(receiver) << 32) ^
               static_cast<uint64_t>(index);
  x *= 0x9E3779B97F4A7C15ull;
  return static_cast<uint8_t>(x >> 56);
}

// Bytes SENDER sends RECEIVER in ROUND. Rank 1 sends nothing, rank 2 receives
// nothing; other blocks are uneven, some empty, one large in round 1.
int64_t PairBytes(int sender, int receiver, int size, int round) {
  if (size >= 2 && sender == 1) return 0;
  if (size >= 3 && receiver == 2) return 0;
  if (round == 1 && sender == 0 && receiver == size - 1) return kLarge;
  const int64_t v = (sender * 5 + receiver * 3 + round * 7) % 6;
  return v == 0 ? 0 : v * v * 37 + sender + round;
}

// Values rank R contributes to a reduction, at INDEX of the block for BLOCK: small
// integers, so that float sums are exact in any order.
float Contribution(int rank, int block, int64_t index) {
  const float sign = index % 2 ? -1.0f : 1.0f;
  return sign * static_cast<float>(rank + 1) * static_cast<float>((block + index) % 13 + 1);
}
float ReducedValue(int size, int block, int64_t index) {
  const float sign = index % 2 ? -1.0f : 1.0f;
  return sign * static_cast<float>(size * (size + 1) / 2) * static_cast<float>((block + index) % 13 + 1);
}

std::vector<uint8_t> Guarded(int64_t bytes) {
  std::vector<uint8_t> v(static_cast<size_t>(bytes + kGuardBytes), kFill);
  std::memset(v.data() + bytes, kGuard, kGuardBytes);
  return v;
}

// The first mismatch of a received block, or success.
testing::AssertionResult BlockMatches(const uint8_t* got, int sender, int receiver, int64_t bytes) {
  for (int64_t i = 0; i < bytes; ++i) {
    const uint8_t want = Byte(sender, receiver, i);
    if (got[i] != want) {
      return testing::AssertionFailure() << "block " << sender << "->" << receiver << " of " << bytes
                                         << " bytes: byte " << i << " is " << int{got[i]}
                                         << ", expected " << int{want};
    }
  }
  return testing::AssertionSuccess();
}

testing::AssertionResult GuardIntact(const std::vector<uint8_t>& v, int64_t bytes) {
  for (int64_t i = bytes; i < bytes + kGuardBytes; ++i) {
    if (v[i] != kGuard) return testing::AssertionFailure() << "write past the end, at byte " << i;
  }
  return testing::AssertionSuccess();
}

testing::AssertionResult IsInvalid(const Status& s, const std::string& op, int rank) {
  if (s.code() != StatusCode::kInvalidArgument) {
    return testing::AssertionFailure() << "expected INVALID_ARGUMENT, got " << s.ToString();
  }
  const std::string who = "rank " + std::to_string(rank) + ": ";
  if (s.message().find(who) == std::string::npos || s.message().find(op) == std::string::npos) {
    return testing::AssertionFailure() << "message does not name '" << who << "' and '" << op
                                       << "': " << s.message();
  }
  return testing::AssertionSuccess();
}

class CommunicatorTest : public testing::Test {
 protected:
  void SetUp() override {
    // A mistake that leaves ranks in different collectives ends the job in a minute.
    auto made = MakeMpiCommunicator(WatchdogOptions{std::chrono::seconds(60)});
    ASSERT_TRUE(made.ok()) << made.status().ToString();
    comm_ = std::move(made).value();
    rank_ = comm_->rank();
    size_ = comm_->size();
  }

  std::unique_ptr<Communicator> comm_;
  int rank_ = 0;
  int size_ = 1;
};

TEST_F(CommunicatorTest, RankAndSizeAreThoseOfTheWorld) {
  int world_rank = -1, world_size = -1;
  MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
  MPI_Comm_size(MPI_COMM_WORLD, &world_size);
  EXPECT_EQ(rank_, world_rank);
  EXPECT_EQ(size_, world_size);
  EXPECT_STREQ(comm_->backend(), "mpi");
  EXPECT_TRUE(comm_->Barrier().ok());
}

TEST_F(CommunicatorTest, AllReduceSumOfUnevenLengths) {
  for (int64_t count : {int64_t{0}, int64_t{1}, int64_t{1000}, kLarge}) {
    std::vector<float> in(static_cast<size_t>(count)), out(static_cast<size_t>(count), -7.0f);
    for (int64_t i = 0; i < count; ++i) in[i] = Contribution(rank_, 0, i);
    const Status s = comm_->AllReduceSum(in.data(), out.data(), count);
    ASSERT_TRUE(s.ok()) << s.ToString();
    for (int64_t i = 0; i < count; ++i) {
      ASSERT_EQ(out[i], ReducedValue(size_, 0, i)) << "count " << count << ", index " << i;
      ASSERT_EQ(in[i], Contribution(rank_, 0, i)) << "IN changed at " << i;
    }
  }
}

TEST_F(CommunicatorTest, AllReduceSumInPlace) {
  for (int64_t count : {int64_t{0}, int64_t{7}, kLarge}) {
    std::vector<float> x(static_cast<size_t>(count));
    for (int64_t i = 0; i < count; ++i) x[i] = Contribution(rank_, 3, i);
    const Status s = comm_->AllReduceSum(x.data(), x.data(), count);
    ASSERT_TRUE(s.ok()) << s.ToString();
    for (int64_t i = 0; i < count; ++i) {
      ASSERT_EQ(x[i], ReducedValue(size_, 3, i)) << "count " << count << ", index " << i;
    }
  }
}

// Values per rank block; rank 1 gets none; one large block in round 2.
int64_t ScatterCount(int r, int size, int round) {
  if (size >= 2 && r == 1) return 0;
  if (round == 2 && r == size - 1) return kLarge;
  return (r * 7 + round * 3) % 5 * 11;
}

TEST_F(CommunicatorTest, ReduceScatterSumOfUnevenBlocks) {
  for (int round = 0; round < kRounds; ++round) {
    for (bool in_place : {false, true}) {
      std::vector<int64_t> counts(static_cast<size_t>(size_));
      int64_t total = 0;
      for (int r = 0; r < size_; ++r) total += counts[r] = ScatterCount(r, size_, round);
      std::vector<float> in(static_cast<size_t>(total));
      for (int r = 0, at = 0; r < size_; at += static_cast<int>(counts[r]), ++r) {
        for (int64_t i = 0; i < counts[r]; ++i) in[at + i] = Contribution(rank_, r, i);
      }
      std::vector<float> separate(static_cast<size_t>(counts[rank_]), -7.0f);
      float* out = in_place ? in.data() : separate.data();
      const Status s = comm_->ReduceScatterSum(in.data(), out, counts);
      ASSERT_TRUE(s.ok()) << s.ToString();
      for (int64_t i = 0; i < counts[rank_]; ++i) {
        ASSERT_EQ(out[i], ReducedValue(size_, rank_, i))
            << "round " << round << (in_place ? " in place" : "") << ", index " << i;
      }
    }
  }
}

int64_t GatherBytes(int r, int size, int round) {
  if (size >= 2 && r == 1) return 0;
  if (round == 1 && r == 0) return kLarge;
  return (r * 13 + round * 5) % 7 * (r + 3);
}

TEST_F(CommunicatorTest, AllGatherOfUnevenBlocks) {
  for (int round = 0; round < kRounds; ++round) {
    for (bool in_place : {false, true}) {
      std::vector<int64_t> bytes(static_cast<size_t>(size_)), offset(static_cast<size_t>(size_));
      int64_t total = 0;
      for (int r = 0; r < size_; ++r) {
        offset[r] = total;
        total += bytes[r] = GatherBytes(r, size_, round);
      }
      std::vector<uint8_t> out = Guarded(total);
      std::vector<uint8_t> separate(static_cast<size_t>(bytes[rank_]));
      uint8_t* in = in_place ? out.data() + offset[rank_] : separate.data();
      for (int64_t i = 0; i < bytes[rank_]; ++i) in[i] = Byte(rank_, 0, i);
      const Status s = comm_->AllGather(in, out.data(), bytes);
      ASSERT_TRUE(s.ok()) << s.ToString();
      for (int r = 0; r < size_; ++r) {
        EXPECT_TRUE(BlockMatches(out.data() + offset[r], r, 0, bytes[r]))
            << "round " << round << (in_place ? " in place" : "");
      }
      EXPECT_TRUE(GuardIntact(out, total));
    }
  }
}

TEST_F(CommunicatorTest, ExchangeCountsTransposes) {
  // Counts past 2^32 as well: they travel as int64.
  auto count = [](int sender, int receiver) {
    return (int64_t{1} << 40) * sender + int64_t{1000} * receiver + (sender == receiver ? 0 : 1);
  };
  std::vector<int64_t> send(static_cast<size_t>(size_)), recv(static_cast<size_t>(size_), -1);
  for (int d = 0; d < size_; ++d) send[d] = count(rank_, d);
  const Status s = comm_->ExchangeCounts(send, recv);
  ASSERT_TRUE(s.ok()) << s.ToString();
  for (int r = 0; r < size_; ++r) EXPECT_EQ(recv[r], count(r, rank_)) << "from rank " << r;
}

// The dispatch pattern: exchange the counts, then move the blocks with them.
TEST_F(CommunicatorTest, AllToAllVOfUnevenBlocks) {
  for (int round = 0; round < kRounds; ++round) {
    std::vector<int64_t> send_bytes(static_cast<size_t>(size_));
    std::vector<int64_t> recv_bytes(static_cast<size_t>(size_), -1);
    for (int d = 0; d < size_; ++d) send_bytes[d] = PairBytes(rank_, d, size_, round);
    Status s = comm_->ExchangeCounts(send_bytes, recv_bytes);
    ASSERT_TRUE(s.ok()) << s.ToString();
    int64_t send_total = 0, recv_total = 0;
    for (int r = 0; r < size_; ++r) {
      ASSERT_EQ(recv_bytes[r], PairBytes(r, rank_, size_, round)) << "round " << round << ", from " << r;
      send_total += send_bytes[r];
      recv_total += recv_bytes[r];
    }
    if (size_ >= 2 && rank_ == 1) {
      EXPECT_EQ(send_total, 0);
    }
    if (size_ >= 3 && rank_ == 2) {
      EXPECT_EQ(recv_total, 0);
    }

    std::vector<uint8_t> send(static_cast<size_t>(send_total));
    for (int d = 0, at = 0; d < size_; at += static_cast<int>(send_bytes[d]), ++d) {
      for (int64_t i = 0; i < send_bytes[d]; ++i) send[at + i] = Byte(rank_, d, i);
    }
    std::vector<uint8_t> recv = Guarded(recv_total);
    s = comm_->AllToAllV(send.data(), send_bytes, recv.data(), recv_bytes);
    ASSERT_TRUE(s.ok()) << s.ToString();
    for (int r = 0, at = 0; r < size_; at += static_cast<int>(recv_bytes[r]), ++r) {
      EXPECT_TRUE(BlockMatches(recv.data() + at, r, rank_, recv_bytes[r])) << "round " << round;
    }
    EXPECT_TRUE(GuardIntact(recv, recv_total)) << "round " << round;
  }
}

TEST_F(CommunicatorTest, AllToAllVWithNothingToMove) {
  const std::vector<int64_t> zeros(static_cast<size_t>(size_), 0);
  const Status s = comm_->AllToAllV(nullptr, zeros, nullptr, zeros);
  EXPECT_TRUE(s.ok()) << s.ToString();
}

// Rows SENDER sends RECEIVER with AllToAllRows: some rows twice (to several ranks), in
// a scrambled order, rank 1 sending none, some blocks empty.
std::vector<int32_t> RowsFor(int sender, int receiver, int size, int64_t num_rows) {
  std::vector<int32_t> rows;
  if (size >= 2 && sender == 1) return rows;
  const int64_t n = (sender * 3 + receiver * 5) % 7;
  for (int64_t i = 0; i < n; ++i) rows.push_back(static_cast<int32_t>((i * 7 + receiver * 3 + sender) % num_rows));
  return rows;
}

// One rank's side of a row exchange: X of NUM_ROWS rows, the rows it sends to each
// rank (RowsFor) and the row counts it sends and receives.
struct RowExchange {
  std::vector<uint8_t> x;
  std::vector<int32_t> rows;
  std::vector<int64_t> send_rows, recv_rows;
  int64_t total = 0;  // rows received

  RowExchange(int me, int size, int64_t num_rows, int64_t row_bytes)
      : x(static_cast<size_t>(num_rows * row_bytes)), send_rows(size), recv_rows(size) {
    for (int64_t i = 0; i < num_rows * row_bytes; ++i) x[i] = Byte(me, -1, i);
    for (int r = 0; r < size; ++r) {
      const auto mine = RowsFor(me, r, size, num_rows);
      rows.insert(rows.end(), mine.begin(), mine.end());
      send_rows[r] = static_cast<int64_t>(mine.size());
      recv_rows[r] = static_cast<int64_t>(RowsFor(r, me, size, num_rows).size());
      total += recv_rows[r];
    }
  }
};

TEST_F(CommunicatorTest, AllToAllRowsGathersRowsWhereTheyLie) {
  const int size = comm_->size(), me = comm_->rank();
  const int64_t num_rows = 11, row_bytes = 4099;  // odd width, past the eager limit in all
  RowExchange e(me, size, num_rows, row_bytes);
  auto& [x, rows, send_rows, recv_rows, total] = e;
  std::vector<uint8_t> recv = Guarded(total * row_bytes);
  ASSERT_TRUE(comm_->AllToAllRows(x.data(), row_bytes, rows, send_rows, recv.data(), recv_rows).ok());
  int64_t at = 0;
  for (int r = 0; r < size; ++r) {
    for (int32_t row : RowsFor(r, me, size, num_rows)) {
      for (int64_t j = 0; j < row_bytes; ++j) {
        ASSERT_EQ(recv[at * row_bytes + j], Byte(r, -1, row * row_bytes + j)) << "from rank " << r;
      }
      ++at;
    }
  }
  EXPECT_TRUE(GuardIntact(recv, total * row_bytes));
  // Rows listed must add up to send_rows.
  std::vector<int64_t> wrong = send_rows;
  wrong[0] += 1;
  EXPECT_TRUE(IsInvalid(comm_->AllToAllRows(x.data(), row_bytes, rows, wrong, recv.data(), recv_rows),
                        "AllToAllRows", me));
}

TEST_F(CommunicatorTest, AllToAllRowsWithTailCarriesEachRowsTail) {
  const int size = comm_->size(), me = comm_->rank();
  const int64_t num_rows = 13, row_bytes = 4099, tail_bytes = 12;
  RowExchange e(me, size, num_rows, row_bytes);
  auto& [x, rows, send_rows, recv_rows, total] = e;
  // The i-th listed row's tail names the row and its destination.
  std::vector<uint8_t> tail(rows.size() * static_cast<size_t>(tail_bytes));
  {
    size_t i = 0;
    for (int r = 0; r < size; ++r) {
      for (int64_t k = 0; k < send_rows[r]; ++k, ++i) {
        for (int64_t j = 0; j < tail_bytes; ++j) tail[i * tail_bytes + j] = Byte(me, r, rows[i] * 100 + j);
      }
    }
  }
  std::vector<uint8_t> recv = Guarded(total * row_bytes), tails = Guarded(total * tail_bytes);
  const Status s = comm_->AllToAllRowsWithTail(x.data(), row_bytes, rows, send_rows, recv.data(), recv_rows,
                                               tail.data(), tail_bytes, tails.data());
  ASSERT_TRUE(s.ok()) << s.ToString();
  int64_t at = 0;
  for (int r = 0; r < size; ++r) {
    for (int32_t row : RowsFor(r, me, size, num_rows)) {
      for (int64_t j = 0; j < row_bytes; ++j) {
        ASSERT_EQ(recv[at * row_bytes + j], Byte(r, -1, row * row_bytes + j)) << "row from rank " << r;
      }
      for (int64_t j = 0; j < tail_bytes; ++j) {
        ASSERT_EQ(tails[at * tail_bytes + j], Byte(r, me, row * 100 + j)) << "tail from rank " << r;
      }
      ++at;
    }
  }
  EXPECT_TRUE(GuardIntact(recv, total * row_bytes));
  EXPECT_TRUE(GuardIntact(tails, total * tail_bytes));
  std::vector<int64_t> wrong = send_rows;
  wrong[0] += 1;
  EXPECT_TRUE(IsInvalid(comm_->AllToAllRowsWithTail(x.data(), row_bytes, rows, wrong, recv.data(), recv_rows,
                                                    tail.data(), tail_bytes, tails.data()),
                        "AllToAllRowsWithTail", me));
}

TEST_F(CommunicatorTest, BroadcastFromEveryRoot) {
  auto bytes_of = [](int root) -> int64_t {
    if (root == 1) return 0;
    return (root + 1) * 1000 + 3 + (root == 0 ? kLarge : 0);
  };
  for (int root = 0; root < size_; ++root) {
    const int64_t bytes = bytes_of(root);
    std::vector<uint8_t> data = Guarded(bytes);
    if (rank_ == root) {
      for (int64_t i = 0; i < bytes; ++i) data[i] = Byte(root, 255, i);
    }
    const Status s = comm_->Broadcast(data.data(), bytes, root);
    ASSERT_TRUE(s.ok()) << s.ToString();
    EXPECT_TRUE(BlockMatches(data.data(), root, 255, bytes)) << "root " << root;
    EXPECT_TRUE(GuardIntact(data, bytes)) << "root " << root;
  }
}

TEST_F(CommunicatorTest, AwaitBroadcastWaitsForASilentRootWithoutSpinning) {
  for (int root = 0; root < size_; ++root) {
    const int64_t bytes = 16 + root;
    std::vector<uint8_t> data = Guarded(bytes);
    if (rank_ == root) {
      for (int64_t i = 0; i < bytes; ++i) data[i] = Byte(root, 254, i);
      // The others are already waiting, long enough to reach their sleeping polls.
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    const std::clock_t cpu0 = std::clock();
    const auto wall0 = std::chrono::steady_clock::now();
    const Status s = comm_->AwaitBroadcast(data.data(), bytes, root);
    const double cpu = static_cast<double>(std::clock() - cpu0) / CLOCKS_PER_SEC;
    const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - wall0).count();
    ASSERT_TRUE(s.ok()) << s.ToString();
    EXPECT_TRUE(BlockMatches(data.data(), root, 254, bytes)) << "root " << root;
    EXPECT_TRUE(GuardIntact(data, bytes));
    // A waiting rank sleeps for most of the wait: well under the wall time in CPU.
    if (rank_ != root && wall > 0.08) {
      EXPECT_LT(cpu, 0.5 * wall) << "rank " << rank_ << " spun while waiting";
    }
    // It matches the blocking form's ordering: a plain Broadcast right after.
    int64_t next = rank_ == root ? 42 + root : -1;
    ASSERT_TRUE(comm_->Broadcast(&next, sizeof next, root).ok());
    EXPECT_EQ(next, 42 + root);
  }
  uint8_t b[4];
  EXPECT_TRUE(IsInvalid(comm_->AwaitBroadcast(b, 4, size_), "AwaitBroadcast", rank_));
}

TEST_F(CommunicatorTest, SendRecvAroundARing) {
  if (size_ < 2) GTEST_SKIP() << "a ring needs two ranks";
  // The link from rank S to S+1: one empty, one large, the rest uneven.
  auto link_bytes = [](int s) -> int64_t {
    if (s == 1) return 0;
    return (s + 1) * 777 + (s == 0 ? kLarge : 0);
  };
  const int next = (rank_ + 1) % size_, prev = (rank_ + size_ - 1) % size_;
  std::vector<uint8_t> send(static_cast<size_t>(link_bytes(rank_)));
  for (size_t i = 0; i < send.size(); ++i) send[i] = Byte(rank_, next, static_cast<int64_t>(i));
  const int64_t recv_bytes = link_bytes(prev);
  std::vector<uint8_t> recv = Guarded(recv_bytes);
  // Rank 0 starts the token; the others pass it on, so no send waits on a send.
  auto send_next = [&] { return comm_->Send(send.data(), link_bytes(rank_), next, 100 + rank_); };
  auto recv_prev = [&] { return comm_->Recv(recv.data(), recv_bytes, prev, 100 + prev); };
  Status s;
  if (rank_ == 0) {
    s = send_next();
    ASSERT_TRUE(s.ok()) << s.ToString();
    s = recv_prev();
    ASSERT_TRUE(s.ok()) << s.ToString();
  } else {
    s = recv_prev();
    ASSERT_TRUE(s.ok()) << s.ToString();
    s = send_next();
    ASSERT_TRUE(s.ok()) << s.ToString();
  }
  EXPECT_TRUE(BlockMatches(recv.data(), prev, rank_, recv_bytes));
  EXPECT_TRUE(GuardIntact(recv, recv_bytes));
}

TEST_F(CommunicatorTest, RecvOfTheWrongLengthFails) {
  if (size_ < 2) GTEST_SKIP() << "needs two ranks";
  std::vector<uint8_t> buffer(64, 1);
  if (rank_ == 0) {
    EXPECT_TRUE(comm_->Send(buffer.data(), 64, 1, 5).ok());  // longer than rank 1 expects
    EXPECT_TRUE(comm_->Send(buffer.data(), 8, 1, 6).ok());   // shorter
  } else if (rank_ == 1) {
    Status s = comm_->Recv(buffer.data(), 16, 0, 5);
    EXPECT_EQ(s.code(), StatusCode::kInternal) << s.ToString();
    EXPECT_NE(s.message().find("rank 1: Recv: MPI_Recv: "), std::string::npos) << s.message();
    EXPECT_NE(s.message().find("MPI_ERR_TRUNCATE"), std::string::npos) << s.message();
    s = comm_->Recv(buffer.data(), 16, 0, 6);
    EXPECT_EQ(s.code(), StatusCode::kInternal) << s.ToString();
    EXPECT_NE(s.message().find("rank 1: Recv: received 8 bytes from rank 0"), std::string::npos)
        << s.message();
  }
  EXPECT_TRUE(comm_->Barrier().ok());
}

// Argument errors are found before any MPI call, on every rank alike, so the ranks
// stay in step.
TEST_F(CommunicatorTest, ArgumentErrorsNameRankAndOperation) {
  const size_t n = static_cast<size_t>(size_);
  std::vector<int64_t> right(n, 0), wrong(n + 1, 0), negative(n, 0), too_big(n, 0);
  negative[n - 1] = -1;
  too_big[0] = int64_t{INT_MAX} + 1;
  std::vector<int64_t> counts_out(n), counts_out_wrong(n + 1);
  float f[4] = {};
  uint8_t b[4] = {};

  EXPECT_TRUE(IsInvalid(comm_->AllReduceSum(f, f, -1), "AllReduceSum", rank_));
  EXPECT_TRUE(IsInvalid(comm_->AllReduceSum(nullptr, f, 4), "AllReduceSum", rank_));

  EXPECT_TRUE(IsInvalid(comm_->ReduceScatterSum(f, f, wrong), "ReduceScatterSum", rank_));
  EXPECT_TRUE(IsInvalid(comm_->ReduceScatterSum(f, f, negative), "ReduceScatterSum", rank_));
  std::vector<int64_t> over_int(n, int64_t{INT_MAX} / size_ + 1);  // sums past INT_MAX
  EXPECT_TRUE(IsInvalid(comm_->ReduceScatterSum(f, f, over_int), "ReduceScatterSum", rank_));

  EXPECT_TRUE(IsInvalid(comm_->AllGather(b, b, wrong), "AllGather", rank_));
  EXPECT_TRUE(IsInvalid(comm_->AllGather(b, b, negative), "AllGather", rank_));
  EXPECT_TRUE(IsInvalid(comm_->AllGather(b, b, too_big), "AllGather", rank_));

  EXPECT_TRUE(IsInvalid(comm_->AllToAllV(b, wrong, b, right), "AllToAllV", rank_));
  EXPECT_TRUE(IsInvalid(comm_->AllToAllV(b, right, b, wrong), "AllToAllV", rank_));
  EXPECT_TRUE(IsInvalid(comm_->AllToAllV(b, negative, b, right), "AllToAllV", rank_));
  EXPECT_TRUE(IsInvalid(comm_->AllToAllV(b, right, b, too_big), "AllToAllV", rank_));
  const Status wrong_length = comm_->AllToAllV(b, wrong, b, right);
  EXPECT_NE(wrong_length.message().find("send_bytes has " + std::to_string(n + 1) + " entries"),
            std::string::npos)
      << wrong_length.message();

  EXPECT_TRUE(IsInvalid(comm_->ExchangeCounts(wrong, counts_out), "ExchangeCounts", rank_));
  EXPECT_TRUE(IsInvalid(comm_->ExchangeCounts(right, counts_out_wrong), "ExchangeCounts", rank_));

  EXPECT_TRUE(IsInvalid(comm_->Broadcast(b, 4, -1), "Broadcast", rank_));
  EXPECT_TRUE(IsInvalid(comm_->Broadcast(b, 4, size_), "Broadcast", rank_));
  EXPECT_TRUE(IsInvalid(comm_->Broadcast(b, -4, 0), "Broadcast", rank_));

  EXPECT_TRUE(IsInvalid(comm_->Send(b, 4, size_, 0), "Send", rank_));
  EXPECT_TRUE(IsInvalid(comm_->Send(b, -1, 0, 0), "Send", rank_));
  EXPECT_TRUE(IsInvalid(comm_->Send(b, 4, 0, -1), "Send", rank_));
  EXPECT_TRUE(IsInvalid(comm_->Send(nullptr, 4, 0, 0), "Send", rank_));
  EXPECT_TRUE(IsInvalid(comm_->Recv(b, 4, -1, 0), "Recv", rank_));
  EXPECT_TRUE(IsInvalid(comm_->Recv(b, 4, 0, -3), "Recv", rank_));

  // Nothing was left half-done: the next collective still lines up.
  EXPECT_TRUE(comm_->Barrier().ok());
}

TEST(MpiCommunicatorTest, RejectsANonPositiveTimeout) {
  auto made = MakeMpiCommunicator(WatchdogOptions{std::chrono::milliseconds(0)});
  EXPECT_EQ(made.status().code(), StatusCode::kInvalidArgument) << made.status().ToString();
}

// Each communicator owns a watchdog thread: it must stop at once when the
// communicator goes, and must not fire on calls that finish within the timeout.
TEST(MpiCommunicatorTest, WatchdogStopsPromptlyAndSparesTimelyCalls) {
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < 20; ++i) {
    auto made = MakeMpiCommunicator(WatchdogOptions{std::chrono::seconds(60)});
    ASSERT_TRUE(made.ok()) << made.status().ToString();
  }
  const auto elapsed = std::chrono::steady_clock::now() - start;
  EXPECT_LT(elapsed, std::chrono::seconds(2)) << "20 communicators took "
                                              << std::chrono::duration<double>(elapsed).count() << " s";

  // Generous against a loaded machine (8 ranks on 2 cores), yet far below the default.
  auto made = MakeMpiCommunicator(WatchdogOptions{std::chrono::seconds(2)});
  ASSERT_TRUE(made.ok()) << made.status().ToString();
  Communicator& comm = **made;
  for (int i = 0; i < 3; ++i) {
    // Rank 0 arrives late; the others wait in MPI_Barrier for several watchdog polls.
    if (comm.rank() == 0) std::this_thread::sleep_for(std::chrono::milliseconds(300));
    EXPECT_TRUE(comm.Barrier().ok());
  }
}

}  // namespace
}  // namespace epic::parallel
