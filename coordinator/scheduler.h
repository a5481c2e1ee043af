// The coordinator's scheduler: requests queue here, are admitted when their cache
// blocks fit, and are packed into steps (continuous batching, chunked prefill); the
// worker job's results flow back to each request's stream. Thread-safe: RPC handlers
// submit and cancel while the worker link builds and completes steps.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "common/status.h"
#include "coordinator/block_pool.h"
#include "epic.pb.h"
#include "worker_link.pb.h"

namespace epic::coordinator {

using Clock = std::chrono::steady_clock;

// What a request's caller receives, in order: tokens as they are sampled, then one
// final event (finished, or an error).
struct RequestEvent {
  std::vector<int32_t> tokens;
  std::vector<float> logprobs;
  bool final = false;
  v1::FinishReason finish_reason = v1::FINISH_REASON_UNSPECIFIED;
  Status error;  // on a final event: not OK when the request failed
  int64_t prompt_tokens = 0;
  int64_t completion_tokens = 0;
  int64_t cached_tokens = 0;  // prompt tokens whose rows came from the prefix cache
  double time_to_first_token = 0.0;
};

// A request's outbox: the scheduler pushes, the RPC handler waits.
class RequestStream {
 public:
  void Push(RequestEvent event);
  // Moves the pending events into OUT, waiting up to TIMEOUT for one.
  void Wait(std::vector<RequestEvent>* out, std::chrono::milliseconds timeout);

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<RequestEvent> events_;
};

// Where the scheduler reports what the serving metrics count (coordinator/metrics.h
// exports them to Prometheus). All optional to implement.
class SchedulerObserver {
 public:
  virtual ~SchedulerObserver() = default;
  virtual void FirstToken(double /*seconds_since_arrival*/) {}
  virtual void InterToken(double /*seconds*/) {}
  virtual void Finished(double /*e2e_seconds*/, int64_t /*prompt*/, int64_t /*completion*/,
                        const std::string& /*outcome*/) {}
  virtual void Load(int64_t /*running*/, int64_t /*waiting*/, double /*cache_usage*/) {}
  // Totals since start: prompt tokens looked up in the prefix cache, found, and cached
  // blocks evicted.
  virtual void PrefixCache(int64_t /*queried*/, int64_t /*hits*/, int64_t /*evictions*/) {}
};

struct SchedulerOptions {
  int64_t block_size = 16;        // tokens per cache block
  // The cache budget of each of the worker job's latent caches (one under tensor-parallel
  // attention; one per rank under data-parallel); and per cache, the most sequences and
  // tokens in one step (decodes first, then prefill chunks).
  int64_t num_blocks = 1024;
  int64_t max_waiting = 256;      // queued requests beyond which Submit says RESOURCE_EXHAUSTED
  int64_t max_running = 64;
  int64_t max_step_tokens = 256;
  // When the worker job dies, requests wait this long for the next job, which prefills
  // their prompt and what they have generated again and goes on; 0: they end UNAVAILABLE.
  std::chrono::milliseconds resume_timeout{std::chrono::seconds(30)};
  // Full blocks of prompts (and outputs) stay cached after their requests end, and a
  // request whose prompt begins with cached blocks shares them and prefills only the rest.
  bool prefix_cache = true;
};

struct SchedulerStats {
  int64_t running = 0;
  int64_t waiting = 0;
  int64_t free_blocks = 0;   // free, or cached and unused (a request may have them)
  int64_t total_blocks = 0;   // over every cache
  int64_t cached_blocks = 0;  // blocks the prefix cache keys
  std::vector<int64_t> cache_free_blocks;  // per cache (per rank under data-parallel attention)
  std::vector<int64_t> cache_running;      // requests running on each
  int64_t steps = 0;
  bool attached = false;
  bool draining = false;
};

class Scheduler {
 public:
  explicit Scheduler(const SchedulerOptions& options, SchedulerObserver* observer = nullptr);
  ~Scheduler();

  const SchedulerOptions& options() const { return options_; }

  // A worker job serving MODEL attached: requests are accepted from now on. It holds
  // CACHES latent caches of num_blocks each: 1 under tensor-parallel attention (every
  // rank holds the same rows), its ranks under data-parallel attention, where each
  // request is placed on one rank (SequenceWork.rank) when admitted.
  void Attach(const v1::ModelSummary& model, int caches = 1);
  // The worker job left, for WHY: the cache budget is reset, and new requests are
  // refused until a job attaches again. With RESUME (and a resume_timeout), requests
  // in flight and queued wait for the next job, which prefills what each has so far and
  // goes on with its next draw, so that its stream is what an undisturbed run gives;
  // a request in the failed step for the second time, and every request still waiting
  // after resume_timeout, ends UNAVAILABLE. Without RESUME every request ends so now.
  void Detach(const std::string& why, bool resume = false);
  // Stops admitting new requests (graceful shutdown); running ones go on, and those
  // waiting for a job that is gone end UNAVAILABLE.
  void Drain();

  // Validates REQUEST (INVALID_ARGUMENT naming the field), then queues it; its events
  // go to STREAM. RESOURCE_EXHAUSTED when the queue is full, UNAVAILABLE when no
  // worker job is attached or the server is draining. Returns the request's id.
  StatusOr<uint64_t> Submit(const v1::GenerateRequest& request, std::shared_ptr<RequestStream> stream);
  // Ends a request (cancelled by its caller or past its deadline, or done: a stop string
  // ended it) and frees its blocks; no further events reach its stream. OUTCOME is what
  // the observer counts. Unknown ids are ignored.
  void Cancel(uint64_t id, const std::string& outcome = "cancelled");

  // Builds the next step into STEP: admits waiting requests whose blocks fit, then
  // one token for every decoding sequence and prefill chunks up to the token budget.
  // False when there is nothing to run. One step at a time: call Complete before the next.
  bool NextStep(v1::internal::Step* step);
  // Applies the results of the step in flight. INTERNAL when they do not match it.
  Status Complete(const v1::internal::StepResult& result);

  // Until a request waits or runs, Wake is called, or TIMEOUT passes.
  void WaitForWork(std::chrono::milliseconds timeout);
  // Ends a WaitForWork early (work for the link other than requests).
  void Wake();

  SchedulerStats Stats() const;
  // Until the number of running and waiting requests is zero or TIMEOUT passes.
  bool WaitIdle(std::chrono::milliseconds timeout);

 private:
  struct Request {
    uint64_t id = 0;
    v1::GenerateRequest spec;
    std::shared_ptr<RequestStream> stream;
    int cache = 0;  // which of the job's caches holds its blocks (its rank under dp)
    std::vector<int32_t> blocks;
    std::vector<int32_t> output;
    int64_t cached = 0;  // tokens whose rows are in the cache
    int64_t prefix_hit = 0;  // of them, found in the prefix cache at admission
    int64_t published = 0;   // full blocks offered to the prefix cache so far
    bool admitted = false;   // once at least (a resumed request is admitted again)
    Clock::time_point arrival, last_token;
    double time_to_first_token = 0.0;
    bool cancelled = false;
    int failed_steps = 0;  // steps in flight when a worker job died
  };
  struct Planned {
    uint64_t id;
    int64_t tokens;
    bool sample;
  };

  Status Validate(const v1::GenerateRequest& request) const;
  int64_t BlocksFor(const v1::GenerateRequest& request) const;
  void Finish(Request& r, v1::FinishReason reason);
  // Ends every request UNAVAILABLE with WHY. REQUIRES: mu_ held.
  void FailAll(const std::string& why);
  // Tokens whose rows the cache must hold before R samples again: its prompt and all but
  // the last token it generated (that one is the next step's input).
  static int64_t ContextToPrefill(const Request& r);
  // The tokens R's next steps run before it samples again: the rest of its prefill, or
  // one for a decode. What placement balances across caches.
  static int64_t TokensToRun(const Request& r);
  void Remove(uint64_t id);
  void Admit();
  // The cache R goes to (NEED blocks), with the prefix blocks it shares there, or -1 when
  // it fits none. Cost: the blocks the cache would use, against its budget, plus the
  // tokens its sequences have to run, against a step's: a cached prefix lowers both, so
  // a request goes where its prefix is unless that cache is the busier by more.
  int ChooseCache(const Request& r, int64_t need, const std::vector<int64_t>& work,
                  const std::vector<int64_t>& running, std::vector<int32_t>* shared) const;
  // Totals over the caches, for the metrics: prompt tokens queried, found; evictions.
  void PrefixTotals(int64_t* queried, int64_t* hits, int64_t* evictions) const;
  int64_t AvailableBlocks() const;
  // R's tokens so far, the row of each in the cache: its prompt, then its output.
  static std::vector<int32_t> Tokens(const Request& r);
  void ReportLoad();

  SchedulerOptions options_;
  SchedulerObserver* observer_;
  mutable std::mutex mu_;
  std::condition_variable idle_cv_;
  std::condition_variable work_cv_;
  bool woken_ = false;
  bool attached_ = false;
  bool draining_ = false;
  v1::ModelSummary model_;
  uint64_t next_id_ = 1;
  uint64_t next_step_ = 1;
  int64_t steps_ = 0;
  std::deque<uint64_t> waiting_;
  std::vector<uint64_t> running_;  // in admission order
  std::map<uint64_t, Request> requests_;
  std::vector<BlockPool> pools_;  // one per cache of the job
  int64_t retired_queried_ = 0, retired_hits_ = 0, retired_evictions_ = 0;  // of pools replaced
  bool in_flight_ = false;
  uint64_t in_flight_step_ = 0;
  std::vector<Planned> planned_;
  Clock::time_point detached_at_;
  std::string detached_why_;
  bool stopping_ = false;
  std::thread expirer_;  // ends requests that waited past resume_timeout
};

}  // namespace epic::coordinator
