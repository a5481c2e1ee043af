#include "worker/serve.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <deque>
#include <mutex>
#include <new>
#include <numeric>
#include <thread>

#include <grpcpp/grpcpp.h>

#include "common/text_file.h"
#include "placement/placement_proto.h"
#include "worker/sampler.h"
#include "worker/step_stats.h"
#include "worker_link.grpc.pb.h"

namespace epic {

v1::ModelSummary SummarizeModel(const ModelConfig& c) {
  v1::ModelSummary m;
  m.set_model_type(c.model_type);
  m.set_vocab_size(c.vocab_size);
  m.set_hidden_size(c.hidden_size);
  m.set_num_hidden_layers(c.num_hidden_layers);
  m.set_num_attention_heads(c.num_attention_heads);
  m.set_n_routed_experts(c.n_routed_experts);
  m.set_n_shared_experts(c.n_shared_experts);
  m.set_num_experts_per_tok(c.num_experts_per_tok);
  m.set_max_position_embeddings(c.max_position_embeddings);
  m.set_topk_method(TopkMethodName(c.topk_method));
  m.set_n_group(c.n_group);
  m.set_topk_group(c.topk_group);
  m.set_first_k_dense_replace(c.first_k_dense_replace);
  m.set_kv_lora_rank(c.kv_lora_rank);
  m.set_qk_nope_head_dim(c.qk_nope_head_dim);
  m.set_qk_rope_head_dim(c.qk_rope_head_dim);
  m.set_v_head_dim(c.v_head_dim);
  for (int64_t id : c.eos_token_ids) m.add_eos_token_ids(static_cast<int32_t>(id));
  return m;
}

namespace {

SamplingParams SamplingOf(const v1::internal::SequenceWork& w) {
  SamplingParams p;
  p.temperature = w.sampling().temperature();
  p.top_k = w.sampling().top_k();
  p.top_p = w.sampling().has_top_p() ? w.sampling().top_p() : 1.0;
  p.seed = w.sampling().seed();
  return p;
}

}  // namespace

Status RunStep(Model& model, LatentCache& cache, const v1::internal::Step& step, v1::internal::StepResult* result) {
  const ModelConfig& c = model.config();
  const int rank = model.comm().rank();
  const int ranks = model.comm().size();
  const bool data_parallel = model.attention() == AttentionMode::kData;
  const int n = step.sequences_size();
  // Every rank checks every sequence, its own or not, so that all fail alike.
  for (int i = 0; i < n; ++i) {
    const v1::internal::SequenceWork& w = step.sequences(i);
    const std::string who = "step " + std::to_string(step.step_id()) + ", sequence " + std::to_string(w.sequence_id());
    if (w.token_ids_size() == 0) return InvalidArgumentError(who + ": no tokens");
    if (w.position() < 0 || w.position() + w.token_ids_size() > c.max_position_embeddings) {
      return InvalidArgumentError(who + ": positions past the model's context");
    }
    for (const int32_t t : w.token_ids()) {
      if (t < 0 || t >= c.vocab_size) {
        return InvalidArgumentError(who + ": token id " + std::to_string(t) + " outside the vocabulary");
      }
    }
    for (int32_t b : w.blocks()) {
      if (b < 0 || b >= cache.num_blocks()) {
        return InvalidArgumentError(who + ": cache block " + std::to_string(b) + " outside [0, " +
                                    std::to_string(cache.num_blocks()) + ")");
      }
    }
    if (cache.BlocksFor(w.position() + w.token_ids_size()) > w.blocks_size()) {
      return InvalidArgumentError(who + ": too few cache blocks for its positions");
    }
    if (w.sample()) EPIC_RETURN_IF_ERROR(ValidateSamplingParams(SamplingOf(w)));
    if (data_parallel && (w.rank() < 0 || w.rank() >= ranks)) {
      return InvalidArgumentError(who + ": rank " + std::to_string(w.rank()) + " outside the job's " +
                                  std::to_string(ranks));
    }
  }
  // The sequences this rank runs: all of them, or under data-parallel attention its own.
  std::vector<int> mine;
  for (int i = 0; i < n; ++i) {
    if (!data_parallel || step.sequences(i).rank() == rank) mine.push_back(i);
  }
  std::vector<BlockTable> tables(mine.size());
  std::vector<SequenceStep> batch(mine.size());
  for (size_t k = 0; k < mine.size(); ++k) {
    const v1::internal::SequenceWork& w = step.sequences(mine[k]);
    tables[k].blocks.assign(w.blocks().begin(), w.blocks().end());
    tables[k].num_tokens = w.position();
    batch[k] = SequenceStep{&tables[k], {w.token_ids().data(), static_cast<size_t>(w.token_ids_size())}, false};
  }
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<float> logits;
  ExpertCounts counts;
  EPIC_RETURN_IF_ERROR(model.Forward(batch, &cache, &logits, &counts));
  // One gather a step carries what the reports need (worker/step_stats.h).
  EPIC_ASSIGN_OR_RETURN(const JobStepStats stats, GatherStepStats(model, counts));
  // Each sequence sampled where its logits are: on rank 0, or under data-parallel
  // attention on its own rank, whence rank 0 gathers the draws.
  struct Draw {
    uint64_t sequence_id;
    int32_t token_id;
    float logprob;
  };
  std::vector<Draw> draws;
  if (rank == 0 || data_parallel) {
    for (size_t k = 0; k < mine.size(); ++k) {
      const v1::internal::SequenceWork& w = step.sequences(mine[k]);
      if (!w.sample()) continue;
      const float* row = logits.data() + k * static_cast<size_t>(c.vocab_size);
      const int32_t token = Sampler(SamplingOf(w), w.draw()).Sample(row, c.vocab_size);
      draws.push_back({w.sequence_id(), token, w.logprobs() ? LogProbability(row, c.vocab_size, token) : 0.0f});
    }
  }
  if (data_parallel && ranks > 1) {
    EPIC_ASSIGN_OR_RETURN(draws, parallel::AllGatherVarying(model.comm(), draws));
  }
  if (rank != 0) return OkStatus();

  result->Clear();
  result->set_step_id(step.step_id());
  for (const Draw& d : draws) {
    v1::internal::Sampled* s = result->add_sampled();
    s->set_sequence_id(d.sequence_id);
    s->set_token_id(d.token_id);
    s->set_logprob(d.logprob);
  }
  for (size_t r = 0; r < stats.slot_tokens.size(); ++r) {
    v1::internal::RankStepStats* rank = result->add_ranks();
    parallel::ExchangeStats dispatch, combine;
    for (size_t i = 0; i < stats.moe_layers.size(); ++i) {
      int64_t ran = 0;
      for (const int64_t t : stats.slot_tokens[r][i]) ran += t;
      rank->add_layer_tokens(ran);
      dispatch.Add(stats.dispatch[r][i]);
      combine.Add(stats.combine[r][i]);
    }
    rank->set_dispatch_bytes_sent(static_cast<double>(dispatch.bytes_sent));
    rank->set_dispatch_bytes_received(static_cast<double>(dispatch.bytes_received));
    rank->set_combine_bytes_sent(static_cast<double>(combine.bytes_sent));
    rank->set_combine_bytes_received(static_cast<double>(combine.bytes_received));
    rank->set_dispatch_seconds(dispatch.seconds);
    rank->set_combine_seconds(combine.seconds);
  }
  const auto expert_tokens = stats.ExpertTokens(model.placement(), c.n_routed_experts);
  for (size_t i = 0; i < stats.moe_layers.size(); ++i) {
    v1::LayerLoad* load = result->add_expert_tokens();
    load->set_layer(static_cast<int32_t>(stats.moe_layers[i]));
    load->mutable_expert_tokens()->Add(expert_tokens[i].begin(), expert_tokens[i].end());
  }
  result->set_seconds(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  return OkStatus();
}

namespace {

// What rank 0 tells the others before each broadcast payload.
enum class Command : int64_t { kHeartbeat = 0, kWelcome = 1, kStep = 2, kStop = 3, kRebalance = 4, kShutdown = 5 };

struct RankRecord {
  char host[64];
  int64_t pid;
  int64_t weight_bytes;
  int64_t fast;  // the rank's products run int8
};

// Rank 0's side of the link: a reader thread queues what the coordinator sends.
class Link {
 public:
  Link(const WorkerOptions& options) : options_(options) {}
  ~Link() {
    if (reader_.joinable()) {
      context_.TryCancel();
      reader_.join();
    }
  }

  Status Open(const v1::internal::Hello& hello, v1::internal::Welcome* welcome) {
    std::shared_ptr<grpc::ChannelCredentials> creds = grpc::InsecureChannelCredentials();
    if (!options_.tls_ca.empty()) {
      auto pem = ReadTextFile(options_.tls_ca);
      if (!pem.ok()) return InvalidArgumentError("--tls-ca " + pem.status().message());
      grpc::SslCredentialsOptions ssl;
      ssl.pem_root_certs = std::move(pem).value();
      creds = grpc::SslCredentials(ssl);
    }
    channel_ = grpc::CreateChannel(options_.coordinator, creds);
    const auto deadline = std::chrono::system_clock::now() + options_.connect_timeout;
    if (!channel_->WaitForConnected(deadline)) {
      return UnavailableError("cannot reach the coordinator at " + options_.coordinator + " within " +
                              std::to_string(options_.connect_timeout.count()) + " s");
    }
    stub_ = v1::internal::WorkerLink::NewStub(channel_);
    stream_ = stub_->Attach(&context_);
    v1::internal::WorkerMessage m;
    *m.mutable_hello() = hello;
    v1::internal::CoordinatorMessage reply;
    if (!stream_->Write(m) || !stream_->Read(&reply) || !reply.has_welcome()) {
      const grpc::Status s = stream_->Finish();
      const std::string why = "the coordinator at " + options_.coordinator + " refused the worker job: " +
                              (s.ok() ? std::string("no welcome") : s.error_message());
      // A wrong secret or a model it cannot serve: starting the job again cannot help.
      if (s.error_code() == grpc::StatusCode::UNAUTHENTICATED) return UnauthenticatedError(why);
      if (s.error_code() == grpc::StatusCode::INVALID_ARGUMENT) return InvalidArgumentError(why);
      return UnavailableError(why);
    }
    *welcome = reply.welcome();
    reader_ = std::thread([this] { ReadLoop(); });
    return OkStatus();
  }

  // The next step or rebalance; false on timeout. UNAVAILABLE once the link has closed.
  StatusOr<bool> Next(v1::internal::CoordinatorMessage* message, std::chrono::milliseconds timeout) {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait_for(lock, timeout, [&] { return !steps_.empty() || closed_; });
    if (!steps_.empty()) {
      *message = std::move(steps_.front());
      steps_.pop_front();
      return true;
    }
    if (closed_) {
      return shutdown_ ? CancelledError("the coordinator stopped") : UnavailableError("the coordinator closed the link");
    }
    return false;
  }

  bool Send(const v1::internal::WorkerMessage& m) { return stream_->Write(m); }
  void Done() { done_ = true; }

 private:
  void ReadLoop() {
    v1::internal::CoordinatorMessage m;
    while (stream_->Read(&m)) {
      if (m.has_shutdown()) {
        std::lock_guard<std::mutex> lock(mu_);
        shutdown_ = true;
      }
      if (!m.has_step() && !m.has_rebalance()) continue;
      {
        std::lock_guard<std::mutex> lock(mu_);
        steps_.push_back(std::move(m));
      }
      cv_.notify_all();
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      closed_ = true;
    }
    cv_.notify_all();
    // The main thread may be inside a step that never ends (a hung collective): give
    // it time to notice, then end this process so that mpirun ends the job.
    for (int i = 0; i < 100 && !done_; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(100));
    if (!done_) {
      std::fprintf(stderr, "epic-worker: rank 0: the coordinator link closed during a step; ending the job\n");
      std::_Exit(4);
    }
  }

  WorkerOptions options_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::internal::WorkerLink::Stub> stub_;
  grpc::ClientContext context_;
  std::unique_ptr<grpc::ClientReaderWriter<v1::internal::WorkerMessage, v1::internal::CoordinatorMessage>> stream_;
  std::thread reader_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<v1::internal::CoordinatorMessage> steps_;
  bool closed_ = false;
  bool shutdown_ = false;  // the coordinator said it was stopping before the link closed
  std::atomic<bool> done_{false};
};

// Every rank switches to the placement in PAYLOAD (a serialized Rebalance) together;
// on rank 0, RESULT gets what the job loaded.
Status Rebalance(Model& model, const std::string& payload, v1::internal::RebalanceResult* result) {
  const auto t0 = std::chrono::steady_clock::now();
  v1::internal::Rebalance request;
  if (!request.ParseFromString(payload)) return InternalError("a rebalance arrived malformed");
  const ModelConfig& c = model.config();
  const int ranks = model.comm().size();
  auto table = placement::PlacementFromProto(request.placement(), c.num_hidden_layers, ranks);
  if (!table.ok()) return InvalidArgumentError("rebalance: " + table.status().message() + " (this job's shape)");
  EPIC_ASSIGN_OR_RETURN(parallel::ExpertPlacement next, parallel::ExpertPlacement::Create(std::move(table).value(), c.n_routed_experts));
  EPIC_ASSIGN_OR_RETURN(PlacementChange change, model.ApplyPlacement(next));
  int64_t mine[2] = {change.experts_loaded, change.bytes_loaded};
  std::vector<int64_t> all(2 * static_cast<size_t>(ranks));
  EPIC_RETURN_IF_ERROR(model.comm().AllGather(mine, all.data(), std::vector<int64_t>(ranks, sizeof mine)));
  int64_t experts = 0, bytes = 0;
  for (int r = 0; r < ranks; ++r) {
    experts += all[2 * r];
    bytes += all[2 * r + 1];
  }
  result->set_rebalance_id(request.rebalance_id());
  result->set_experts_loaded(experts);
  result->set_bytes_loaded(bytes);
  result->set_seconds(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  return OkStatus();
}

// Rank 0 sends COMMAND and PAYLOAD to every rank; the others receive them.
Status Exchange(parallel::Communicator& comm, Command* command, std::string* payload) {
  int64_t header[2] = {static_cast<int64_t>(*command), static_cast<int64_t>(payload->size())};
  // The header waits on the coordinator, possibly for long: idle ranks must not spin.
  EPIC_RETURN_IF_ERROR(comm.AwaitBroadcast(header, sizeof header, 0));
  *command = static_cast<Command>(header[0]);
  payload->resize(static_cast<size_t>(header[1]));
  if (header[1] > 0) EPIC_RETURN_IF_ERROR(comm.Broadcast(payload->data(), header[1], 0));
  return OkStatus();
}

// One prefill of TOKENS (within the cache and the model's context) into blocks from 0,
// nothing kept: a process's first step of a size faults in and sizes the scratch its
// products need (a 512-token prefill of V2-Lite's shape took 1.4-1.9x the next), which
// the first request would pay. The blocks are the coordinator's to hand out afterwards:
// a sequence writes its rows before it reads them.
StatusOr<int64_t> WarmUp(Model& model, LatentCache& cache, int64_t tokens) {
  tokens = std::min({tokens, cache.num_blocks() * cache.block_size(), model.config().max_position_embeddings});
  if (tokens <= 0) return int64_t{0};
  BlockTable table;
  table.blocks.resize(static_cast<size_t>(cache.BlocksFor(tokens)));
  std::iota(table.blocks.begin(), table.blocks.end(), 0);
  std::vector<int32_t> ids(static_cast<size_t>(tokens));
  for (int64_t i = 0; i < tokens; ++i) ids[i] = static_cast<int32_t>(i % model.config().vocab_size);
  SequenceStep step{&table, ids, false};
  std::vector<float> logits;
  try {
    EPIC_RETURN_IF_ERROR(model.Forward({&step, 1}, &cache, &logits));
  } catch (const std::bad_alloc&) {
    return ResourceExhaustedError("cannot allocate the scratch of a step of " + std::to_string(tokens) +
                                  " tokens (lower the coordinator's --max-step-tokens)");
  }
  return tokens;
}

}  // namespace

Status ServeCoordinator(Model& model, const WorkerOptions& options, const std::string& device) {
  parallel::Communicator& comm = model.comm();
  const int rank = comm.rank();
  const int ranks = comm.size();

  RankRecord mine{};
  gethostname(mine.host, sizeof mine.host - 1);
  mine.pid = getpid();
  mine.weight_bytes = model.weights().matrix_bytes;
  mine.fast = model.precision() == cpu::Precision::kFast;
  std::vector<RankRecord> all(static_cast<size_t>(ranks));
  std::vector<int64_t> sizes(static_cast<size_t>(ranks), sizeof(RankRecord));
  EPIC_RETURN_IF_ERROR(comm.AllGather(&mine, all.data(), sizes));

  std::unique_ptr<Link> link;
  Command command = Command::kWelcome;
  std::string payload;
  Status failure;
  if (rank == 0) {
    v1::internal::Hello hello;
    hello.set_secret(options.secret);
    *hello.mutable_model() = SummarizeModel(model.config());
    for (int r = 0; r < ranks; ++r) {
      v1::RankInfo* info = hello.add_ranks();
      info->set_rank(r);
      info->set_host(all[r].host);
      info->set_pid(all[r].pid);
      info->set_weight_bytes(all[r].weight_bytes);
      info->set_device(device);
      info->set_precision(all[r].fast ? "fast" : "exact");
    }
    placement::PlacementToProto(model.placement().table(), hello.mutable_placement());
    hello.set_attention(AttentionModeName(model.attention()));
    link = std::make_unique<Link>(options);
    v1::internal::Welcome welcome;
    failure = link->Open(hello, &welcome);
    if (failure.ok()) {
      welcome.SerializeToString(&payload);
    } else {
      command = Command::kStop;
      payload = std::to_string(static_cast<int>(failure.code()));  // every rank ends alike
    }
  }
  EPIC_RETURN_IF_ERROR(Exchange(comm, &command, &payload));
  if (command == Command::kStop) {
    if (rank == 0) return failure;
    const auto code = static_cast<StatusCode>(std::atoi(payload.c_str()));
    return Status(code == StatusCode::kOk ? StatusCode::kUnavailable : code, "rank 0 could not attach to the coordinator");
  }
  v1::internal::Welcome welcome;
  if (!welcome.ParseFromString(payload) || welcome.block_size() < 1 || welcome.num_blocks() < 1) {
    return InternalError("the coordinator's welcome is malformed");
  }
  std::unique_ptr<LatentCache> cache;
  try {
    cache = model.MakeCache(welcome.block_size(), welcome.num_blocks());
  } catch (const std::bad_alloc&) {
    return ResourceExhaustedError("cannot allocate a latent cache of " + std::to_string(welcome.num_blocks()) +
                                  " blocks of " + std::to_string(welcome.block_size()) +
                                  " tokens (lower the coordinator's --cache-blocks)");
  }
  if (rank == 0) {
    std::fprintf(stderr, "epic-worker: attached to %s with %d rank%s; cache %lld blocks of %lld tokens\n",
                 options.coordinator.c_str(), ranks, ranks == 1 ? "" : "s",
                 static_cast<long long>(welcome.num_blocks()), static_cast<long long>(welcome.block_size()));
  }
  // Steps that arrive meanwhile wait in the link's queue.
  const auto warm_start = std::chrono::steady_clock::now();
  const StatusOr<int64_t> warmed = WarmUp(model, *cache, welcome.max_step_tokens());
  if (!warmed.ok()) {
    if (rank == 0) link->Done();
    return Status(warmed.status().code(), "warming up: " + warmed.status().message());
  }
  if (rank == 0 && *warmed > 0) {
    std::fprintf(stderr, "epic-worker: warmed up with a step of %lld tokens in %.0f ms\n",
                 static_cast<long long>(*warmed),
                 std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - warm_start).count());
  }

  v1::internal::CoordinatorMessage message;
  v1::internal::Step step;
  for (;;) {
    if (rank == 0) {
      payload.clear();
      auto next = link->Next(&message, options.heartbeat);
      if (!next.ok()) {
        command = next.status().code() == StatusCode::kCancelled ? Command::kShutdown : Command::kStop;
        failure = next.status();
      } else if (!*next) {
        command = Command::kHeartbeat;
      } else if (message.has_rebalance()) {
        command = Command::kRebalance;
        message.rebalance().SerializeToString(&payload);
      } else {
        command = Command::kStep;
        step = std::move(*message.mutable_step());
        step.SerializeToString(&payload);
      }
    }
    EPIC_RETURN_IF_ERROR(Exchange(comm, &command, &payload));
    if (command == Command::kHeartbeat) continue;
    if (command == Command::kStop || command == Command::kShutdown) {
      if (link) link->Done();
      if (rank == 0) return failure;
      return command == Command::kShutdown ? CancelledError("the coordinator stopped")
                                           : UnavailableError("rank 0 lost the coordinator link");
    }
    v1::internal::WorkerMessage m;
    Status s;
    if (command == Command::kRebalance) {
      s = Rebalance(model, payload, m.mutable_rebalanced());
    } else if (rank != 0 && !step.ParseFromString(payload)) {
      return InternalError("a step arrived malformed");
    } else {
      s = RunStep(model, *cache, step, m.mutable_result());
    }
    if (!s.ok()) {
      // Every rank sees the same step or placement, so every rank fails the same way.
      if (rank == 0) {
        m.set_error((command == Command::kRebalance ? "rebalance failed: " : "") + s.ToString());
        link->Send(m);
        link->Done();
      }
      return s;
    }
    if (rank == 0 && !link->Send(m)) {
      link->Done();
      // Tell the others, then leave: the launcher relaunches the job.
      command = Command::kStop;
      payload.clear();
      EPIC_RETURN_IF_ERROR(Exchange(comm, &command, &payload));
      return UnavailableError("the coordinator link closed");
    }
  }
}

}  // namespace epic
