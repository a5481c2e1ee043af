// The request scheduler driven as the worker link drives it: steps are built, a
// fabricated worker answers them, and what reaches each request's stream is checked.
#include "coordinator/scheduler.h"

#include "coordinator/block_pool.h"

#include <atomic>
#include <cmath>
#include <functional>
#include <limits>
#include <map>
#include <set>
#include <thread>

#include <gtest/gtest.h>

namespace epic::coordinator {
namespace {

using std::chrono::milliseconds;

constexpr int64_t kVocab = 100;
constexpr int32_t kEos = 2;
constexpr int32_t kToken = 7;  // what the fabricated worker samples unless told otherwise

v1::ModelSummary Model(int64_t max_position_embeddings = 4096, std::vector<int32_t> eos = {kEos}) {
  v1::ModelSummary m;
  m.set_vocab_size(kVocab);
  m.set_max_position_embeddings(max_position_embeddings);
  for (int32_t id : eos) m.add_eos_token_ids(id);
  return m;
}

SchedulerOptions Options(int64_t block_size, int64_t num_blocks, int64_t max_step_tokens = 256) {
  SchedulerOptions o;
  o.block_size = block_size;
  o.num_blocks = num_blocks;
  o.max_step_tokens = max_step_tokens;
  return o;
}

// Prompt ids start at 10 so that none is the eos id.
std::vector<int32_t> Prompt(int n, int32_t first = 10) {
  std::vector<int32_t> p(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) p[static_cast<size_t>(i)] = first + i % 50;
  return p;
}

v1::GenerateRequest Request(const std::vector<int32_t>& prompt, uint32_t max_tokens) {
  v1::GenerateRequest r;
  r.mutable_prompt_token_ids()->Add(prompt.begin(), prompt.end());
  r.set_max_tokens(max_tokens);
  return r;
}

struct Client {
  uint64_t id = 0;
  std::shared_ptr<RequestStream> stream = std::make_shared<RequestStream>();
};

Client Submit(Scheduler& s, const v1::GenerateRequest& request) {
  Client c;
  StatusOr<uint64_t> id = s.Submit(request, c.stream);
  EXPECT_TRUE(id.ok()) << id.status().ToString();
  if (id.ok()) c.id = *id;
  return c;
}

// Events are pushed inside Complete, so a short wait only matters when none came.
std::vector<RequestEvent> Events(const Client& c, milliseconds timeout = milliseconds(10)) {
  std::vector<RequestEvent> out;
  c.stream->Wait(&out, timeout);
  return out;
}

std::vector<int32_t> Tokens(const std::vector<RequestEvent>& events) {
  std::vector<int32_t> tokens;
  for (const RequestEvent& e : events) tokens.insert(tokens.end(), e.tokens.begin(), e.tokens.end());
  return tokens;
}

// The worker's answer to STEP: one Sampled per sampling sequence, its token from PICK.
v1::internal::StepResult Answer(const v1::internal::Step& step,
                                const std::function<int32_t(uint64_t)>& pick = [](uint64_t) { return kToken; }) {
  v1::internal::StepResult result;
  result.set_step_id(step.step_id());
  for (const auto& w : step.sequences()) {
    if (!w.sample()) continue;
    v1::internal::Sampled* s = result.add_sampled();
    s->set_sequence_id(w.sequence_id());
    s->set_token_id(pick(w.sequence_id()));
    s->set_logprob(-0.25f * static_cast<float>(w.draw() + 1));
  }
  return result;
}

const v1::internal::SequenceWork* Find(const v1::internal::Step& step, uint64_t id) {
  for (const auto& w : step.sequences()) {
    if (w.sequence_id() == id) return &w;
  }
  return nullptr;
}

int64_t StepTokens(const v1::internal::Step& step) {
  int64_t n = 0;
  for (const auto& w : step.sequences()) n += w.token_ids_size();
  return n;
}

// Builds and completes one step, answering every sample with TOKEN.
v1::internal::Step RunStep(Scheduler& s, int32_t token = kToken) {
  v1::internal::Step step;
  EXPECT_TRUE(s.NextStep(&step));
  const Status done = s.Complete(Answer(step, [token](uint64_t) { return token; }));
  EXPECT_TRUE(done.ok()) << done.ToString();
  return step;
}

// Replays what the worker would see and checks every step against it: each sequence's
// rows arrive in order (its prompt, then each sampled token but the last), sampling
// happens exactly at the end of the prompt and after each decode, blocks cover the rows
// and stay the sequence's own, decodes come before prefill chunks, and the token budget holds.
class StepChecker {
 public:
  explicit StepChecker(const SchedulerOptions& options) : options_(options) {}

  void Expect(uint64_t id, const std::vector<int32_t>& prompt) { seqs_[id].prompt = prompt; }

  // Under data-parallel attention (CACHES > 1) each rank's cache, budget and
  // sequences are its own.
  void Check(const v1::internal::Step& step, int caches = 1) {
    SCOPED_TRACE("step " + std::to_string(step.step_id()));
    std::map<int32_t, int64_t> tokens, sequences;
    for (const auto& w : step.sequences()) {
      ASSERT_GE(w.rank(), 0);
      ASSERT_LT(w.rank(), caches);
      tokens[w.rank()] += w.token_ids_size();
      ++sequences[w.rank()];
    }
    for (const auto& [rank, n] : tokens) EXPECT_LE(n, options_.max_step_tokens) << "rank " << rank;
    for (const auto& [rank, n] : sequences) EXPECT_LE(n, options_.max_running) << "rank " << rank;
    bool prefill_seen = false;
    std::map<std::pair<int32_t, int32_t>, uint64_t> owner;  // (rank, block)
    for (const auto& w : step.sequences()) {
      ASSERT_TRUE(seqs_.count(w.sequence_id())) << "unknown sequence " << w.sequence_id();
      Seq& q = seqs_[w.sequence_id()];
      if (q.rank < 0) q.rank = w.rank();
      EXPECT_EQ(w.rank(), q.rank) << "a sequence moved between ranks";
      const int64_t prompt = static_cast<int64_t>(q.prompt.size());
      ASSERT_GT(w.token_ids_size(), 0);
      EXPECT_EQ(w.position(), q.cached);
      const int64_t end = w.position() + w.token_ids_size();
      if (w.position() < prompt) {
        prefill_seen = true;
        ASSERT_LE(end, prompt);
        EXPECT_EQ(std::vector<int32_t>(w.token_ids().begin(), w.token_ids().end()),
                  std::vector<int32_t>(q.prompt.begin() + w.position(), q.prompt.begin() + end));
        EXPECT_EQ(w.sample(), end == prompt);
      } else {
        EXPECT_FALSE(prefill_seen) << "a decode after a prefill chunk";
        ASSERT_EQ(w.token_ids_size(), 1);
        ASSERT_FALSE(q.output.empty());
        EXPECT_EQ(w.token_ids(0), q.output.back());
        EXPECT_EQ(w.position(), prompt + static_cast<int64_t>(q.output.size()) - 1);
        EXPECT_TRUE(w.sample());
      }
      if (w.sample()) {
        EXPECT_EQ(w.draw(), q.output.size());
      }
      EXPECT_EQ(w.blocks_size(), (end + options_.block_size - 1) / options_.block_size);
      std::vector<int32_t> blocks(w.blocks().begin(), w.blocks().end());
      // A sequence's earlier blocks never move.
      for (size_t i = 0; i < std::min(blocks.size(), q.blocks.size()); ++i) EXPECT_EQ(blocks[i], q.blocks[i]);
      if (blocks.size() > q.blocks.size()) q.blocks = blocks;
      for (int32_t b : blocks) {
        EXPECT_GE(b, 0);
        EXPECT_LT(b, options_.num_blocks);
        const std::pair<int32_t, int32_t> at(w.rank(), b);
        EXPECT_TRUE(owner.emplace(at, w.sequence_id()).second || owner[at] == w.sequence_id())
            << "block " << b << " of rank " << w.rank() << " shared by two sequences";
      }
      q.pending = w.token_ids_size();
    }
  }

  void Apply(const v1::internal::Step& step, const v1::internal::StepResult& result) {
    std::map<uint64_t, int32_t> sampled;
    for (const auto& s : result.sampled()) sampled[s.sequence_id()] = s.token_id();
    for (const auto& w : step.sequences()) {
      Seq& q = seqs_[w.sequence_id()];
      q.cached += q.pending;
      if (w.sample()) q.output.push_back(sampled.at(w.sequence_id()));
    }
  }

  // Steps until none is left, answering with PICK; returns them.
  std::vector<v1::internal::Step> Run(Scheduler& s, const std::function<int32_t(uint64_t)>& pick =
                                                         [](uint64_t) { return kToken; }, int caches = 1) {
    std::vector<v1::internal::Step> steps;
    v1::internal::Step step;
    while (s.NextStep(&step)) {
      Check(step, caches);
      const v1::internal::StepResult result = Answer(step, pick);
      const Status done = s.Complete(result);
      EXPECT_TRUE(done.ok()) << done.ToString();
      Apply(step, result);
      steps.push_back(step);
      if (steps.size() > 1000) {
        ADD_FAILURE() << "the scheduler never ran out of work";
        break;
      }
    }
    return steps;
  }

 private:
  struct Seq {
    std::vector<int32_t> prompt, output, blocks;
    int64_t cached = 0;
    int64_t pending = 0;
    int32_t rank = -1;
  };
  SchedulerOptions options_;
  std::map<uint64_t, Seq> seqs_;
};

// --- validation ---

void ExpectInvalid(Scheduler& s, const v1::GenerateRequest& request, const std::string& field) {
  StatusOr<uint64_t> id = s.Submit(request, std::make_shared<RequestStream>());
  ASSERT_FALSE(id.ok()) << "accepted a request with a bad " << field;
  EXPECT_EQ(id.status().code(), StatusCode::kInvalidArgument) << id.status().ToString();
  EXPECT_NE(id.status().message().find(field), std::string::npos)
      << "'" << id.status().message() << "' does not name " << field;
}

TEST(SchedulerValidation, RejectsBadFieldsNamingThem) {
  Scheduler s(Options(16, 1024));
  s.Attach(Model(/*max_position_embeddings=*/64));
  const v1::GenerateRequest good = Request(Prompt(4), 8);

  ExpectInvalid(s, Request({}, 8), "prompt_token_ids");
  ExpectInvalid(s, Request({10, static_cast<int32_t>(kVocab), 11}, 8), "prompt_token_ids[1]");
  ExpectInvalid(s, Request({-1}, 8), "prompt_token_ids[0]");
  v1::GenerateRequest r = good;
  r.add_stop_token_ids(5);
  r.add_stop_token_ids(static_cast<int32_t>(kVocab));
  ExpectInvalid(s, r, "stop_token_ids[1]");
  ExpectInvalid(s, Request(Prompt(4), 0), "max_tokens");
  ExpectInvalid(s, Request(Prompt(4), 61), "max_tokens");  // 4 + 61 > 64 positions

  for (float t : {-0.5f, std::nanf(""), std::numeric_limits<float>::infinity()}) {
    r = good;
    r.mutable_sampling()->set_temperature(t);
    ExpectInvalid(s, r, "sampling.temperature");
  }
  for (float p : {0.0f, 1.5f, -0.1f, std::nanf("")}) {
    r = good;
    r.mutable_sampling()->set_top_p(p);
    ExpectInvalid(s, r, "sampling.top_p");
  }
  r = good;
  r.mutable_sampling()->set_top_k(-1);
  ExpectInvalid(s, r, "sampling.top_k");
  EXPECT_EQ(s.Stats().waiting, 0) << "a rejected request was queued";

  // The edges that are allowed.
  r = Request({0, static_cast<int32_t>(kVocab - 1)}, 62);  // 2 + 62 == 64 positions
  r.add_stop_token_ids(static_cast<int32_t>(kVocab - 1));
  r.mutable_sampling()->set_temperature(0.0f);
  r.mutable_sampling()->set_top_p(1.0f);
  r.mutable_sampling()->set_top_k(0);
  EXPECT_TRUE(s.Submit(r, std::make_shared<RequestStream>()).ok());
  EXPECT_EQ(s.Stats().waiting, 1);
}

TEST(SchedulerValidation, RejectsRequestLargerThanTheWholeCache) {
  Scheduler s(Options(/*block_size=*/4, /*num_blocks=*/4));  // 16 tokens in all
  s.Attach(Model());
  ExpectInvalid(s, Request(Prompt(10), 10), "cache blocks");
  ExpectInvalid(s, Request(Prompt(20), 1), "max_tokens");
  EXPECT_TRUE(s.Submit(Request(Prompt(8), 8), std::make_shared<RequestStream>()).ok());
  // The last sampled token is never written: 9 + 8 - 1 = 16 rows fill the cache exactly.
  EXPECT_TRUE(s.Submit(Request(Prompt(9), 8), std::make_shared<RequestStream>()).ok());
  ExpectInvalid(s, Request(Prompt(10), 8), "cache blocks");
}

TEST(SchedulerValidation, UnavailableBeforeAttachAfterDrainAndAfterDetach) {
  Scheduler s(Options(16, 64));
  StatusOr<uint64_t> id = s.Submit(Request(Prompt(4), 4), std::make_shared<RequestStream>());
  ASSERT_FALSE(id.ok());
  EXPECT_EQ(id.status().code(), StatusCode::kUnavailable);
  v1::internal::Step step;
  EXPECT_FALSE(s.NextStep(&step));

  s.Attach(Model());
  ASSERT_TRUE(s.Submit(Request(Prompt(4), 4), std::make_shared<RequestStream>()).ok());
  s.Detach("test");
  id = s.Submit(Request(Prompt(4), 4), std::make_shared<RequestStream>());
  ASSERT_FALSE(id.ok());
  EXPECT_EQ(id.status().code(), StatusCode::kUnavailable);

  s.Attach(Model());
  const Client running = Submit(s, Request(Prompt(4), 3));
  RunStep(s);
  s.Drain();
  EXPECT_TRUE(s.Stats().draining);
  id = s.Submit(Request(Prompt(4), 4), std::make_shared<RequestStream>());
  ASSERT_FALSE(id.ok());
  EXPECT_EQ(id.status().code(), StatusCode::kUnavailable);
  // Requests already accepted still run to their end.
  int rest = 0;
  while (s.NextStep(&step) && rest < 10) {
    ASSERT_TRUE(s.Complete(Answer(step)).ok());
    ++rest;
  }
  EXPECT_EQ(rest, 2);
  const std::vector<RequestEvent> events = Events(running);
  ASSERT_FALSE(events.empty());
  EXPECT_TRUE(events.back().final);
  EXPECT_EQ(events.back().finish_reason, v1::FINISH_REASON_LENGTH);
  EXPECT_EQ(Tokens(events).size(), 3u);
}

TEST(SchedulerValidation, ResourceExhaustedWhenTheQueueIsFull) {
  SchedulerOptions o = Options(16, 64);
  o.max_waiting = 2;
  Scheduler s(o);
  s.Attach(Model());
  Submit(s, Request(Prompt(4), 4));
  Submit(s, Request(Prompt(4), 4));
  StatusOr<uint64_t> id = s.Submit(Request(Prompt(4), 4), std::make_shared<RequestStream>());
  ASSERT_FALSE(id.ok());
  EXPECT_EQ(id.status().code(), StatusCode::kResourceExhausted);
  EXPECT_EQ(s.Stats().waiting, 2);
  // Only waiting requests count: once admitted, the queue has room again.
  v1::internal::Step step;
  ASSERT_TRUE(s.NextStep(&step));
  EXPECT_EQ(s.Stats().waiting, 0);
  EXPECT_EQ(s.Stats().running, 2);
  EXPECT_TRUE(s.Submit(Request(Prompt(4), 4), std::make_shared<RequestStream>()).ok());
}

// --- admission against the block budget ---

TEST(SchedulerAdmission, RequestThatDoesNotFitWaitsUntilBlocksFree) {
  const SchedulerOptions o = Options(/*block_size=*/4, /*num_blocks=*/4);
  Scheduler s(o);
  s.Attach(Model());
  StepChecker checker(o);
  const Client a = Submit(s, Request(Prompt(6), 6));  // 12 rows: 3 blocks
  const Client b = Submit(s, Request(Prompt(4), 4));  // 8 rows: 2 blocks, 1 left
  checker.Expect(a.id, Prompt(6));
  checker.Expect(b.id, Prompt(4));

  v1::internal::Step step;
  ASSERT_TRUE(s.NextStep(&step));
  checker.Check(step);
  EXPECT_NE(Find(step, a.id), nullptr);
  EXPECT_EQ(Find(step, b.id), nullptr);
  SchedulerStats stats = s.Stats();
  EXPECT_EQ(stats.running, 1);
  EXPECT_EQ(stats.waiting, 1);
  EXPECT_EQ(stats.free_blocks, 1);
  EXPECT_EQ(stats.total_blocks, 4);
  auto result = Answer(step);
  ASSERT_TRUE(s.Complete(result).ok());
  checker.Apply(step, result);

  const std::vector<v1::internal::Step> steps = checker.Run(s);
  // A decodes 5 more tokens alone; then B runs once A's blocks are back.
  ASSERT_EQ(steps.size(), 5u + 4u);
  for (size_t i = 0; i < 5; ++i) {
    EXPECT_NE(Find(steps[i], a.id), nullptr);
    EXPECT_EQ(Find(steps[i], b.id), nullptr) << "B ran in step " << i << " before A freed its blocks";
  }
  for (size_t i = 5; i < steps.size(); ++i) {
    EXPECT_EQ(Find(steps[i], a.id), nullptr);
    EXPECT_NE(Find(steps[i], b.id), nullptr);
  }
  EXPECT_EQ(Tokens(Events(a)).size(), 6u);
  EXPECT_EQ(Tokens(Events(b)).size(), 4u);
  stats = s.Stats();
  EXPECT_EQ(stats.free_blocks, 4);
  EXPECT_EQ(stats.running, 0);
  EXPECT_EQ(stats.waiting, 0);
  EXPECT_EQ(stats.steps, 10);
  EXPECT_TRUE(s.WaitIdle(milliseconds(0)));
}

TEST(SchedulerAdmission, FirstComeFirstServed) {
  const SchedulerOptions o = Options(/*block_size=*/4, /*num_blocks=*/4);
  Scheduler s(o);
  s.Attach(Model());
  StepChecker checker(o);
  const Client a = Submit(s, Request(Prompt(6), 6));  // 3 blocks
  const Client b = Submit(s, Request(Prompt(4), 4));  // 2 blocks: does not fit beside A
  const Client c = Submit(s, Request(Prompt(2), 2));  // 1 block: would fit, but B came first
  checker.Expect(a.id, Prompt(6));
  checker.Expect(b.id, Prompt(4));
  checker.Expect(c.id, Prompt(2));

  const std::vector<v1::internal::Step> steps = checker.Run(s);
  size_t first_b = steps.size(), first_c = steps.size(), last_a = 0;
  for (size_t i = 0; i < steps.size(); ++i) {
    if (Find(steps[i], a.id)) last_a = i;
    if (Find(steps[i], b.id) && first_b == steps.size()) first_b = i;
    if (Find(steps[i], c.id) && first_c == steps.size()) first_c = i;
  }
  EXPECT_GT(first_c, last_a) << "C overtook B, which was waiting before it";
  EXPECT_EQ(first_b, last_a + 1);
  // B and C fit together (2 + 1 blocks) and are admitted in arrival order.
  ASSERT_EQ(first_c, first_b);
  ASSERT_EQ(steps[first_b].sequences_size(), 2);
  EXPECT_EQ(steps[first_b].sequences(0).sequence_id(), b.id);
  EXPECT_EQ(steps[first_b].sequences(1).sequence_id(), c.id);
  EXPECT_EQ(s.Stats().free_blocks, 4);
}

TEST(SchedulerAdmission, AtMostMaxRunningSequencesPerStep) {
  SchedulerOptions o = Options(16, 64);
  o.max_running = 2;
  Scheduler s(o);
  s.Attach(Model());
  StepChecker checker(o);
  std::vector<Client> clients;
  for (int i = 0; i < 3; ++i) {
    clients.push_back(Submit(s, Request(Prompt(3), 2)));
    checker.Expect(clients.back().id, Prompt(3));
  }
  v1::internal::Step step;
  ASSERT_TRUE(s.NextStep(&step));
  EXPECT_EQ(step.sequences_size(), 2);
  EXPECT_EQ(Find(step, clients[2].id), nullptr);
  EXPECT_EQ(s.Stats().waiting, 1);
  checker.Check(step);
  auto result = Answer(step);
  ASSERT_TRUE(s.Complete(result).ok());
  checker.Apply(step, result);
  checker.Run(s);
  for (const Client& c : clients) EXPECT_EQ(Tokens(Events(c)).size(), 2u);
}

// --- chunked prefill ---

TEST(SchedulerPrefill, LongPromptIsSplitIntoChunks) {
  const SchedulerOptions o = Options(/*block_size=*/4, /*num_blocks=*/64, /*max_step_tokens=*/8);
  Scheduler s(o);
  s.Attach(Model());
  const std::vector<int32_t> prompt = Prompt(20);
  const Client a = Submit(s, Request(prompt, 1));

  const std::vector<int64_t> positions = {0, 8, 16}, sizes = {8, 8, 4};
  for (size_t i = 0; i < positions.size(); ++i) {
    v1::internal::Step step;
    ASSERT_TRUE(s.NextStep(&step));
    ASSERT_EQ(step.sequences_size(), 1);
    const auto& w = step.sequences(0);
    EXPECT_EQ(w.position(), positions[i]);
    ASSERT_EQ(w.token_ids_size(), sizes[i]);
    EXPECT_EQ(std::vector<int32_t>(w.token_ids().begin(), w.token_ids().end()),
              std::vector<int32_t>(prompt.begin() + positions[i], prompt.begin() + positions[i] + sizes[i]));
    EXPECT_EQ(w.blocks_size(), (positions[i] + sizes[i] + 3) / 4);
    EXPECT_EQ(w.sample(), i + 1 == positions.size());
    ASSERT_TRUE(s.Complete(Answer(step)).ok());
    if (i + 1 < positions.size()) {
      EXPECT_TRUE(Events(a, milliseconds(0)).empty()) << "a token before the prompt ended";
    }
  }
  const std::vector<RequestEvent> events = Events(a);
  EXPECT_EQ(Tokens(events), std::vector<int32_t>({kToken}));
  v1::internal::Step step;
  EXPECT_FALSE(s.NextStep(&step));
}

TEST(SchedulerPrefill, DecodesComeFirstAndStepsKeepTheTokenBudget) {
  const SchedulerOptions o = Options(/*block_size=*/4, /*num_blocks=*/64, /*max_step_tokens=*/8);
  Scheduler s(o);
  s.Attach(Model());
  StepChecker checker(o);
  const Client a = Submit(s, Request(Prompt(3), 12));
  checker.Expect(a.id, Prompt(3));
  v1::internal::Step step;
  ASSERT_TRUE(s.NextStep(&step));
  checker.Check(step);
  auto result = Answer(step);
  ASSERT_TRUE(s.Complete(result).ok());
  checker.Apply(step, result);

  const Client b = Submit(s, Request(Prompt(20, 30), 2));
  const Client c = Submit(s, Request(Prompt(5, 40), 2));
  checker.Expect(b.id, Prompt(20, 30));
  checker.Expect(c.id, Prompt(5, 40));
  ASSERT_TRUE(s.NextStep(&step));
  checker.Check(step);
  // A's decode, then as much of B's prompt as the budget leaves.
  ASSERT_EQ(step.sequences_size(), 2);
  EXPECT_EQ(step.sequences(0).sequence_id(), a.id);
  EXPECT_EQ(step.sequences(0).token_ids_size(), 1);
  EXPECT_EQ(step.sequences(1).sequence_id(), b.id);
  EXPECT_EQ(step.sequences(1).token_ids_size(), 7);
  result = Answer(step);
  ASSERT_TRUE(s.Complete(result).ok());
  checker.Apply(step, result);

  const std::vector<v1::internal::Step> steps = checker.Run(s);
  int full = 0;
  for (const auto& st : steps) full += StepTokens(st) == o.max_step_tokens;
  EXPECT_GE(full, 2) << "prefill chunks did not fill the steps";
  EXPECT_EQ(Tokens(Events(a)).size(), 12u);
  EXPECT_EQ(Tokens(Events(b)).size(), 2u);
  EXPECT_EQ(Tokens(Events(c)).size(), 2u);
}

// --- positions, blocks and sampling parameters ---

TEST(SchedulerDecode, PositionsBlocksAndDraws) {
  const SchedulerOptions o = Options(/*block_size=*/4, /*num_blocks=*/16);
  Scheduler s(o);
  s.Attach(Model());
  v1::GenerateRequest r = Request(Prompt(5), 6);
  r.mutable_sampling()->set_temperature(0.7f);
  r.mutable_sampling()->set_top_k(20);
  r.mutable_sampling()->set_top_p(0.9f);
  r.mutable_sampling()->set_seed(1234);
  const Client a = Submit(s, r);

  std::vector<int32_t> sampled;
  std::vector<int32_t> first_blocks;
  for (int generated = 0; generated < 6; ++generated) {
    v1::internal::Step step;
    ASSERT_TRUE(s.NextStep(&step));
    ASSERT_EQ(step.sequences_size(), 1);
    const auto& w = step.sequences(0);
    EXPECT_EQ(w.sequence_id(), a.id);
    EXPECT_TRUE(w.sample());
    EXPECT_EQ(w.draw(), static_cast<uint64_t>(generated));
    EXPECT_EQ(w.sampling().temperature(), 0.7f);
    EXPECT_EQ(w.sampling().top_k(), 20);
    EXPECT_EQ(w.sampling().top_p(), 0.9f);
    EXPECT_EQ(w.sampling().seed(), 1234u);
    EXPECT_FALSE(w.logprobs());
    if (generated == 0) {
      EXPECT_EQ(w.position(), 0);
      EXPECT_EQ(w.token_ids_size(), 5);
      first_blocks.assign(w.blocks().begin(), w.blocks().end());
    } else {
      ASSERT_EQ(w.token_ids_size(), 1);
      EXPECT_EQ(w.token_ids(0), sampled.back());
      EXPECT_EQ(w.position(), 5 + generated - 1);
    }
    EXPECT_EQ(w.blocks_size(), (w.position() + w.token_ids_size() + 3) / 4);
    for (size_t i = 0; i < first_blocks.size(); ++i) EXPECT_EQ(w.blocks(static_cast<int>(i)), first_blocks[i]);
    const int32_t token = 30 + generated;  // distinct, so a stale token would show
    sampled.push_back(token);
    ASSERT_TRUE(s.Complete(Answer(step, [token](uint64_t) { return token; })).ok());
  }
  EXPECT_EQ(first_blocks.size(), 2u);
  EXPECT_EQ(Tokens(Events(a)), sampled);
}

// --- finishing ---

TEST(SchedulerFinish, LengthAtMaxTokensWithUsage) {
  Scheduler s(Options(16, 64));
  s.Attach(Model());
  const Client a = Submit(s, Request(Prompt(5), 4));
  StepChecker checker(s.options());
  checker.Expect(a.id, Prompt(5));
  EXPECT_EQ(checker.Run(s).size(), 4u);
  const std::vector<RequestEvent> events = Events(a);
  ASSERT_EQ(events.size(), 5u);
  for (size_t i = 0; i < 4; ++i) {
    EXPECT_FALSE(events[i].final);
    EXPECT_EQ(events[i].tokens, std::vector<int32_t>({kToken}));
    EXPECT_TRUE(events[i].logprobs.empty()) << "logprobs sent unasked";
  }
  const RequestEvent& last = events.back();
  EXPECT_TRUE(last.final);
  EXPECT_TRUE(last.error.ok()) << last.error.ToString();
  EXPECT_TRUE(last.tokens.empty());
  EXPECT_EQ(last.finish_reason, v1::FINISH_REASON_LENGTH);
  EXPECT_EQ(last.prompt_tokens, 5);
  EXPECT_EQ(last.completion_tokens, 4);
  EXPECT_GT(last.time_to_first_token, 0.0);
  EXPECT_TRUE(Events(a, milliseconds(20)).empty()) << "events after the final one";
}

TEST(SchedulerFinish, StopTokenEndsTheRequestAndIsReturned) {
  Scheduler s(Options(16, 64));
  s.Attach(Model());
  v1::GenerateRequest r = Request(Prompt(5), 10);
  r.add_stop_token_ids(41);
  r.add_stop_token_ids(40);
  const Client a = Submit(s, r);
  RunStep(s, 30);
  RunStep(s, 40);
  v1::internal::Step step;
  EXPECT_FALSE(s.NextStep(&step)) << "the request went on after a stop token";
  const std::vector<RequestEvent> events = Events(a);
  EXPECT_EQ(Tokens(events), std::vector<int32_t>({30, 40}));
  ASSERT_FALSE(events.empty());
  EXPECT_TRUE(events.back().final);
  EXPECT_EQ(events.back().finish_reason, v1::FINISH_REASON_STOP);
  EXPECT_EQ(events.back().completion_tokens, 2);
  EXPECT_EQ(s.Stats().free_blocks, 64);
}

TEST(SchedulerFinish, EosStopsUnlessIgnored) {
  Scheduler s(Options(16, 64));
  s.Attach(Model(4096, {kEos, 3}));
  const Client a = Submit(s, Request(Prompt(5), 10));
  RunStep(s, 30);
  RunStep(s, 3);  // the second eos id counts as much as the first
  std::vector<RequestEvent> events = Events(a);
  ASSERT_FALSE(events.empty());
  EXPECT_EQ(events.back().finish_reason, v1::FINISH_REASON_STOP);
  EXPECT_EQ(events.back().completion_tokens, 2);

  v1::GenerateRequest r = Request(Prompt(5), 3);
  r.set_ignore_eos(true);
  const Client b = Submit(s, r);
  RunStep(s, kEos);
  RunStep(s, kEos);
  RunStep(s, kEos);
  v1::internal::Step step;
  EXPECT_FALSE(s.NextStep(&step));
  events = Events(b);
  EXPECT_EQ(Tokens(events), std::vector<int32_t>({kEos, kEos, kEos}));
  ASSERT_FALSE(events.empty());
  EXPECT_EQ(events.back().finish_reason, v1::FINISH_REASON_LENGTH);

  // A stop token the caller named stops even with ignore_eos.
  r = Request(Prompt(5), 5);
  r.set_ignore_eos(true);
  r.add_stop_token_ids(kEos);
  const Client c = Submit(s, r);
  RunStep(s, kEos);
  events = Events(c);
  ASSERT_FALSE(events.empty());
  EXPECT_EQ(events.back().finish_reason, v1::FINISH_REASON_STOP);
}

TEST(SchedulerFinish, LogprobsForwardedOnlyWhenAsked) {
  Scheduler s(Options(16, 64));
  s.Attach(Model());
  v1::GenerateRequest asked = Request(Prompt(5), 3);
  asked.set_logprobs(true);
  const Client a = Submit(s, asked);
  const Client b = Submit(s, Request(Prompt(5), 3));
  for (int i = 0; i < 3; ++i) {
    v1::internal::Step step;
    ASSERT_TRUE(s.NextStep(&step));
    ASSERT_NE(Find(step, a.id), nullptr);
    ASSERT_NE(Find(step, b.id), nullptr);
    EXPECT_TRUE(Find(step, a.id)->logprobs());
    EXPECT_FALSE(Find(step, b.id)->logprobs());
    ASSERT_TRUE(s.Complete(Answer(step)).ok());
  }
  std::vector<float> logprobs;
  for (const RequestEvent& e : Events(a)) logprobs.insert(logprobs.end(), e.logprobs.begin(), e.logprobs.end());
  EXPECT_EQ(logprobs, std::vector<float>({-0.25f, -0.5f, -0.75f}));  // Answer's logprob per draw
  for (const RequestEvent& e : Events(b)) EXPECT_TRUE(e.logprobs.empty());
}

// --- cancel ---

TEST(SchedulerCancel, WaitingRequestLeavesTheQueueSilently) {
  const SchedulerOptions o = Options(/*block_size=*/4, /*num_blocks=*/4);
  Scheduler s(o);
  s.Attach(Model());
  StepChecker checker(o);
  const Client a = Submit(s, Request(Prompt(6), 6));
  const Client b = Submit(s, Request(Prompt(4), 4));
  checker.Expect(a.id, Prompt(6));
  v1::internal::Step step;
  ASSERT_TRUE(s.NextStep(&step));
  checker.Check(step);
  EXPECT_EQ(s.Stats().waiting, 1);
  s.Cancel(b.id);
  EXPECT_EQ(s.Stats().waiting, 0);
  auto result = Answer(step);
  ASSERT_TRUE(s.Complete(result).ok());
  checker.Apply(step, result);
  for (const auto& st : checker.Run(s)) EXPECT_EQ(Find(st, b.id), nullptr);
  EXPECT_TRUE(Events(b, milliseconds(20)).empty());
  EXPECT_EQ(s.Stats().free_blocks, 4);
  EXPECT_TRUE(s.WaitIdle(milliseconds(0)));
}

TEST(SchedulerCancel, RunningRequestBetweenStepsFreesItsBlocksAtOnce) {
  Scheduler s(Options(/*block_size=*/4, /*num_blocks=*/8));
  s.Attach(Model());
  const Client a = Submit(s, Request(Prompt(6), 6));  // 3 blocks
  RunStep(s);
  EXPECT_EQ(s.Stats().free_blocks, 5);
  EXPECT_EQ(Tokens(Events(a)).size(), 1u);
  s.Cancel(a.id);
  EXPECT_EQ(s.Stats().free_blocks, 8);
  EXPECT_EQ(s.Stats().running, 0);
  v1::internal::Step step;
  EXPECT_FALSE(s.NextStep(&step));
  EXPECT_TRUE(Events(a, milliseconds(20)).empty());
  s.Cancel(a.id);  // again, and an id never issued: both ignored
  s.Cancel(9999);
  EXPECT_EQ(s.Stats().free_blocks, 8);
}

TEST(SchedulerCancel, RequestInTheStepInFlightKeepsItsBlocksUntilComplete) {
  const SchedulerOptions o = Options(/*block_size=*/4, /*num_blocks=*/6);
  Scheduler s(o);
  s.Attach(Model());
  const Client a = Submit(s, Request(Prompt(6), 6));  // 3 blocks
  const Client b = Submit(s, Request(Prompt(3), 3));  // 2 blocks
  const Client c = Submit(s, Request(Prompt(6), 6));  // 3 blocks: waits
  RunStep(s);
  v1::internal::Step step;
  ASSERT_TRUE(s.NextStep(&step));
  ASSERT_NE(Find(step, a.id), nullptr);
  ASSERT_NE(Find(step, b.id), nullptr);
  s.Cancel(a.id);
  // The worker may still be writing A's rows: its blocks are not free yet.
  EXPECT_EQ(s.Stats().free_blocks, 1);
  ASSERT_TRUE(s.Complete(Answer(step)).ok());
  EXPECT_EQ(s.Stats().free_blocks, 4);
  EXPECT_EQ(Tokens(Events(a)).size(), 1u) << "the in-flight token reached a cancelled request";
  EXPECT_EQ(Tokens(Events(b)).size(), 2u) << "the other sequence of the step lost its token";

  ASSERT_TRUE(s.NextStep(&step));
  EXPECT_EQ(Find(step, a.id), nullptr);
  EXPECT_NE(Find(step, c.id), nullptr) << "A's freed blocks did not admit C";
  ASSERT_TRUE(s.Complete(Answer(step)).ok());
  while (s.NextStep(&step)) {
    EXPECT_EQ(Find(step, a.id), nullptr);
    ASSERT_TRUE(s.Complete(Answer(step)).ok());
  }
  EXPECT_TRUE(Events(a, milliseconds(20)).empty());
  EXPECT_EQ(s.Stats().free_blocks, 6);
}

// --- the worker job leaving, and results that do not match ---

TEST(SchedulerDetach, EveryRequestEndsUnavailableAndTheBudgetResets) {
  const SchedulerOptions o = Options(/*block_size=*/4, /*num_blocks=*/6);
  Scheduler s(o);
  s.Attach(Model());
  const Client a = Submit(s, Request(Prompt(6), 6));  // running, in the step in flight
  const Client b = Submit(s, Request(Prompt(3), 3));  // cancelled while in flight
  const Client c = Submit(s, Request(Prompt(6), 6));  // waiting
  RunStep(s);
  Events(a);
  Events(b);
  v1::internal::Step step;
  ASSERT_TRUE(s.NextStep(&step));
  s.Cancel(b.id);
  s.Detach("the worker link closed");

  for (const Client* client : {&a, &c}) {
    const std::vector<RequestEvent> events = Events(*client);
    ASSERT_EQ(events.size(), 1u);
    EXPECT_TRUE(events[0].final);
    EXPECT_EQ(events[0].error.code(), StatusCode::kUnavailable);
    EXPECT_NE(events[0].error.message().find("the worker link closed"), std::string::npos);
  }
  EXPECT_TRUE(Events(b, milliseconds(20)).empty()) << "a cancelled request heard of the detach";
  SchedulerStats stats = s.Stats();
  EXPECT_FALSE(stats.attached);
  EXPECT_EQ(stats.running, 0);
  EXPECT_EQ(stats.waiting, 0);
  EXPECT_TRUE(s.WaitIdle(milliseconds(0)));

  // The old job's answer arrives late: nothing is in flight any more.
  const Status late = s.Complete(Answer(step));
  EXPECT_EQ(late.code(), StatusCode::kInternal);
  EXPECT_FALSE(s.NextStep(&step));

  s.Attach(Model());
  stats = s.Stats();
  EXPECT_EQ(stats.free_blocks, 6);
  EXPECT_EQ(stats.total_blocks, 6);
  // The whole cache is usable again: a request needing all of it runs.
  const Client d = Submit(s, Request(Prompt(12), 12));
  StepChecker checker(o);
  checker.Expect(d.id, Prompt(12));
  checker.Run(s);
  const std::vector<RequestEvent> events = Events(d);
  ASSERT_FALSE(events.empty());
  EXPECT_EQ(events.back().finish_reason, v1::FINISH_REASON_LENGTH);
  EXPECT_EQ(events.back().completion_tokens, 12);
  EXPECT_TRUE(Events(a, milliseconds(20)).empty());
  EXPECT_TRUE(Events(c, milliseconds(0)).empty());
}

TEST(SchedulerComplete, MismatchedResultsAreInternal) {
  Scheduler s(Options(16, 64));
  s.Attach(Model());
  v1::internal::StepResult none;
  none.set_step_id(1);
  EXPECT_EQ(s.Complete(none).code(), StatusCode::kInternal) << "completed a step never sent";

  const Client a = Submit(s, Request(Prompt(4), 4));
  v1::internal::Step step;
  ASSERT_TRUE(s.NextStep(&step));
  v1::internal::StepResult wrong = Answer(step);
  wrong.set_step_id(step.step_id() + 1);
  const Status mismatch = s.Complete(wrong);
  EXPECT_EQ(mismatch.code(), StatusCode::kInternal);
  EXPECT_NE(mismatch.message().find("expected " + std::to_string(step.step_id())), std::string::npos)
      << mismatch.message();
  v1::internal::Step next;
  EXPECT_FALSE(s.NextStep(&next)) << "a second step while one is in flight";
  // The step is still in flight and its right answer is taken.
  ASSERT_TRUE(s.Complete(Answer(step)).ok());
  EXPECT_EQ(s.Complete(Answer(step)).code(), StatusCode::kInternal) << "a step completed twice";
  EXPECT_EQ(Tokens(Events(a)).size(), 1u);

  ASSERT_TRUE(s.NextStep(&step));
  v1::internal::StepResult missing;
  missing.set_step_id(step.step_id());
  EXPECT_EQ(s.Complete(missing).code(), StatusCode::kInternal) << "no token for a sampling sequence";
}

// --- what the metrics see ---

class RecordingObserver : public SchedulerObserver {
 public:
  struct Outcome {
    int64_t prompt, completion;
    std::string outcome;
  };
  void FirstToken(double seconds) override {
    EXPECT_GE(seconds, 0.0);
    ++first_tokens;
  }
  void InterToken(double seconds) override {
    EXPECT_GE(seconds, 0.0);
    ++inter_tokens;
  }
  void Finished(double e2e, int64_t prompt, int64_t completion, const std::string& outcome) override {
    EXPECT_GE(e2e, 0.0);
    finished.push_back({prompt, completion, outcome});
  }
  void Load(int64_t r, int64_t w, double usage) override {
    running = r;
    waiting = w;
    cache_usage = usage;
  }
  int first_tokens = 0, inter_tokens = 0;
  std::vector<Outcome> finished;
  int64_t running = -1, waiting = -1;
  double cache_usage = -1;
};

TEST(SchedulerObserverTest, ReportsFirstTokensOutcomesAndLoad) {
  RecordingObserver observer;
  const SchedulerOptions o = Options(/*block_size=*/4, /*num_blocks=*/16);
  Scheduler s(o, &observer);
  s.Attach(Model());
  EXPECT_EQ(observer.cache_usage, 0.0);

  v1::GenerateRequest stopping = Request(Prompt(3), 8);
  stopping.add_stop_token_ids(40);
  const Client a = Submit(s, Request(Prompt(5), 3));  // 2 blocks; ends at LENGTH
  const Client b = Submit(s, stopping);               // 3 blocks; ends at the stop token
  const Client c = Submit(s, Request(Prompt(4), 4));  // 2 blocks; cancelled after its first token
  EXPECT_EQ(observer.waiting, 3);

  RunStep(s);
  EXPECT_EQ(observer.first_tokens, 3);
  EXPECT_EQ(observer.running, 3);
  EXPECT_EQ(observer.waiting, 0);
  EXPECT_DOUBLE_EQ(observer.cache_usage, 7.0 / 16.0);
  s.Cancel(c.id);
  ASSERT_EQ(observer.finished.size(), 1u);
  EXPECT_EQ(observer.finished[0].outcome, "cancelled");
  EXPECT_EQ(observer.finished[0].prompt, 4);
  EXPECT_EQ(observer.finished[0].completion, 1);

  RunStep(s);  // A's second token, B's second token
  v1::internal::Step step;
  ASSERT_TRUE(s.NextStep(&step));
  ASSERT_TRUE(s.Complete(Answer(step, [&](uint64_t id) { return id == b.id ? 40 : kToken; })).ok());
  EXPECT_FALSE(s.NextStep(&step));
  EXPECT_EQ(observer.first_tokens, 3) << "FirstToken more than once for a request";
  EXPECT_EQ(observer.inter_tokens, 2 + 2);
  ASSERT_EQ(observer.finished.size(), 3u);
  std::map<std::string, RecordingObserver::Outcome> by_outcome;
  for (const auto& f : observer.finished) by_outcome[f.outcome] = f;
  ASSERT_TRUE(by_outcome.count("length"));
  EXPECT_EQ(by_outcome["length"].prompt, 5);
  EXPECT_EQ(by_outcome["length"].completion, 3);
  ASSERT_TRUE(by_outcome.count("stop"));
  EXPECT_EQ(by_outcome["stop"].prompt, 3);
  EXPECT_EQ(by_outcome["stop"].completion, 3);
  EXPECT_EQ(observer.running, 0);
  EXPECT_EQ(observer.cache_usage, 0.0);

  const Client d = Submit(s, Request(Prompt(2), 2));
  s.Detach("gone");
  ASSERT_EQ(observer.finished.size(), 4u);
  EXPECT_EQ(observer.finished.back().outcome, "unavailable");
  EXPECT_EQ(observer.finished.back().completion, 0);
  EXPECT_EQ(observer.first_tokens, 3);
  EXPECT_EQ(Tokens(Events(a)).size(), 3u);
  const std::vector<RequestEvent> events = Events(d);
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].error.code(), StatusCode::kUnavailable);
}

// --- the threads of the server: RPC handlers beside the worker link ---

TEST(SchedulerThreads, WorkerLoopServesRequestsSubmittedFromOtherThreads) {
  const SchedulerOptions o = Options(/*block_size=*/4, /*num_blocks=*/32, /*max_step_tokens=*/16);
  Scheduler s(o);
  s.Attach(Model());
  std::atomic<bool> stop{false};
  std::thread worker([&] {
    v1::internal::Step step;
    while (!stop) {
      if (!s.NextStep(&step)) {
        s.WaitForWork(milliseconds(5));
        continue;
      }
      const Status done = s.Complete(Answer(step));
      EXPECT_TRUE(done.ok()) << done.ToString();
    }
  });
  constexpr int kClients = 8;
  std::vector<std::thread> handlers;
  std::vector<std::vector<RequestEvent>> received(kClients);
  for (int i = 0; i < kClients; ++i) {
    handlers.emplace_back([&, i] {
      const Client c = Submit(s, Request(Prompt(3 + i), static_cast<uint32_t>(2 + i)));
      // As the Generate handler does: wait until the final event.
      for (int polls = 0; polls < 500; ++polls) {
        std::vector<RequestEvent> events;
        c.stream->Wait(&events, milliseconds(10));
        received[static_cast<size_t>(i)].insert(received[static_cast<size_t>(i)].end(), events.begin(),
                                                events.end());
        if (!events.empty() && events.back().final) break;
      }
    });
  }
  for (auto& h : handlers) h.join();
  EXPECT_TRUE(s.WaitIdle(milliseconds(1000)));
  stop = true;
  worker.join();
  for (int i = 0; i < kClients; ++i) {
    const auto& events = received[static_cast<size_t>(i)];
    ASSERT_FALSE(events.empty()) << "client " << i << " heard nothing";
    EXPECT_TRUE(events.back().final);
    EXPECT_EQ(events.back().finish_reason, v1::FINISH_REASON_LENGTH);
    EXPECT_EQ(static_cast<int>(Tokens(events).size()), 2 + i);
  }
  EXPECT_EQ(s.Stats().free_blocks, 32);
}

// A worker job dies mid-generation: its requests wait for the next job, which prefills
// each one's prompt and generated tokens again (without sampling) and goes on with the
// next draw, so the stream goes on exactly where it stopped.
TEST(SchedulerResumeTest, RequestsResumeOnTheNextJobWithTheirNextDraw) {
  Scheduler s(Options(4, 32));
  s.Attach(Model());
  const std::vector<int32_t> prompt = Prompt(5);
  Client a = Submit(s, Request(prompt, 6));
  std::vector<int32_t> sampled = {21, 22, 23};
  for (int32_t t : sampled) RunStep(s, t);  // prefill + 2 decodes: 3 tokens
  v1::internal::Step in_flight;
  ASSERT_TRUE(s.NextStep(&in_flight));  // the job dies with this step in flight
  s.Detach("the worker link closed", /*resume=*/true);
  EXPECT_EQ(Tokens(Events(a)), sampled);
  EXPECT_EQ(s.Stats().running + s.Stats().waiting, 1);
  EXPECT_FALSE(s.NextStep(&in_flight));  // no job: nothing runs

  s.Attach(Model());
  v1::internal::Step replay;
  ASSERT_TRUE(s.NextStep(&replay));
  const v1::internal::SequenceWork* w = Find(replay, a.id);
  ASSERT_NE(w, nullptr);
  // The prompt and all but the last generated token, from position 0, sampling nothing.
  std::vector<int32_t> context = prompt;
  context.insert(context.end(), sampled.begin(), sampled.end() - 1);
  EXPECT_EQ(std::vector<int32_t>(w->token_ids().begin(), w->token_ids().end()), context);
  EXPECT_EQ(w->position(), 0);
  EXPECT_FALSE(w->sample());
  ASSERT_TRUE(s.Complete(Answer(replay)).ok());
  // Then the last generated token decodes with the next draw.
  v1::internal::Step next;
  ASSERT_TRUE(s.NextStep(&next));
  w = Find(next, a.id);
  ASSERT_NE(w, nullptr);
  EXPECT_EQ(std::vector<int32_t>(w->token_ids().begin(), w->token_ids().end()), std::vector<int32_t>{23});
  EXPECT_EQ(w->position(), static_cast<int64_t>(context.size()));
  EXPECT_TRUE(w->sample());
  EXPECT_EQ(w->draw(), 3u);
  ASSERT_TRUE(s.Complete(Answer(next, [](uint64_t) { return 24; })).ok());
  RunStep(s, 25);
  RunStep(s, 26);
  const std::vector<RequestEvent> rest = Events(a);
  EXPECT_EQ(Tokens(rest), (std::vector<int32_t>{24, 25, 26}));
  ASSERT_FALSE(rest.empty());
  EXPECT_TRUE(rest.back().final);
  EXPECT_TRUE(rest.back().error.ok());
  EXPECT_EQ(rest.back().completion_tokens, 6);
  EXPECT_TRUE(s.WaitIdle(milliseconds(100)));
}

TEST(SchedulerResumeTest, ARequestInTheFailingStepTwiceEndsAndOthersResume) {
  Scheduler s(Options(4, 32));
  s.Attach(Model());
  Client a = Submit(s, Request(Prompt(3), 8));
  for (int round = 0; round < 2; ++round) {
    v1::internal::Step step;
    ASSERT_TRUE(s.NextStep(&step));
    s.Detach("a step failed", /*resume=*/true);
    s.Attach(Model());
  }
  const std::vector<RequestEvent> events = Events(a);
  ASSERT_FALSE(events.empty());
  EXPECT_TRUE(events.back().final);
  EXPECT_EQ(events.back().error.code(), StatusCode::kUnavailable);
  EXPECT_NE(events.back().error.message().find("failed twice"), std::string::npos) << events.back().error.message();
  // A request that was only queued when the job died resumes however often it dies.
  Client b = Submit(s, Request(Prompt(3), 2));
  s.Detach("the worker link closed", /*resume=*/true);
  s.Attach(Model());
  s.Detach("the worker link closed", /*resume=*/true);
  s.Attach(Model());
  RunStep(s);
  RunStep(s);
  EXPECT_EQ(Tokens(Events(b)), (std::vector<int32_t>{kToken, kToken}));
}

TEST(SchedulerResumeTest, RequestsEndUnavailableAfterTheResumeTimeoutOrOnDrain) {
  SchedulerOptions o = Options(4, 32);
  o.resume_timeout = milliseconds(300);
  Scheduler s(o);
  s.Attach(Model());
  Client a = Submit(s, Request(Prompt(3), 8));
  RunStep(s);
  s.Detach("the worker link closed", /*resume=*/true);
  EXPECT_EQ(Tokens(Events(a)), std::vector<int32_t>{kToken});
  const std::vector<RequestEvent> ended = Events(a, milliseconds(3000));
  ASSERT_FALSE(ended.empty());
  EXPECT_EQ(ended.back().error.code(), StatusCode::kUnavailable);
  EXPECT_NE(ended.back().error.message().find("resume timeout"), std::string::npos) << ended.back().error.message();

  Scheduler d(Options(4, 32));
  d.Attach(Model());
  Client b = Submit(d, Request(Prompt(3), 8));
  d.Detach("the worker link closed", /*resume=*/true);
  d.Drain();
  const std::vector<RequestEvent> drained = Events(b);
  ASSERT_FALSE(drained.empty());
  EXPECT_EQ(drained.back().error.code(), StatusCode::kUnavailable);
  EXPECT_TRUE(d.WaitIdle(milliseconds(100)));
}


// The prefix cache's block pool on its own.
std::vector<int32_t> Seq(std::initializer_list<int32_t> v) { return v; }

TEST(BlockPoolTest, ACachedPrefixIsFoundBlockByBlockAndOnlyFullBlocksAreShared) {
  BlockPool pool(8, 4, /*caching=*/true);
  const std::vector<int32_t> tokens = Prompt(10);  // two full blocks and a partial one
  const std::vector<int32_t> a = pool.Allocate(3);
  EXPECT_EQ(pool.Publish(a, tokens, 0), 2);
  EXPECT_EQ(pool.cached_blocks(), 2);
  std::vector<int32_t> longer = Prompt(14);
  EXPECT_EQ(pool.TakePrefix(longer, 10), Seq({a[0], a[1]}));  // not the partial third
  EXPECT_EQ(pool.TakePrefix(longer, 1), Seq({a[0]}));         // at most MAX_BLOCKS
  longer[5] = 99;  // the second block differs: only the first is shared
  EXPECT_EQ(pool.TakePrefix(longer, 10), Seq({a[0]}));
  longer[0] = 98;  // the first differs: the second's tokens alone never match
  longer[5] = tokens[5];
  EXPECT_TRUE(pool.TakePrefix(longer, 10).empty());
  // Used by A and by the three takes above: given back, the blocks stay cached.
  pool.Release(a);
  pool.Release(Seq({a[0], a[1], a[0], a[0]}));
  EXPECT_EQ(pool.available(), 8);
  EXPECT_EQ(pool.cached_blocks(), 2);
}

TEST(BlockPoolTest, UnusedCachedBlocksGoLeastRecentlyUsedFirstAndBlocksInUseNever) {
  BlockPool pool(4, 2, /*caching=*/true);
  const std::vector<int32_t> a = pool.Allocate(2), b = pool.Allocate(2);
  pool.Publish(a, Seq({1, 2, 3, 4}), 0);
  pool.Publish(b, Seq({5, 6, 7, 8}), 0);
  pool.Release(a);
  pool.Release(b);
  EXPECT_EQ(pool.available(), 4);
  // A again: now B's blocks are the least recently used.
  pool.Release(pool.TakePrefix(Seq({1, 2, 3, 4, 9}), 2));
  const std::vector<int32_t> in_use = pool.TakePrefix(Seq({1, 2, 3, 4}), 2);
  EXPECT_EQ(in_use, a);
  EXPECT_EQ(pool.available(), 2);
  const std::vector<int32_t> fresh = pool.Allocate(2);  // evicts B's, never A's in use
  EXPECT_EQ(std::set<int32_t>(fresh.begin(), fresh.end()), std::set<int32_t>(b.begin(), b.end()));
  EXPECT_EQ(pool.evictions(), 2);
  EXPECT_TRUE(pool.TakePrefix(Seq({5, 6, 7, 8}), 2).empty());
  EXPECT_EQ(pool.available(), 0);
  pool.Release(in_use);
  EXPECT_EQ(pool.available(), 2);
  EXPECT_EQ(pool.TakePrefix(Seq({1, 2, 3, 4}), 2), a);
}

TEST(BlockPoolTest, WithoutCachingOrAfterAResetNothingIsShared) {
  BlockPool off(4, 2, /*caching=*/false);
  const std::vector<int32_t> a = off.Allocate(2);
  off.Publish(a, Seq({1, 2, 3, 4}), 0);
  off.Release(a);
  EXPECT_TRUE(off.TakePrefix(Seq({1, 2, 3, 4}), 2).empty());
  EXPECT_EQ(off.available(), 4);
  BlockPool on(4, 2, /*caching=*/true);
  const std::vector<int32_t> b = on.Allocate(2);
  on.Publish(b, Seq({1, 2, 3, 4}), 0);
  on.Reset();  // a new worker job: its cache holds nothing
  EXPECT_TRUE(on.TakePrefix(Seq({1, 2, 3, 4}), 2).empty());
  EXPECT_EQ(on.available(), 4);
  EXPECT_EQ(on.cached_blocks(), 0);
}

// Runs steps until every submitted request has ended.
void RunToEnd(Scheduler& s) {
  v1::internal::Step step;
  for (int i = 0; i < 1000 && s.NextStep(&step); ++i) ASSERT_TRUE(s.Complete(Answer(step)).ok());
}

TEST(SchedulerPrefixTest, ARequestWithACachedPrefixSharesItsBlocksAndPrefillsOnlyTheRest) {
  Scheduler s(Options(4, 16));
  s.Attach(Model());
  const std::vector<int32_t> prompt = Prompt(13);
  Client a = Submit(s, Request(prompt, 2));
  v1::internal::Step first;
  ASSERT_TRUE(s.NextStep(&first));
  const std::vector<int32_t> a_blocks(Find(first, a.id)->blocks().begin(), Find(first, a.id)->blocks().end());
  ASSERT_TRUE(s.Complete(Answer(first)).ok());
  RunToEnd(s);
  EXPECT_EQ(Events(a).back().cached_tokens, 0);

  std::vector<int32_t> other = Prompt(12);  // A's first 12 tokens (three full blocks), then its own
  other.push_back(45);
  other.push_back(46);
  Client b = Submit(s, Request(other, 2));
  v1::internal::Step step;
  ASSERT_TRUE(s.NextStep(&step));
  const v1::internal::SequenceWork* w = Find(step, b.id);
  ASSERT_NE(w, nullptr);
  EXPECT_EQ(w->position(), 12);
  EXPECT_EQ(std::vector<int32_t>(w->token_ids().begin(), w->token_ids().end()), Seq({45, 46}));
  EXPECT_EQ(std::vector<int32_t>(w->blocks().begin(), w->blocks().begin() + 3),
            std::vector<int32_t>(a_blocks.begin(), a_blocks.begin() + 3));
  ASSERT_TRUE(s.Complete(Answer(step)).ok());
  RunToEnd(s);
  const std::vector<RequestEvent> events = Events(b);
  ASSERT_FALSE(events.empty());
  EXPECT_EQ(events.back().cached_tokens, 12);
  EXPECT_EQ(Tokens(events).size(), 2u);

  // The whole prompt cached: one token is still prefilled, for the logits to sample from.
  Client c = Submit(s, Request(Prompt(12), 1));
  ASSERT_TRUE(s.NextStep(&step));
  EXPECT_EQ(Find(step, c.id)->position(), 8);
  EXPECT_EQ(Find(step, c.id)->token_ids_size(), 4);
  ASSERT_TRUE(s.Complete(Answer(step)).ok());
}

TEST(SchedulerPrefixTest, AdmissionCountsOnlyTheBlocksARequestDoesNotShare) {
  for (const bool caching : {true, false}) {
    SCOPED_TRACE(caching ? "prefix cache on" : "prefix cache off");
    SchedulerOptions o = Options(4, 9);
    o.prefix_cache = caching;
    Scheduler s(o);
    s.Attach(Model());
    const v1::GenerateRequest r = Request(Prompt(16), 9);  // 24 rows: 6 blocks
    Client a = Submit(s, r);
    RunStep(s);  // A's prompt prefilled: its 4 full blocks cached, 3 blocks free
    Client b = Submit(s, r);  // shares 3 blocks ((16 - 1) / 4), needs 3 more
    const v1::internal::Step step = RunStep(s);
    EXPECT_EQ(Find(step, b.id) != nullptr, caching) << "B runs beside A only by sharing";
    RunToEnd(s);
    EXPECT_EQ(Tokens(Events(a)).size(), 9u);
    EXPECT_EQ(Tokens(Events(b)).size(), 9u);
  }
}


TEST(SchedulerResultTest, ATokenOutsideTheVocabularyIsRefusedAndChangesNothing) {
  Scheduler s(Options(4, 16));
  s.Attach(Model());
  Client c = Submit(s, Request(Prompt(5), 3));
  v1::internal::Step step;
  ASSERT_TRUE(s.NextStep(&step));
  for (const int32_t bad : {-1, static_cast<int32_t>(kVocab)}) {
    const Status st = s.Complete(Answer(step, [bad](uint64_t) { return bad; }));
    EXPECT_EQ(st.code(), StatusCode::kInternal) << bad;
    EXPECT_NE(st.message().find("outside the vocabulary"), std::string::npos) << st.message();
  }
  EXPECT_TRUE(Events(c).empty());
  ASSERT_TRUE(s.Complete(Answer(step)).ok());  // the step is still in flight, unchanged
  EXPECT_EQ(Tokens(Events(c)), std::vector<int32_t>{kToken});
}

// --- data-parallel attention: a cache per rank ---

TEST(SchedulerDataParallel, EachRankHoldsACacheOfItsOwnAndAStepBudgetOfItsOwn) {
  const SchedulerOptions o = Options(4, 8, /*max_step_tokens=*/16);
  for (const int caches : {1, 3}) {
    SCOPED_TRACE(std::to_string(caches) + " cache(s)");
    Scheduler s(o);
    s.Attach(Model(), caches);
    EXPECT_EQ(s.Stats().total_blocks, 8 * caches);
    StepChecker checker(o);
    std::vector<Client> clients;
    for (int i = 0; i < 6; ++i) {
      const std::vector<int32_t> prompt = Prompt(20, 10 + i);
      clients.push_back(Submit(s, Request(prompt, 13)));  // 32 rows: a whole cache of 8 blocks
      checker.Expect(clients.back().id, prompt);
    }
    v1::internal::Step first;
    ASSERT_TRUE(s.NextStep(&first));
    // One request fills a cache: one at a time in one, one on each rank in three, each
    // rank prefilling its 16 tokens in the same step.
    EXPECT_EQ(first.sequences_size(), caches);
    std::set<int32_t> ranks;
    for (const auto& w : first.sequences()) ranks.insert(w.rank());
    EXPECT_EQ(static_cast<int>(ranks.size()), caches);
    EXPECT_EQ(StepTokens(first), 16 * caches);
    checker.Check(first, caches);
    const v1::internal::StepResult result = Answer(first);
    ASSERT_TRUE(s.Complete(result).ok());
    checker.Apply(first, result);
    const auto steps = checker.Run(s, [](uint64_t) { return kToken; }, caches);
    EXPECT_EQ(static_cast<int>(steps.size()) + 1, 6 / caches * 14);  // 2 prefill + 12 decode steps each
    for (const Client& c : clients) EXPECT_EQ(Tokens(Events(c)).size(), 13u);
    const SchedulerStats stats = s.Stats();
    EXPECT_EQ(stats.free_blocks, 8 * caches);
    EXPECT_EQ(stats.cache_free_blocks, std::vector<int64_t>(static_cast<size_t>(caches), 8));
  }
}

int32_t RankOf(const v1::internal::Step& step, uint64_t id) {
  const v1::internal::SequenceWork* w = Find(step, id);
  return w == nullptr ? -1 : w->rank();
}

TEST(SchedulerDataParallel, RequestsGoWhereLoadIsLeastAndFollowTheirPrefixWhenBalanceAllows) {
  Scheduler s(Options(4, 64, /*max_step_tokens=*/16));
  s.Attach(Model(), 2);
  // Equal requests arriving together spread evenly.
  std::vector<Client> even;
  for (int i = 0; i < 4; ++i) even.push_back(Submit(s, Request(Prompt(8, 10 + i), 2)));
  v1::internal::Step step;
  ASSERT_TRUE(s.NextStep(&step));
  std::map<int32_t, int> per_rank;
  for (const Client& c : even) ++per_rank[RankOf(step, c.id)];
  EXPECT_EQ(per_rank, (std::map<int32_t, int>{{0, 2}, {1, 2}}));
  ASSERT_TRUE(s.Complete(Answer(step)).ok());
  RunToEnd(s);

  // A's prompt leaves its full blocks cached on its rank; B, sharing them, follows.
  const std::vector<int32_t> prefix = Prompt(12, 60);
  std::vector<int32_t> b_prompt = prefix;
  b_prompt.push_back(45);
  Client a = Submit(s, Request(Prompt(13, 60), 1));
  ASSERT_TRUE(s.NextStep(&step));
  const int32_t a_rank = RankOf(step, a.id);
  ASSERT_TRUE(s.Complete(Answer(step)).ok());
  RunToEnd(s);
  // A long request arriving first goes to A's rank (the two are even); B then would
  // share 12 tokens there but finds 60 tokens of prefill ahead of it: it goes to the
  // idle rank and prefills its whole prompt.
  Client busy = Submit(s, Request(Prompt(60, 20), 1));
  Client b = Submit(s, Request(b_prompt, 1));
  ASSERT_TRUE(s.NextStep(&step));
  EXPECT_EQ(RankOf(step, busy.id), a_rank);
  EXPECT_EQ(RankOf(step, b.id), 1 - a_rank);
  EXPECT_EQ(Find(step, b.id)->position(), 0);
  ASSERT_TRUE(s.Complete(Answer(step)).ok());
  RunToEnd(s);
  // With the ranks even again, C (the same prompt) goes to A's rank and shares its blocks.
  Client c = Submit(s, Request(b_prompt, 1));
  ASSERT_TRUE(s.NextStep(&step));
  EXPECT_EQ(RankOf(step, c.id), a_rank);
  EXPECT_EQ(Find(step, c.id)->position(), 12);
  ASSERT_TRUE(s.Complete(Answer(step)).ok());
  RunToEnd(s);
  EXPECT_EQ(Events(c).back().cached_tokens, 12);
}

TEST(SchedulerDataParallel, ARequestResumedOnAJobOfFewerRanksIsPlacedAgain) {
  SchedulerOptions o = Options(4, 8);
  Scheduler s(o);
  s.Attach(Model(), 4);
  std::vector<Client> clients;
  for (int i = 0; i < 4; ++i) clients.push_back(Submit(s, Request(Prompt(20, 10 + i), 4)));  // one per rank
  v1::internal::Step step;
  ASSERT_TRUE(s.NextStep(&step));
  ASSERT_EQ(RankOf(step, clients[3].id), 3);
  s.Detach("rank 3 died", /*resume=*/true);
  s.Attach(Model(), 2);  // the job came back on two ranks
  s.Cancel(clients[3].id);  // a waiting request placed on a rank that is gone leaves cleanly
  ASSERT_TRUE(s.NextStep(&step));
  for (const auto& w : step.sequences()) EXPECT_LT(w.rank(), 2);
  ASSERT_TRUE(s.Complete(Answer(step)).ok());
  RunToEnd(s);
  for (int i = 0; i < 3; ++i) EXPECT_EQ(Tokens(Events(clients[i])).size(), 4u) << i;
  EXPECT_EQ(s.Stats().free_blocks, 16);
}

}  // namespace
}  // namespace epic::coordinator
