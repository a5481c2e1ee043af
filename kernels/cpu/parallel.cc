#include "kernels/cpu/parallel.h"

#include <pthread.h>

#include <chrono>
#include <mutex>
#include <thread>

namespace epic::cpu {
namespace {

thread_local bool in_team = false;

// How long an idle thread spins before it sleeps: longer than the gaps between a step's
// products, short enough that an idle server (or a rank waiting in MPI) soon leaves its
// cores alone.
constexpr std::chrono::microseconds kSpinBeforeSleep{500};
// Spins of the calling thread waiting for the others before it yields its core to them
// (more threads than cores).
constexpr int kSpinsBeforeYield = 1 << 14;

inline void Pause() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// Threads 1.. of the team; the caller is thread 0. A step: the caller publishes the call
// and bumps EPOCH; each thread runs its part (or none, past the step's threads) and
// counts PENDING down; the caller runs part 0 and waits for PENDING to reach 0.
class Team {
 public:
  // The process's team, made on first use (again in a forked child, which has no threads).
  // Never destroyed: its threads outlive main.
  static Team& Get() {
    static const bool registered = [] {
      pthread_atfork(nullptr, nullptr, [] { instance_.store(nullptr, std::memory_order_relaxed); });
      return true;
    }();
    (void)registered;
    Team* team = instance_.load(std::memory_order_acquire);
    if (team == nullptr) {
      // Two first callers at once: one team kept, the other never started a thread.
      auto* made = new Team;
      if (instance_.compare_exchange_strong(team, made, std::memory_order_acq_rel)) {
        team = made;
      } else {
        delete made;
      }
    }
    return *team;
  }

  bool TryRun(int threads, void (*call)(void*, int, int), void* body) {
    std::unique_lock<std::mutex> lock(mutex_, std::try_to_lock);
    if (!lock.owns_lock()) return false;
    Grow(threads - 1);
    call_ = call;
    body_ = body;
    threads_ = threads;
    pending_.store(workers_, std::memory_order_relaxed);
    epoch_.fetch_add(1, std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) epoch_.notify_all();
    // The others finish their parts before this returns, or unwinds.
    struct Join {
      Team* team;
      ~Join() {
        in_team = false;
        for (int spins = 0; team->pending_.load(std::memory_order_acquire) != 0;) {
          if (spins < kSpinsBeforeYield) {
            ++spins;
            Pause();
          } else {
            std::this_thread::yield();
          }
        }
      }
    } join{this};
    in_team = true;
    call(body, 0, threads);
    return true;
  }

 private:
  void Grow(int workers) {
    while (workers_ < workers) {
      const int index = ++workers_;
      const uint32_t seen = epoch_.load(std::memory_order_relaxed);
      std::thread([this, index, seen] { Work(index, seen); }).detach();
    }
  }

  [[noreturn]] void Work(int index, uint32_t seen) {
    in_team = true;
    for (;;) {
      seen = Await(seen);
      if (index < threads_) call_(body_, index, threads_);
      pending_.fetch_sub(1, std::memory_order_release);
    }
  }

  // The next epoch after SEEN: spinning, then asleep.
  uint32_t Await(uint32_t seen) {
    auto since = std::chrono::steady_clock::now();
    for (int spins = 1;; ++spins) {
      const uint32_t epoch = epoch_.load(std::memory_order_acquire);
      if (epoch != seen) return epoch;
      Pause();
      if (spins % 1024 != 0 || std::chrono::steady_clock::now() - since < kSpinBeforeSleep) continue;
      sleepers_.fetch_add(1, std::memory_order_seq_cst);
      if (epoch_.load(std::memory_order_seq_cst) == seen) epoch_.wait(seen, std::memory_order_seq_cst);
      sleepers_.fetch_sub(1, std::memory_order_seq_cst);
      since = std::chrono::steady_clock::now();
      spins = 0;
    }
  }

  static inline std::atomic<Team*> instance_{nullptr};

  std::mutex mutex_;  // held by the thread running a step
  int workers_ = 0;  // threads 1..workers_
  // The step, written before EPOCH moves and read by the threads after.
  void (*call_)(void*, int, int) = nullptr;
  void* body_ = nullptr;
  int threads_ = 0;
  alignas(64) std::atomic<uint32_t> epoch_{0};
  alignas(64) std::atomic<int> pending_{0};
  alignas(64) std::atomic<int> sleepers_{0};
};

}  // namespace

bool InTeam() { return in_team || omp_get_level() > 0; }

namespace internal {

void RunOnTeam(int threads, void (*call)(void*, int, int), void* body) {
  if (!Team::Get().TryRun(threads, call, body)) call(body, 0, 1);
}

}  // namespace internal
}  // namespace epic::cpu
