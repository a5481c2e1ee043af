// The kernels' team of threads (kernels/cpu/parallel.h): each part runs once on a thread
// of its own, work started inside a part stays on its thread, the team wakes after its
// threads have gone to sleep, a second caller while the team is held runs its work
// alone, an exception from the caller's part leaves after the others' parts are done,
// and a larger thread count grows the team.
#include "kernels/cpu/parallel.h"

#include <gtest/gtest.h>

#include <omp.h>

#include <atomic>
#include <chrono>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace epic::cpu {
namespace {

// Each of THREADS parts run once, each on a thread of its own, told the team's size.
void ExpectEachPartOnItsOwnThread(int threads) {
  std::vector<int> runs(static_cast<size_t>(threads), 0);
  std::vector<std::thread::id> ids(static_cast<size_t>(threads));
  std::vector<int> sizes(static_cast<size_t>(threads), -1);
  std::vector<int> inside(static_cast<size_t>(threads), 0);
  OnTeam(threads, [&](int t, int n) {
    ++runs[static_cast<size_t>(t)];
    ids[static_cast<size_t>(t)] = std::this_thread::get_id();
    sizes[static_cast<size_t>(t)] = n;
    inside[static_cast<size_t>(t)] = InTeam();
  });
  EXPECT_EQ(runs, std::vector<int>(static_cast<size_t>(threads), 1));
  EXPECT_EQ(sizes, std::vector<int>(static_cast<size_t>(threads), threads));
  EXPECT_EQ(inside, std::vector<int>(static_cast<size_t>(threads), 1));
  EXPECT_EQ(std::set<std::thread::id>(ids.begin(), ids.end()).size(), static_cast<size_t>(threads));
  EXPECT_EQ(ids[0], std::this_thread::get_id()) << "part 0 is the caller's";
  EXPECT_FALSE(InTeam()) << "after the step";
}

TEST(Team, EachPartRunsOnceOnAThreadOfItsOwn) {
  ExpectEachPartOnItsOwnThread(2);
  for (int i = 0; i < 1000; ++i) {
    std::atomic<int> parts{0};
    OnTeam(2, [&](int, int) { parts.fetch_add(1); });
    ASSERT_EQ(parts.load(), 2) << "step " << i;
  }
}

TEST(Team, WorkStartedInsideAPartStaysOnItsThread) {
  std::vector<int> inner(2, -1);
  std::vector<int> items(2, 0);
  OnTeam(2, [&](int t, int) {
    OnTeam(2, [&](int u, int n) { inner[static_cast<size_t>(t)] = u * 10 + n; });
    ParallelFor(1, true, [&](int64_t) { ++items[static_cast<size_t>(t)]; });
  });
  EXPECT_EQ(inner, (std::vector<int>{1, 1})) << "each inner call ran as part 0 of 1";
  EXPECT_EQ(items, (std::vector<int>{1, 1}));
}

TEST(Team, WakesAfterItsThreadsHaveGoneToSleep) {
  for (int i = 0; i < 5; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));  // past the spin before sleep
    ExpectEachPartOnItsOwnThread(2);
  }
}

TEST(Team, ASecondCallerWhileItIsHeldRunsItsWorkAlone) {
  // Two threads of the test, each starting many steps: every part of every step runs
  // once, on the team or on the caller alone, and neither waits for the other forever.
  std::atomic<int64_t> done{0};
  auto caller = [&] {
    for (int i = 0; i < 2000; ++i) {
      std::vector<int> runs(2, 0);
      int parts = 0;
      OnTeam(2, [&](int t, int n) {
        ++runs[static_cast<size_t>(t)];
        if (t == 0) parts = n;
      });
      int total = 0;
      for (int r : runs) total += r;
      if (total == parts) done.fetch_add(1);
    }
  };
  std::thread a(caller), b(caller);
  a.join();
  b.join();
  EXPECT_EQ(done.load(), 4000);
}

TEST(Team, AnExceptionFromTheCallersPartLeavesAfterTheOthersAreDone) {
  std::atomic<bool> other_done{false};
  EXPECT_THROW(OnTeam(2,
                      [&](int t, int) {
                        if (t == 0) throw std::runtime_error("part 0");
                        std::this_thread::sleep_for(std::chrono::milliseconds(20));
                        other_done = true;
                      }),
               std::runtime_error);
  EXPECT_TRUE(other_done.load()) << "OnTeam returned before part 1 finished";
  EXPECT_FALSE(InTeam());
  ExpectEachPartOnItsOwnThread(2);
}

TEST(Team, LoopsCoverEveryItemOnce) {
  for (const int64_t n : {int64_t{2}, int64_t{3}, int64_t{17}, int64_t{1000}}) {
    std::vector<std::atomic<int>> for_runs(static_cast<size_t>(n)), row_runs(static_cast<size_t>(n));
    ParallelFor(n, true, [&](int64_t i) { for_runs[static_cast<size_t>(i)].fetch_add(1); });
    ParallelRows(n, true, [&](int64_t i) { row_runs[static_cast<size_t>(i)].fetch_add(1); });
    for (int64_t i = 0; i < n; ++i) {
      ASSERT_EQ(for_runs[static_cast<size_t>(i)].load(), 1) << "ParallelFor, " << n << " items, item " << i;
      ASSERT_EQ(row_runs[static_cast<size_t>(i)].load(), 1) << "ParallelRows, " << n << " rows, row " << i;
    }
  }
}

// Every item's body once; each item's ahead at most once, on the thread that then runs
// its body, before it; on one thread (not parallel), ahead(i + 1) just before body(i).
TEST(Team, ParallelForAheadRunsEachAheadBeforeItsBodyOnItsThread) {
  for (const int64_t n : {int64_t{1}, int64_t{2}, int64_t{3}, int64_t{17}, int64_t{1000}}) {
    for (const bool parallel : {true, false}) {
      std::vector<std::atomic<int>> bodies(static_cast<size_t>(n)), aheads(static_cast<size_t>(n));
      std::vector<std::thread::id> ahead_on(static_cast<size_t>(n));
      std::vector<int> ahead_before(static_cast<size_t>(n), 0);
      std::vector<int64_t> order;  // (not parallel) ahead's items as +i, bodies' as -1 - i
      ParallelForAhead(
          n, parallel,
          [&](int64_t i) {
            aheads[static_cast<size_t>(i)].fetch_add(1);
            ahead_on[static_cast<size_t>(i)] = std::this_thread::get_id();
            if (!parallel) order.push_back(i);
          },
          [&](int64_t i) {
            bodies[static_cast<size_t>(i)].fetch_add(1);
            if (aheads[static_cast<size_t>(i)].load() > 0) {
              ahead_before[static_cast<size_t>(i)] = ahead_on[static_cast<size_t>(i)] == std::this_thread::get_id() ? 1 : -1;
            }
            if (!parallel) order.push_back(-1 - i);
          });
      const std::string where = std::to_string(n) + " items" + (parallel ? "" : ", not parallel");
      for (int64_t i = 0; i < n; ++i) {
        ASSERT_EQ(bodies[static_cast<size_t>(i)].load(), 1) << where << ", item " << i;
        ASSERT_LE(aheads[static_cast<size_t>(i)].load(), 1) << where << ", item " << i;
        ASSERT_NE(ahead_before[static_cast<size_t>(i)], -1) << where << ": item " << i << "'s ahead on another thread";
        if (aheads[static_cast<size_t>(i)].load() == 1) {
          ASSERT_EQ(ahead_before[static_cast<size_t>(i)], 1) << where << ": item " << i << "'s ahead after its body";
        }
      }
      if (!parallel) {
        std::vector<int64_t> want;
        for (int64_t i = 0; i < n; ++i) {
          if (i + 1 < n) want.push_back(i + 1);
          want.push_back(-1 - i);
        }
        EXPECT_EQ(order, want) << where;
      }
    }
  }
}

TEST(Team, ALargerThreadCountGrowsIt) {
  const int before = omp_get_max_threads();
  omp_set_num_threads(4);
  ExpectEachPartOnItsOwnThread(4);
  ExpectEachPartOnItsOwnThread(3);  // fewer parts than the team's threads
  omp_set_num_threads(before);
  ExpectEachPartOnItsOwnThread(2);
}

}  // namespace
}  // namespace epic::cpu
