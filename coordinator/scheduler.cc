#include "coordinator/scheduler.h"

#include <algorithm>
#include <cmath>

namespace epic::coordinator {

void RequestStream::Push(RequestEvent event) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    events_.push_back(std::move(event));
  }
  cv_.notify_one();
}

void RequestStream::Wait(std::vector<RequestEvent>* out, std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait_for(lock, timeout, [&] { return !events_.empty(); });
  while (!events_.empty()) {
    out->push_back(std::move(events_.front()));
    events_.pop_front();
  }
}

namespace {

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

Status TokenInVocabulary(const char* field, int index, int32_t id, int64_t vocab) {
  if (id >= 0 && id < vocab) return OkStatus();
  return InvalidArgumentError(std::string(field) + "[" + std::to_string(index) + "] is " + std::to_string(id) +
                              ", outside the vocabulary [0, " + std::to_string(vocab) + ")");
}

}  // namespace

Scheduler::Scheduler(const SchedulerOptions& options, SchedulerObserver* observer)
    : options_(options), observer_(observer) {
  pools_.emplace_back(options.num_blocks, options.block_size, options.prefix_cache);
  expirer_ = std::thread([this] {
    std::unique_lock<std::mutex> lock(mu_);
    while (!stopping_) {
      work_cv_.wait_for(lock, std::chrono::milliseconds(200));
      if (!attached_ && !requests_.empty() && Clock::now() - detached_at_ >= options_.resume_timeout) {
        FailAll("no worker job attached within the resume timeout after the last one left (" + detached_why_ + ")");
      }
    }
  });
}

Scheduler::~Scheduler() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  work_cv_.notify_all();
  expirer_.join();
}

void Scheduler::Attach(const v1::ModelSummary& model, int caches) {
  std::lock_guard<std::mutex> lock(mu_);
  model_ = model;
  attached_ = true;
  in_flight_ = false;
  planned_.clear();
  // A new job's caches hold nothing.
  if (static_cast<int>(pools_.size()) != std::max(caches, 1)) {
    PrefixTotals(&retired_queried_, &retired_hits_, &retired_evictions_);
    pools_.clear();
    for (int i = 0; i < std::max(caches, 1); ++i) {
      pools_.emplace_back(options_.num_blocks, options_.block_size, options_.prefix_cache);
    }
  }
  for (BlockPool& pool : pools_) pool.Reset();
  ReportLoad();
}

void Scheduler::FailAll(const std::string& why) {
  for (auto& [id, r] : requests_) {
    if (r.cancelled) continue;
    RequestEvent e;
    e.final = true;
    e.error = UnavailableError("the worker job left (" + why + "); the request was not completed, retry it");
    r.stream->Push(std::move(e));
    if (observer_) observer_->Finished(Seconds(Clock::now() - r.arrival), r.spec.prompt_token_ids_size(),
                                       static_cast<int64_t>(r.output.size()), "unavailable");
  }
  requests_.clear();
  waiting_.clear();
  running_.clear();
  ReportLoad();
  idle_cv_.notify_all();
}

void Scheduler::Detach(const std::string& why, bool resume) {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<uint64_t> in_step;
  if (in_flight_) {
    for (const Planned& p : planned_) in_step.push_back(p.id);
  }
  attached_ = false;
  in_flight_ = false;
  planned_.clear();
  for (BlockPool& pool : pools_) pool.Reset();
  detached_at_ = Clock::now();
  detached_why_ = why;
  if (!resume || options_.resume_timeout.count() <= 0 || draining_) {
    FailAll(why);
    return;
  }
  // Requests keep their place: those running first, in admission order, then the queue.
  std::deque<uint64_t> order(running_.begin(), running_.end());
  order.insert(order.end(), waiting_.begin(), waiting_.end());
  running_.clear();
  waiting_.clear();
  for (const uint64_t id : order) {
    Request& r = requests_.at(id);
    r.blocks.clear();
    r.cache = 0;  // the next job may hold fewer caches; admission places it again
    r.cached = 0;
    r.published = 0;
    if (r.cancelled) {
      requests_.erase(id);
      continue;
    }
    if (std::find(in_step.begin(), in_step.end(), id) != in_step.end() && ++r.failed_steps >= 2) {
      // The same request in the failing step twice: it may be the cause. Not again.
      RequestEvent e;
      e.final = true;
      e.error = UnavailableError("the worker job failed twice while running this request (last: " + why +
                                 "); it is not resumed again");
      r.stream->Push(std::move(e));
      if (observer_) observer_->Finished(Seconds(Clock::now() - r.arrival), r.spec.prompt_token_ids_size(),
                                         static_cast<int64_t>(r.output.size()), "unavailable");
      requests_.erase(id);
      continue;
    }
    waiting_.push_back(id);
  }
  ReportLoad();
  if (requests_.empty()) idle_cv_.notify_all();
}

void Scheduler::Drain() {
  std::lock_guard<std::mutex> lock(mu_);
  draining_ = true;
  if (!attached_ && !requests_.empty()) FailAll("the server is shutting down while " + detached_why_);
}

int64_t Scheduler::ContextToPrefill(const Request& r) {
  return r.spec.prompt_token_ids_size() + std::max<int64_t>(0, static_cast<int64_t>(r.output.size()) - 1);
}

int64_t Scheduler::TokensToRun(const Request& r) {
  return std::max<int64_t>(ContextToPrefill(r) - r.cached, 1);
}

int64_t Scheduler::BlocksFor(const v1::GenerateRequest& request) const {
  // Every row the request can write: the prompt and all but the last sampled token.
  const int64_t rows = request.prompt_token_ids_size() + static_cast<int64_t>(request.max_tokens()) - 1;
  return (rows + options_.block_size - 1) / options_.block_size;
}

Status Scheduler::Validate(const v1::GenerateRequest& request) const {
  const int64_t vocab = model_.vocab_size();
  if (request.prompt_token_ids_size() == 0) return InvalidArgumentError("prompt_token_ids is empty");
  for (int i = 0; i < request.prompt_token_ids_size(); ++i) {
    EPIC_RETURN_IF_ERROR(TokenInVocabulary("prompt_token_ids", i, request.prompt_token_ids(i), vocab));
  }
  for (int i = 0; i < request.stop_token_ids_size(); ++i) {
    EPIC_RETURN_IF_ERROR(TokenInVocabulary("stop_token_ids", i, request.stop_token_ids(i), vocab));
  }
  if (request.max_tokens() < 1) return InvalidArgumentError("max_tokens must be >= 1");
  const int64_t length = request.prompt_token_ids_size() + static_cast<int64_t>(request.max_tokens());
  if (length > model_.max_position_embeddings()) {
    return InvalidArgumentError("max_tokens: the prompt (" + std::to_string(request.prompt_token_ids_size()) +
                                ") plus max_tokens (" + std::to_string(request.max_tokens()) +
                                ") is past the model's context of " +
                                std::to_string(model_.max_position_embeddings()) + " tokens");
  }
  if (BlocksFor(request) > options_.num_blocks) {
    return InvalidArgumentError("max_tokens: the prompt plus max_tokens needs " +
                                std::to_string(BlocksFor(request)) + " cache blocks, more than a worker cache holds, " +
                                std::to_string(options_.num_blocks) + " (" +
                                std::to_string(options_.num_blocks * options_.block_size) + " cached tokens)");
  }
  const v1::SamplingParams& s = request.sampling();
  if (!std::isfinite(s.temperature()) || s.temperature() < 0) {
    return InvalidArgumentError("sampling.temperature must be a finite number >= 0");
  }
  if (s.has_top_p() && !(s.top_p() > 0 && s.top_p() <= 1)) {
    return InvalidArgumentError("sampling.top_p must be in (0, 1]");
  }
  if (s.top_k() < 0) return InvalidArgumentError("sampling.top_k must be >= 0 (0: no limit)");
  return OkStatus();
}

StatusOr<uint64_t> Scheduler::Submit(const v1::GenerateRequest& request, std::shared_ptr<RequestStream> stream) {
  std::lock_guard<std::mutex> lock(mu_);
  if (draining_) return UnavailableError("the server is shutting down and accepts no new requests");
  if (!attached_) {
    return UnavailableError("no worker job is attached (the cluster is starting, or its worker job is "
                            "being relaunched); retry shortly");
  }
  EPIC_RETURN_IF_ERROR(Validate(request));
  if (static_cast<int64_t>(waiting_.size()) >= options_.max_waiting) {
    return ResourceExhaustedError("the queue is full (" + std::to_string(options_.max_waiting) +
                                  " requests waiting); retry later");
  }
  Request r;
  r.id = next_id_++;
  r.spec = request;
  r.stream = std::move(stream);
  r.arrival = Clock::now();
  const uint64_t id = r.id;
  requests_.emplace(id, std::move(r));
  waiting_.push_back(id);
  ReportLoad();
  work_cv_.notify_all();
  return id;
}

void Scheduler::Cancel(uint64_t id, const std::string& outcome) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = requests_.find(id);
  if (it == requests_.end() || it->second.cancelled) return;
  Request& r = it->second;
  r.cancelled = true;
  if (observer_) {
    observer_->Finished(Seconds(Clock::now() - r.arrival), r.spec.prompt_token_ids_size(),
                        static_cast<int64_t>(r.output.size()), outcome);
  }
  // A request in the step in flight keeps its blocks until the step returns.
  const bool in_step = in_flight_ && std::any_of(planned_.begin(), planned_.end(),
                                                 [id](const Planned& p) { return p.id == id; });
  if (!in_step) Remove(id);
  ReportLoad();
}

void Scheduler::Remove(uint64_t id) {
  auto it = requests_.find(id);
  if (it == requests_.end()) return;
  pools_.at(static_cast<size_t>(it->second.cache)).Release(it->second.blocks);
  requests_.erase(it);
  waiting_.erase(std::remove(waiting_.begin(), waiting_.end(), id), waiting_.end());
  running_.erase(std::remove(running_.begin(), running_.end(), id), running_.end());
  if (requests_.empty()) idle_cv_.notify_all();
}

int Scheduler::ChooseCache(const Request& r, int64_t need, const std::vector<int64_t>& work,
                           const std::vector<int64_t>& running, std::vector<int32_t>* shared) const {
  // Only the blocks it does not share count: its context's full blocks found in the
  // prefix cache are its own too. At least one prompt token is prefilled, for logits.
  std::vector<int32_t> context;
  const int64_t prefill = ContextToPrefill(r);
  if (options_.prefix_cache) context = Tokens(r);
  const int64_t shareable = r.output.empty() ? (prefill - 1) / options_.block_size : prefill / options_.block_size;
  int best = -1;
  double best_cost = 0;
  for (size_t p = 0; p < pools_.size(); ++p) {
    if (running[p] >= options_.max_running) continue;
    const BlockPool& pool = pools_[p];
    std::vector<int32_t> found;
    if (options_.prefix_cache) {
      found = pool.FindPrefix(std::span<const int32_t>(context).first(static_cast<size_t>(prefill)), shareable);
    }
    const int64_t fresh = need - static_cast<int64_t>(found.size());
    // Shared blocks nobody used were counted as available: taking them makes them not.
    const int64_t available = pool.available() - pool.Unused(found);
    if (fresh > available) continue;
    const double cost =
        static_cast<double>(pool.num_blocks() - available + fresh) / static_cast<double>(options_.num_blocks) +
        static_cast<double>(work[p] + prefill - static_cast<int64_t>(found.size()) * options_.block_size) /
            static_cast<double>(options_.max_step_tokens);
    if (best < 0 || cost < best_cost) {
      best = static_cast<int>(p);
      best_cost = cost;
      *shared = std::move(found);
    }
  }
  return best;
}

void Scheduler::Admit() {
  // Each cache's running requests and the tokens they have left to run in their next
  // steps (a decode is one), which placement balances.
  std::vector<int64_t> work(pools_.size(), 0), running(pools_.size(), 0);
  for (const uint64_t id : running_) {
    const Request& r = requests_.at(id);
    ++running[static_cast<size_t>(r.cache)];
    work[static_cast<size_t>(r.cache)] += TokensToRun(r);
  }
  // First come, first served: a request that does not fit holds back those behind it,
  // so a long one is never starved by a stream of short ones.
  bool admitted = false;
  while (!waiting_.empty()) {
    Request& r = requests_.at(waiting_.front());
    const int64_t need = BlocksFor(r.spec);
    std::vector<int32_t> shared;
    const int cache = ChooseCache(r, need, work, running, &shared);
    if (cache < 0) break;
    BlockPool& pool = pools_[static_cast<size_t>(cache)];
    const int64_t fresh = need - static_cast<int64_t>(shared.size());
    pool.Take(shared);
    r.cache = cache;
    r.blocks = std::move(shared);
    r.cached = static_cast<int64_t>(r.blocks.size()) * options_.block_size;
    if (!r.admitted && options_.prefix_cache) {  // counted once, not again when resumed
      r.prefix_hit = r.cached;
      pool.Count(r.spec.prompt_token_ids_size(), r.cached);
    }
    r.admitted = true;
    r.published = static_cast<int64_t>(r.blocks.size());
    const std::vector<int32_t> more = pool.Allocate(fresh);
    r.blocks.insert(r.blocks.end(), more.begin(), more.end());
    ++running[static_cast<size_t>(cache)];
    work[static_cast<size_t>(cache)] += TokensToRun(r);
    running_.push_back(r.id);
    waiting_.pop_front();
    admitted = true;
  }
  if (admitted && observer_) {
    int64_t queried = 0, hits = 0, evictions = 0;
    PrefixTotals(&queried, &hits, &evictions);
    observer_->PrefixCache(queried, hits, evictions);
  }
}

void Scheduler::PrefixTotals(int64_t* queried, int64_t* hits, int64_t* evictions) const {
  *queried = retired_queried_;
  *hits = retired_hits_;
  *evictions = retired_evictions_;
  for (const BlockPool& pool : pools_) {
    *queried += pool.queried_tokens();
    *hits += pool.hit_tokens();
    *evictions += pool.evictions();
  }
}

int64_t Scheduler::AvailableBlocks() const {
  int64_t n = 0;
  for (const BlockPool& pool : pools_) n += pool.available();
  return n;
}

std::vector<int32_t> Scheduler::Tokens(const Request& r) {
  std::vector<int32_t> tokens(r.spec.prompt_token_ids().begin(), r.spec.prompt_token_ids().end());
  tokens.insert(tokens.end(), r.output.begin(), r.output.end());
  return tokens;
}

bool Scheduler::NextStep(v1::internal::Step* step) {
  std::lock_guard<std::mutex> lock(mu_);
  step->Clear();
  if (!attached_ || in_flight_) return false;
  Admit();
  planned_.clear();
  // Each cache's sequences run on their own ranks: a token budget each.
  std::vector<int64_t> budgets(pools_.size(), options_.max_step_tokens);
  auto add = [&](Request& r, const int32_t* tokens, int64_t n, bool sample) {
    v1::internal::SequenceWork* w = step->add_sequences();
    w->set_sequence_id(r.id);
    w->set_rank(r.cache);
    w->mutable_token_ids()->Add(tokens, tokens + n);
    w->set_position(r.cached);
    // Only the blocks the rows so far need: the worker checks no more.
    const int64_t used = (r.cached + n + options_.block_size - 1) / options_.block_size;
    w->mutable_blocks()->Add(r.blocks.begin(), r.blocks.begin() + used);
    w->set_sample(sample);
    if (sample) {
      *w->mutable_sampling() = r.spec.sampling();
      w->set_draw(r.output.size());
      w->set_logprobs(r.spec.logprobs());
    }
    planned_.push_back({r.id, n, sample});
    budgets[static_cast<size_t>(r.cache)] -= n;
  };
  // Decodes first, so that a long prefill never stalls the running streams.
  for (uint64_t id : running_) {
    Request& r = requests_.at(id);
    const int64_t budget = budgets[static_cast<size_t>(r.cache)];
    if (r.cancelled || r.output.empty() || r.cached < ContextToPrefill(r) || budget < 1) continue;
    add(r, &r.output.back(), 1, true);
  }
  // Prefill chunks: the prompt, and for a request resumed on a new job the tokens it had
  // generated too; the chunk that completes a prompt samples, a replay's does not (its
  // next token comes from the decode of its last generated token).
  std::vector<int32_t> chunk;
  for (uint64_t id : running_) {
    Request& r = requests_.at(id);
    const int64_t context = ContextToPrefill(r);
    const int64_t budget = budgets[static_cast<size_t>(r.cache)];
    if (r.cancelled || r.cached >= context || budget < 1) continue;
    const int64_t n = std::min(context - r.cached, budget);
    const int64_t prompt = r.spec.prompt_token_ids_size();
    chunk.clear();
    for (int64_t i = r.cached; i < r.cached + n; ++i) {
      chunk.push_back(i < prompt ? r.spec.prompt_token_ids(static_cast<int>(i)) : r.output[static_cast<size_t>(i - prompt)]);
    }
    add(r, chunk.data(), n, r.output.empty() && r.cached + n == prompt);
  }
  if (planned_.empty()) return false;
  step->set_step_id(next_step_++);
  in_flight_ = true;
  in_flight_step_ = step->step_id();
  return true;
}

Status Scheduler::Complete(const v1::internal::StepResult& result) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!in_flight_ || result.step_id() != in_flight_step_) {
    return InternalError("the worker returned step " + std::to_string(result.step_id()) + ", expected " +
                         (in_flight_ ? std::to_string(in_flight_step_) : std::string("none")));
  }
  std::map<uint64_t, const v1::internal::Sampled*> sampled;
  for (const auto& s : result.sampled()) sampled[s.sequence_id()] = &s;
  // Checked before anything changes, so that a bad result leaves no request half-advanced.
  for (const Planned& p : planned_) {
    if (p.sample && !sampled.count(p.id)) {
      return InternalError("the worker returned no token for sequence " + std::to_string(p.id));
    }
    if (p.sample && (sampled[p.id]->token_id() < 0 || sampled[p.id]->token_id() >= model_.vocab_size())) {
      return InternalError("the worker sampled token " + std::to_string(sampled[p.id]->token_id()) +
                           " for sequence " + std::to_string(p.id) + ", outside the vocabulary [0, " +
                           std::to_string(model_.vocab_size()) + ")");
    }
  }
  in_flight_ = false;
  ++steps_;
  const Clock::time_point now = Clock::now();
  for (const Planned& p : planned_) {
    auto it = requests_.find(p.id);
    if (it == requests_.end()) continue;
    Request& r = it->second;
    if (r.cancelled) {
      Remove(p.id);
      continue;
    }
    r.cached += p.tokens;
    if (options_.prefix_cache && (r.cached / options_.block_size) > r.published) {
      // Rows [0, cached) are written: their full blocks may serve later prompts.
      const std::vector<int32_t> tokens = Tokens(r);
      r.published = pools_[static_cast<size_t>(r.cache)].Publish(r.blocks, std::span<const int32_t>(tokens).first(static_cast<size_t>(r.cached)),
                                  r.published);
    }
    if (!p.sample) continue;
    auto s = sampled.find(p.id);
    const int32_t token = s->second->token_id();
    r.output.push_back(token);
    if (r.output.size() == 1) {
      r.time_to_first_token = Seconds(now - r.arrival);
      if (observer_) observer_->FirstToken(r.time_to_first_token);
    } else if (observer_) {
      observer_->InterToken(Seconds(now - r.last_token));
    }
    r.last_token = now;
    RequestEvent e;
    e.tokens.push_back(token);
    if (r.spec.logprobs()) e.logprobs.push_back(s->second->logprob());
    r.stream->Push(std::move(e));

    const auto& stops = r.spec.stop_token_ids();
    const auto& eos = model_.eos_token_ids();
    if (std::find(stops.begin(), stops.end(), token) != stops.end() ||
        (!r.spec.ignore_eos() && std::find(eos.begin(), eos.end(), token) != eos.end())) {
      Finish(r, v1::FINISH_REASON_STOP);
    } else if (r.output.size() >= r.spec.max_tokens()) {
      Finish(r, v1::FINISH_REASON_LENGTH);
    }
  }
  planned_.clear();
  ReportLoad();
  return OkStatus();
}

void Scheduler::Finish(Request& r, v1::FinishReason reason) {
  RequestEvent e;
  e.final = true;
  e.finish_reason = reason;
  e.prompt_tokens = r.spec.prompt_token_ids_size();
  e.completion_tokens = static_cast<int64_t>(r.output.size());
  e.cached_tokens = r.prefix_hit;
  e.time_to_first_token = r.time_to_first_token;
  r.stream->Push(std::move(e));
  if (observer_) {
    observer_->Finished(Seconds(Clock::now() - r.arrival), r.spec.prompt_token_ids_size(),
                        static_cast<int64_t>(r.output.size()),
                        reason == v1::FINISH_REASON_STOP ? "stop" : "length");
  }
  Remove(r.id);
}

void Scheduler::ReportLoad() {
  if (!observer_) return;
  const double total = static_cast<double>(options_.num_blocks) * static_cast<double>(pools_.size());
  const double usage = total > 0 && attached_ ? 1.0 - static_cast<double>(AvailableBlocks()) / total : 0.0;
  observer_->Load(static_cast<int64_t>(running_.size()), static_cast<int64_t>(waiting_.size()), usage);
}

SchedulerStats Scheduler::Stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  SchedulerStats s;
  s.running = static_cast<int64_t>(running_.size());
  s.waiting = static_cast<int64_t>(waiting_.size());
  s.free_blocks = attached_ ? AvailableBlocks() : 0;
  s.total_blocks = options_.num_blocks * static_cast<int64_t>(pools_.size());
  s.cache_running.assign(pools_.size(), 0);
  for (const uint64_t id : running_) ++s.cache_running[static_cast<size_t>(requests_.at(id).cache)];
  for (const BlockPool& pool : pools_) {
    s.cached_blocks += pool.cached_blocks();
    s.cache_free_blocks.push_back(attached_ ? pool.available() : 0);
  }
  s.steps = steps_;
  s.attached = attached_;
  s.draining = draining_;
  return s;
}

void Scheduler::WaitForWork(std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lock(mu_);
  work_cv_.wait_for(lock, timeout, [&] { return woken_ || !waiting_.empty() || !running_.empty(); });
  woken_ = false;
}

void Scheduler::Wake() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    woken_ = true;
  }
  work_cv_.notify_all();
}

bool Scheduler::WaitIdle(std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lock(mu_);
  return idle_cv_.wait_for(lock, timeout, [&] { return requests_.empty(); });
}

}  // namespace epic::coordinator
