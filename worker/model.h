// The DeepSeek-V2/V3 forward pass in one process on the CPU: a batch of sequences of
// any lengths per step, each reading and extending its rows of the latent cache.
#pragma once

#include <array>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "common/status.h"
#include "kernels/cpu/gating.h"
#include "parallel/communicator.h"
#include "parallel/dispatch.h"
#include "parallel/expert_placement.h"
#include "parallel/moe_exchange.h"
#include "worker/checkpoint.h"
#include "worker/device.h"
#include "worker/latent_cache.h"
#include "worker/rope.h"
#include "worker/weights.h"

namespace epic {

// One sequence's part of a step: TOKENS at positions cache->num_tokens onwards.
struct SequenceStep {
  BlockTable* cache = nullptr;
  std::span<const int32_t> tokens;
  bool all_logits = false;  // logits for every token; otherwise for the last only
};

// A step's batch flattened: token i has a position in its sequence and an id; the
// logits are wanted for the tokens of logit_rows, in order.
struct StepTokens {
  std::vector<int64_t> positions;
  std::vector<int32_t> ids;
  std::vector<int64_t> logit_rows;
};

// INVALID_ARGUMENT for a sequence without tokens or an id outside [0, vocab_size),
// FAILED_PRECONDITION for a sequence holding too few cache blocks for its new tokens.
StatusOr<StepTokens> FlattenStep(std::span<const SequenceStep> batch, const LatentCache& cache, int64_t vocab_size);

// The split of a distributed step that the CPU and GPU steps share.
//
// After attention, rank r of RANKS works on its block of the step's TOKENS,
// [tokens * r / ranks, tokens * (r + 1) / ranks): this rank's FIRST and LOCAL, and every
// block's F32 VALUES and BYTES at HIDDEN values a token (the counts of the collectives).
struct TokenBlocks {
  int64_t first = 0;
  int64_t local = 0;
  std::vector<int64_t> values;
  std::vector<int64_t> bytes;
};
TokenBlocks SplitTokens(int64_t tokens, int64_t hidden, int rank, int ranks);

// Rank r holds vocabulary rows [vocab * r / ranks, vocab * (r + 1) / ranks) of lm_head:
// the bytes of every rank's [rows, its vocabulary] F32 slice of logits, and the gathered
// slices (one after another) interleaved into LOGITS [rows, vocab].
std::vector<int64_t> VocabSliceBytes(int64_t rows, int64_t vocab, int ranks);
void InterleaveVocabSlices(const float* gathered, int64_t rows, int64_t vocab, int ranks, float* logits);

// Whether MLA's expanded form (every context row up-projected through kv_b_proj) costs
// fewer multiply-adds than the absorbed form for N new tokens over CONTEXT rows on HEADS
// heads: true for prefill, false for decode.
bool ExpandIsCheaper(const ModelConfig& c, int64_t heads, int64_t n, int64_t context);

struct ExpertCounts;

// Adds one MoE layer's exchange to COUNTS: this rank's tokens per logical expert from
// PLAN, the rows each of its slots ran (SLOT_ROWS), and the exchanges' bytes and time.
void AddExchangeCounts(const parallel::ExpertPlacement& placement, int64_t layer, int64_t num_experts,
                       const parallel::DispatchPlan& plan, std::span<const int64_t> slot_rows,
                       const parallel::ExchangeStats& dispatch, const parallel::ExchangeStats& combine,
                       ExpertCounts* counts);

class ComputeBackend;  // worker/compute.h

// What the MoE layers did, summed over the steps Forward is given it for; the raw
// material of the load reports. Empty rows for dense layers.
struct ExpertCounts {
  // [layer][logical expert]: the tokens of this rank's steps routed to each expert,
  // until Model::ReduceExpertCounts sums them over the job (Generate does, once).
  std::vector<std::vector<int64_t>> tokens;
  std::vector<std::vector<int64_t>> slot_tokens;  // [layer][this rank's slot]: tokens its experts ran
  std::vector<parallel::ExchangeStats> dispatch;  // [layer] this rank's dispatch exchanges
  std::vector<parallel::ExchangeStats> combine;   // [layer] this rank's combine exchanges
};

// How a job's ranks share attention (and the dense rest of the model).
//  kTensor: rank r of N holds attention heads [H*r/N, H*(r+1)/N), its share of the dense
//    MLPs' and shared experts' intermediate dimension and vocabulary rows
//    [V*r/N, V*(r+1)/N) of lm_head; every rank runs every sequence of a step (the same
//    Forward calls with the same inputs), and the latent cache is the same on every rank.
//  kData: every rank holds all of attention, the dense MLPs, shared experts and lm_head,
//    and runs only its own sequences, whose latent cache rows live on it alone: N ranks
//    hold N times the context. Only the routed experts are split, as in kTensor; every
//    rank enters every step (with no sequences if it has none) for the MoE exchanges.
enum class AttentionMode { kTensor, kData };

// "tp" / "dp": the names the command lines and the coordinator use.
const char* AttentionModeName(AttentionMode mode);
StatusOr<AttentionMode> ParseAttentionMode(const std::string& name);

// This process's part of a distributed model: the experts the placement gives its
// slots, and attention as ATTENTION says.
struct ModelShard {
  parallel::Communicator* comm = nullptr;  // nullptr: a single process (a one-rank job)
  // nullptr: the default placement (contiguous blocks of experts, no replicas).
  const parallel::ExpertPlacement* placement = nullptr;
  // With ComputeDevice::kCuda in a job of several ranks: the communicator over device
  // buffers (NCCL, Job::DeviceComm) that the GPU step exchanges activations with.
  parallel::Communicator* device_comm = nullptr;
  AttentionMode attention = AttentionMode::kTensor;
};

// What a change of placement did on this rank.
struct PlacementChange {
  int64_t experts_loaded = 0;  // read from the checkpoint
  int64_t bytes_loaded = 0;
  int64_t experts_dropped = 0;
  int64_t bytes_dropped = 0;
};

// The phases of the layer schedule whose time Model::Forward can record.
enum class Phase : int { kAttention, kOutput, kNorm, kGate, kExchange, kExperts, kMlp, kLmHead, kCount };
const char* PhaseName(Phase phase);

// Host seconds Forward spent in each phase, added up over the steps it ran while given
// (Model::set_phase_times); the rest of a step (embedding, collectives, bookkeeping) is
// no phase. The CPU backend's calls return when their work is done, so on it these are
// the phases' own times; a device backend's may return sooner.
struct PhaseTimes {
  std::array<double, static_cast<size_t>(Phase::kCount)> seconds{};
  double& operator[](Phase phase) { return seconds[static_cast<size_t>(phase)]; }
  double operator[](Phase phase) const { return seconds[static_cast<size_t>(phase)]; }
};

// Which form of MLA a step uses; kAuto picks the cheaper per sequence (prefill
// expands K/V through kv_b_proj, decode absorbs it into the query and output).
enum class AttentionForm { kAuto, kExpanded, kAbsorbed };

class Model {
 public:
  // Opens and validates the checkpoint, binds its weights (PROGRESS: optional).
  // Distributed: every rank calls Load with its SHARD; sizes that cannot be split
  // (fewer heads or vocabulary rows than ranks) are refused.
  // kCuda copies this rank's weights to its GPU and runs every step there (the CUDA
  // backend, worker/compute.h); in a job of several ranks it needs SHARD.device_comm.
  // PRECISION kFast (the CPU backend's) quantizes the products' weights to int8 where the
  // processor has AVX2 or wider (kernels/cpu/matmul_int8.h); elsewhere the model runs
  // exactly, and precision() says so.
  static StatusOr<std::unique_ptr<Model>> Load(const std::filesystem::path& dir,
                                               const ProgressFn& progress = {},
                                               WeightResidency residency = WeightResidency::kCopy,
                                               const ModelShard& shard = {},
                                               ComputeDevice device = ComputeDevice::kCpu,
                                               cpu::Precision precision = cpu::Precision::kExact);
  ~Model();

  ComputeDevice device() const { return device_; }
  AttentionMode attention() const { return attention_; }
  // What the products run at: kFast only where it was asked for and the host has int8.
  cpu::Precision precision() const { return precision_; }

  const ModelConfig& config() const { return checkpoint_->config(); }
  const ModelWeights& weights() const { return *weights_; }
  parallel::Communicator& comm() const { return *comm_; }
  const parallel::ExpertPlacement& placement() const { return *placement_; }
  // All-to-all traffic of the MoE layers since load, for the load reports.
  const parallel::ExchangeStats& exchange_stats() const;

  // A cache sized for this model: its rows BF16 under the fast precision, else F32.
  std::unique_ptr<LatentCache> MakeCache(int64_t block_size, int64_t num_blocks) const;

  // For tests and benchmarks: force one form of attention.
  void set_attention_form(AttentionForm form) { attention_form_ = form; }
  // Forward adds each phase's time into TIMES until given nullptr (bench/model_bench).
  void set_phase_times(PhaseTimes* times) { phase_times_ = times; }

  // Runs one step. Each sequence's cache must already hold room for its new tokens
  // (LatentCache::Reserve); rows are written and num_tokens advanced. LOGITS receives
  // [rows, vocab], rows in sequence order (all tokens or the last, per all_logits).
  // COUNTS (optional) accumulates what the MoE layers did (see ExpertCounts).
  // Distributed, every rank calls Forward for every step: with kTensor attention every
  // rank passes the same batch and gets the same logits; with kData each passes its own
  // sequences (possibly none) and gets their logits.
  // Non-finite logits (broken weights or config) are an INTERNAL error naming the layer
  // where NaN or Inf first appears (found by running the step again with a check after
  // every layer, only then, on every rank when any rank's logits are not finite); the
  // step then leaves num_tokens where it was.
  Status Forward(std::span<SequenceStep> batch, LatentCache* cache, std::vector<float>* logits,
                 ExpertCounts* counts = nullptr);

  // Switches to NEXT between steps (every rank together): the experts this rank newly
  // holds are read from the checkpoint, those it keeps stay where they are, and the
  // memory of those it drops goes back to the system. Outputs do not change. A load
  // that fails leaves the model as it was. On the CUDA step the new experts are copied to
  // the GPU too, and the dropped ones' device memory freed.
  StatusOr<PlacementChange> ApplyPlacement(const parallel::ExpertPlacement& next);

  // Sums COUNTS->tokens over the job's ranks, in place: once after the steps, rather
  // than a collective per layer per step. Every rank calls it.
  Status ReduceExpertCounts(ExpertCounts* counts);

 private:
  Model() = default;
  // Forward's work; with CHECK_LAYERS an error at the first layer whose activations are
  // not all finite.
  Status Step(std::span<SequenceStep> batch, LatentCache* cache, std::vector<float>* logits, ExpertCounts* counts,
              bool check_layers);
  // Whether FLAG holds on every rank (a collective under kData, where ranks differ).
  StatusOr<bool> OnEveryRank(bool flag);
  // RUN(), its time added to PHASE when phase times are being recorded.
  template <typename Run>
  Status Timed(Phase phase, Run&& run);
  Status MoeBlock(int64_t layer, const float* x, int64_t tokens, int64_t first_token, float* residual,
                  ExpertCounts* counts);

  std::unique_ptr<parallel::Communicator> own_comm_;  // the one-rank job of a single process
  parallel::Communicator* comm_ = nullptr;
  std::unique_ptr<parallel::ExpertPlacement> placement_;
  int64_t head_begin_ = 0, head_end_ = 0;
  int64_t vocab_begin_ = 0, vocab_end_ = 0;
  parallel::ExchangeStats exchange_stats_;
  std::unique_ptr<parallel::MoeExchange> exchange_;
  PhaseTimes* phase_times_ = nullptr;
  std::vector<float> gathered_logits_;  // the vocabulary slices of a tensor-parallel step, on the host
  std::vector<int32_t> gate_ids_;  // the gate's choices, reused from layer to layer
  std::vector<float> gate_weights_;
  std::unique_ptr<Checkpoint> checkpoint_;
  std::unique_ptr<ModelWeights> weights_;
  RopeTable rope_;
  cpu::GateParams gate_;
  AttentionForm attention_form_ = AttentionForm::kAuto;
  std::unique_ptr<ComputeBackend> backend_;  // where the steps run
  ComputeDevice device_ = ComputeDevice::kCpu;
  AttentionMode attention_ = AttentionMode::kTensor;
  WeightResidency residency_ = WeightResidency::kCopy;
  cpu::Precision precision_ = cpu::Precision::kExact;
};

// What MODEL's products run at, for a log line: "exact" or "fast", and why when that is
// not the ASKED precision (fast on a processor without AVX2).
std::string PrecisionNote(const Model& model, cpu::Precision asked);

}  // namespace epic
