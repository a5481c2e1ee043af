#include "worker/model.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <string>

#include "kernels/cpu/matmul_int8.h"
#include "parallel/self_communicator.h"

#include "worker/compute.h"

namespace epic {
namespace {

// INVALID_ARGUMENT unless P fits a job of RANKS ranks running CONFIG.
Status CheckPlacement(const ModelConfig& config, int ranks, const parallel::ExpertPlacement& p) {
  if (p.num_ranks() != ranks || p.num_layers() != config.num_hidden_layers ||
      p.num_experts() != config.n_routed_experts) {
    return InvalidArgumentError("expert placement is for " + std::to_string(p.num_ranks()) + " ranks, " +
                                std::to_string(p.num_layers()) + " layers and " + std::to_string(p.num_experts()) +
                                " experts; the job has " + std::to_string(ranks) + " ranks and the model " +
                                std::to_string(config.num_hidden_layers) + " layers and " +
                                std::to_string(config.n_routed_experts) + " experts");
  }
  for (int64_t l = 0; l < config.num_hidden_layers; ++l) {
    if (p.is_moe_layer(l) != config.IsMoeLayer(l)) {
      return InvalidArgumentError("expert placement: layer " + std::to_string(l) +
                                  (config.IsMoeLayer(l) ? " is" : " is not") + " an MoE layer of the model");
    }
  }
  return OkStatus();
}

}  // namespace

Model::~Model() = default;

const parallel::ExchangeStats& Model::exchange_stats() const { return exchange_stats_; }

StatusOr<PlacementChange> Model::ApplyPlacement(const parallel::ExpertPlacement& next) {
  const ModelConfig& c = config();
  EPIC_RETURN_IF_ERROR(CheckPlacement(c, comm_->size(), next));
  const int rank = comm_->rank();
  PlacementChange change;
  const size_t layers = static_cast<size_t>(c.num_hidden_layers);
  std::vector<std::vector<MlpWeights>> experts(layers);
  std::vector<std::vector<std::shared_ptr<Arena>>> memory(layers);
  std::vector<std::vector<int>> kept(layers);  // per new slot, the old slot it keeps; -1: new
  // Every load first: a failure leaves the model as it was.
  for (size_t l = 0; l < layers; ++l) {
    if (!next.is_moe_layer(static_cast<int64_t>(l))) continue;
    const LayerWeights& L = weights_->layers[l];
    const auto& held = placement_->slots(static_cast<int64_t>(l), rank);
    for (int32_t e : next.slots(static_cast<int64_t>(l), rank)) {
      const auto it = std::find(held.begin(), held.end(), e);
      if (it != held.end()) {
        const size_t s = static_cast<size_t>(it - held.begin());
        kept[l].push_back(static_cast<int>(s));
        experts[l].push_back(L.experts[s]);
        memory[l].push_back(s < L.expert_memory.size() ? L.expert_memory[s] : nullptr);
        continue;
      }
      EPIC_ASSIGN_OR_RETURN(BoundExpert bound, BindExpert(*checkpoint_, static_cast<int64_t>(l), e, residency_, precision_));
      kept[l].push_back(-1);
      experts[l].push_back(bound.weights);
      memory[l].push_back(std::move(bound.memory));
      ++change.experts_loaded;
      change.bytes_loaded += bound.bytes;
    }
  }
  // The device's copies first: the last step that can fail.
  EPIC_RETURN_IF_ERROR(backend_->ChangeExperts(next, rank, kept, experts));
  for (size_t l = 0; l < layers; ++l) {
    if (!next.is_moe_layer(static_cast<int64_t>(l))) continue;
    LayerWeights& L = weights_->layers[l];
    const auto& kept_experts = next.slots(static_cast<int64_t>(l), rank);
    const auto& held = placement_->slots(static_cast<int64_t>(l), rank);
    for (size_t s = 0; s < held.size(); ++s) {
      if (std::find(kept_experts.begin(), kept_experts.end(), held[s]) != kept_experts.end()) continue;
      ++change.experts_dropped;
      const MlpWeights& w = L.experts[s];
      change.bytes_dropped += w.gate.Bytes() + w.up.Bytes() + w.down.Bytes();
      // Experts loaded later free their own memory below; those of the shared arena
      // give their pages back here.
      const bool own = s < L.expert_memory.size() && L.expert_memory[s] != nullptr;
      if (!own && (residency_ == WeightResidency::kCopy || precision_ == cpu::Precision::kFast)) {
        ReleaseExpertPages(w);
      }
    }
    L.experts = std::move(experts[l]);
    L.expert_memory = std::move(memory[l]);
  }
  placement_ = std::make_unique<parallel::ExpertPlacement>(next);
  weights_->matrix_bytes += change.bytes_loaded - change.bytes_dropped;
  return change;
}

StatusOr<std::unique_ptr<Model>> Model::Load(const std::filesystem::path& dir,
                                             const ProgressFn& progress, WeightResidency residency,
                                             const ModelShard& shard, ComputeDevice device,
                                             cpu::Precision precision) {
  std::unique_ptr<Model> model(new Model());
  if (shard.comm == nullptr) {
    model->own_comm_ = parallel::MakeSelfCommunicator();
    model->comm_ = model->own_comm_.get();
  } else {
    model->comm_ = shard.comm;
  }
  const int rank = model->comm_->rank();
  const int ranks = model->comm_->size();
  if (device == ComputeDevice::kCuda && ranks > 1) {
    if (shard.device_comm == nullptr) {
      return FailedPreconditionError("--device cuda in a job of " + std::to_string(ranks) +
                                     " ranks needs a communicator over device buffers (NCCL)");
    }
    if (shard.device_comm->size() != ranks || shard.device_comm->rank() != rank) {
      return InvalidArgumentError("the device communicator's ranks do not match the job's");
    }
  }
  if (!DeviceBuilt(device)) return FailedPreconditionError("this build has no CUDA support");
  if (precision == cpu::Precision::kFast && device != ComputeDevice::kCpu) {
    return InvalidArgumentError("--precision fast is the CPU backend's (int8 products); the GPU runs exact");
  }
  if (precision == cpu::Precision::kFast && !cpu::HasInt8Products()) {
    precision = cpu::Precision::kExact;  // the plain int8 path is a reference, not a speed-up
  }
  model->precision_ = precision;
  model->device_ = device;
  EPIC_ASSIGN_OR_RETURN(model->checkpoint_, Checkpoint::Open(dir));
  const ModelConfig& config = model->config();
  model->attention_ = shard.attention;
  // Under kData nothing but the routed experts is split: any number of ranks.
  const bool split = shard.attention == AttentionMode::kTensor;
  const int parts = split ? ranks : 1;
  const int part = split ? rank : 0;
  const int64_t shared_inter = config.moe_intermediate_size * config.n_shared_experts;
  if (config.intermediate_size < parts || (shared_inter > 0 && shared_inter < parts)) {
    return InvalidArgumentError("cannot split the MLPs' intermediate dimension (" +
                                std::to_string(config.intermediate_size) + ", shared experts " +
                                std::to_string(shared_inter) + ") over " + std::to_string(ranks) +
                                " ranks (data-parallel attention, --attention dp, replicates them)");
  }
  if (config.num_attention_heads < parts || config.vocab_size < parts) {
    return InvalidArgumentError(
        "cannot split " + std::to_string(config.num_attention_heads) + " attention heads and a vocabulary of " +
        std::to_string(config.vocab_size) + " over " + std::to_string(ranks) +
        " ranks: run at most " + std::to_string(std::min(config.num_attention_heads, config.vocab_size)) +
        " ranks (uneven splits are fine), or data-parallel attention (--attention dp), which any number of "
        "ranks can run");
  }
  std::vector<bool> moe_layers(static_cast<size_t>(config.num_hidden_layers));
  for (int64_t l = 0; l < config.num_hidden_layers; ++l) moe_layers[l] = config.IsMoeLayer(l);
  if (shard.placement != nullptr) {
    const parallel::ExpertPlacement& p = *shard.placement;
    EPIC_RETURN_IF_ERROR(CheckPlacement(config, ranks, p));
    model->placement_ = std::make_unique<parallel::ExpertPlacement>(p);
  } else {
    model->placement_ = std::make_unique<parallel::ExpertPlacement>(parallel::ExpertPlacement::Contiguous(
        config.num_hidden_layers, moe_layers, std::max<int64_t>(config.n_routed_experts, 1), ranks));
  }
  model->head_begin_ = config.num_attention_heads * part / parts;
  model->head_end_ = config.num_attention_heads * (part + 1) / parts;
  model->vocab_begin_ = config.vocab_size * part / parts;
  model->vocab_end_ = config.vocab_size * (part + 1) / parts;
  WeightShard ws;
  ws.head_begin = model->head_begin_;
  ws.head_end = model->head_end_;
  ws.vocab_begin = model->vocab_begin_;
  ws.vocab_end = model->vocab_end_;
  ws.mlp_part = part;
  ws.mlp_parts = parts;
  for (int64_t l = 0; l < config.num_hidden_layers; ++l) ws.expert_slots.push_back(model->placement_->slots(l, rank));
  // The CUDA step copies the weights to the GPU from the file's pages: no host copy.
  const WeightResidency host = device == ComputeDevice::kCuda ? WeightResidency::kMapped : residency;
  EPIC_ASSIGN_OR_RETURN(model->weights_,
                        ModelWeights::Bind(*model->checkpoint_, device == ComputeDevice::kCuda ? ProgressFn{} : progress,
                                           host, ws, precision));
  model->residency_ = host;
  const ModelConfig& c = model->config();
  model->rope_ = MakeRopeTable(c);
  cpu::GateParams& g = model->gate_;
  g.num_experts = c.n_routed_experts;
  g.top_k = c.num_experts_per_tok;
  g.num_groups = c.n_group;
  g.topk_groups = c.topk_group;
  g.ranking = c.topk_method == TopkMethod::kGreedy             ? cpu::GroupRanking::kNone
              : c.topk_method == TopkMethod::kGroupLimitedGreedy ? cpu::GroupRanking::kMax
                                                                 : cpu::GroupRanking::kTopTwoSum;
  g.sigmoid = c.scoring_func == ScoringFunc::kSigmoid;
  g.normalize = c.num_experts_per_tok > 1 && c.norm_topk_prob;
  const bool scaled = !g.normalize || c.ScalesAfterNormalising();
  g.scale = scaled ? static_cast<float>(c.routed_scaling_factor) : 1.0f;
  ComputeShard cs;
  cs.head_begin = model->head_begin_;
  cs.head_end = model->head_end_;
  cs.vocab_begin = model->vocab_begin_;
  cs.vocab_end = model->vocab_end_;
  if (device == ComputeDevice::kCpu) {
    model->backend_ = MakeCpuBackend(c, *model->weights_, model->rope_, g, cs, model->comm_, precision);
  } else {
    cs.device_comm = ranks > 1 ? shard.device_comm : nullptr;
    EPIC_ASSIGN_OR_RETURN(model->backend_, MakeDeviceBackend(device, c, *model->weights_, model->rope_, g, cs,
                                                             progress));
  }
  model->exchange_ = std::make_unique<parallel::MoeExchange>(model->backend_->comm(), &model->backend_->rows(), rank);
  return model;
}

std::unique_ptr<LatentCache> Model::MakeCache(int64_t block_size, int64_t num_blocks) const {
  return std::make_unique<LatentCache>(config().num_hidden_layers, config().latent_dim(), block_size,
                                       num_blocks, /*host_rows=*/!backend_->on_device(),
                                       /*bf16_rows=*/precision_ == cpu::Precision::kFast);
}

StatusOr<StepTokens> FlattenStep(std::span<const SequenceStep> batch, const LatentCache& cache, int64_t vocab_size) {
  StepTokens step;
  for (const SequenceStep& s : batch) {
    if (s.tokens.empty()) return InvalidArgumentError("a sequence in the step has no tokens");
    const int64_t start = s.cache->num_tokens;
    if (cache.BlocksFor(start + static_cast<int64_t>(s.tokens.size())) >
        static_cast<int64_t>(s.cache->blocks.size())) {
      return FailedPreconditionError("latent cache: sequence holds too few blocks for its tokens");
    }
    for (size_t i = 0; i < s.tokens.size(); ++i) {
      if (s.tokens[i] < 0 || s.tokens[i] >= vocab_size) {
        return InvalidArgumentError("token id " + std::to_string(s.tokens[i]) +
                                    " is outside the vocabulary [0, " + std::to_string(vocab_size) + ")");
      }
      if (s.all_logits || i + 1 == s.tokens.size()) {
        step.logit_rows.push_back(static_cast<int64_t>(step.positions.size()));
      }
      step.positions.push_back(start + static_cast<int64_t>(i));
      step.ids.push_back(s.tokens[i]);
    }
  }
  return step;
}

const char* AttentionModeName(AttentionMode mode) { return mode == AttentionMode::kData ? "dp" : "tp"; }

StatusOr<AttentionMode> ParseAttentionMode(const std::string& name) {
  if (name == "tp") return AttentionMode::kTensor;
  if (name == "dp") return AttentionMode::kData;
  return InvalidArgumentError("attention mode '" + name + "': expected tp (tensor-parallel) or dp (data-parallel)");
}

TokenBlocks SplitTokens(int64_t tokens, int64_t hidden, int rank, int ranks) {
  TokenBlocks b;
  b.first = tokens * rank / ranks;
  b.local = tokens * (rank + 1) / ranks - b.first;
  for (int r = 0; r < ranks; ++r) {
    b.values.push_back((tokens * (r + 1) / ranks - tokens * r / ranks) * hidden);
    b.bytes.push_back(b.values.back() * static_cast<int64_t>(sizeof(float)));
  }
  return b;
}

std::vector<int64_t> VocabSliceBytes(int64_t rows, int64_t vocab, int ranks) {
  std::vector<int64_t> bytes(static_cast<size_t>(ranks));
  for (int r = 0; r < ranks; ++r) {
    bytes[r] = rows * (vocab * (r + 1) / ranks - vocab * r / ranks) * static_cast<int64_t>(sizeof(float));
  }
  return bytes;
}

void InterleaveVocabSlices(const float* gathered, int64_t rows, int64_t vocab, int ranks, float* logits) {
  const float* block = gathered;
  for (int r = 0; r < ranks; ++r) {
    const int64_t v0 = vocab * r / ranks;
    const int64_t v = vocab * (r + 1) / ranks - v0;
    for (int64_t row = 0; row < rows; ++row) {
      std::memcpy(logits + row * vocab + v0, block + row * v, static_cast<size_t>(v) * sizeof(float));
    }
    block += rows * v;
  }
}

bool ExpandIsCheaper(const ModelConfig& c, int64_t heads, int64_t n, int64_t context) {
  const int64_t nope = c.qk_nope_head_dim, rope = c.qk_rope_head_dim, lora = c.kv_lora_rank;
  const int64_t vdim = c.v_head_dim, qhd = c.q_head_dim();
  // Expanding every context row through kv_b_proj against folding W_UK/W_UV into each query.
  const double expanded = static_cast<double>(context) * lora * heads * (nope + vdim) +
                          static_cast<double>(n) * context * heads * (qhd + vdim);
  const double absorbed = static_cast<double>(n) * heads * (nope * lora + context * (2 * lora + rope) + lora * vdim);
  return expanded < absorbed;
}

void AddExchangeCounts(const parallel::ExpertPlacement& placement, int64_t layer, int64_t num_experts,
                       const parallel::DispatchPlan& plan, std::span<const int64_t> slot_rows,
                       const parallel::ExchangeStats& dispatch, const parallel::ExchangeStats& combine,
                       ExpertCounts* counts) {
  // This rank's tokens per logical expert; ReduceExpertCounts sums over the job.
  auto& routed = counts->tokens[layer];
  routed.resize(static_cast<size_t>(num_experts), 0);
  for (int r = 0; r < plan.num_ranks; ++r) {
    const auto& held = placement.slots(layer, r);
    for (size_t s = 0; s < held.size(); ++s) routed[held[s]] += plan.slot_tokens[r][s];
  }
  auto& mine = counts->slot_tokens[layer];
  mine.resize(slot_rows.size(), 0);
  for (size_t s = 0; s < slot_rows.size(); ++s) mine[s] += slot_rows[s];
  counts->dispatch[layer].Add(dispatch);
  counts->combine[layer].Add(combine);
}

namespace {

// On the bits (an exponent of all ones is an Inf or a NaN), a loop GCC vectorizes:
// std::isfinite's took 1-2 ms over the 26 MB of logits of 64 sequences a step.
bool AllFinite(const float* v, int64_t n) {
  uint32_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, v + i, sizeof(bits));
    bad |= static_cast<uint32_t>((bits & 0x7f800000u) == 0x7f800000u);
  }
  return bad == 0;
}

std::string StepName(std::span<const SequenceStep> batch) {
  int64_t tokens = 0;
  for (const SequenceStep& s : batch) tokens += static_cast<int64_t>(s.tokens.size());
  return "the step of " + std::to_string(batch.size()) + " sequence(s), " + std::to_string(tokens) +
         " token(s), the first at position " + std::to_string(batch.empty() ? 0 : batch[0].cache->num_tokens);
}

}  // namespace

StatusOr<bool> Model::OnEveryRank(bool flag) {
  const int ranks = comm_->size();
  if (attention_ == AttentionMode::kTensor || ranks == 1) return flag;  // alike on every rank
  const int32_t mine = flag ? 1 : 0;
  std::vector<int32_t> all(static_cast<size_t>(ranks));
  EPIC_RETURN_IF_ERROR(comm_->AllGather(&mine, all.data(), std::vector<int64_t>(ranks, sizeof mine)));
  return std::all_of(all.begin(), all.end(), [](int32_t f) { return f == 1; });
}

const char* PhaseName(Phase phase) {
  switch (phase) {
    case Phase::kAttention: return "attention";
    case Phase::kOutput: return "o_proj";
    case Phase::kNorm: return "norms";
    case Phase::kGate: return "gate";
    case Phase::kExchange: return "exchange";
    case Phase::kExperts: return "experts";
    case Phase::kMlp: return "mlp";
    case Phase::kLmHead: return "lm_head";
    case Phase::kCount: break;
  }
  return "?";
}

template <typename Run>
Status Model::Timed(Phase phase, Run&& run) {
  if (phase_times_ == nullptr) return run();
  const auto t0 = std::chrono::steady_clock::now();
  Status s = run();
  (*phase_times_)[phase] += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return s;
}

Status Model::Forward(std::span<SequenceStep> batch, LatentCache* cache, std::vector<float>* logits,
                      ExpertCounts* counts) {
  EPIC_RETURN_IF_ERROR(Step(batch, cache, logits, counts, /*check_layers=*/false));
  EPIC_ASSIGN_OR_RETURN(const bool finite, OnEveryRank(AllFinite(logits->data(), static_cast<int64_t>(logits->size()))));
  if (finite) return OkStatus();
  // Only now look for the layer: the same step again, checked after every layer. It
  // writes the same cache rows; every rank sees the same logits, so all run it.
  for (SequenceStep& s : batch) s.cache->num_tokens -= static_cast<int64_t>(s.tokens.size());
  const std::string step = StepName(batch);
  // The checked run always ends in an error: at a layer, or at the final norm and lm_head.
  return InternalError(step + ": " + Step(batch, cache, logits, nullptr, /*check_layers=*/true).message());
}

// The activations the schedule keeps in the backend's memory (ComputeBackend::Activations).
enum : int { kX, kNormed, kAttn, kPartial, kMine, kNormedAll, kSummed, kExpertOut, kLogits, kGathered };

Status Model::Step(std::span<SequenceStep> batch, LatentCache* cache, std::vector<float>* logits,
                   ExpertCounts* counts, bool check_layers) {
  const ModelConfig& c = config();
  const int64_t hidden = c.hidden_size;
  EPIC_ASSIGN_OR_RETURN(StepTokens step, FlattenStep(batch, *cache, c.vocab_size));
  if (counts != nullptr && counts->tokens.size() != static_cast<size_t>(c.num_hidden_layers)) {
    const size_t layers = static_cast<size_t>(c.num_hidden_layers);
    counts->tokens.assign(layers, {});
    counts->slot_tokens.assign(layers, {});
    counts->dispatch.assign(layers, {});
    counts->combine.assign(layers, {});
  }
  ComputeBackend& b = *backend_;
  parallel::Communicator* comm = b.comm();
  const int64_t tokens = static_cast<int64_t>(step.ids.size());
  const int rank = comm_->rank();
  const int ranks = comm_->size();
  // Tensor-parallel attention across ranks; else this rank's sequences are all its own.
  const bool split = attention_ == AttentionMode::kTensor && ranks > 1;
  const int64_t heads = head_end_ - head_begin_;
  EPIC_RETURN_IF_ERROR(b.BeginStep(batch, step, cache));

  // Each sequence's form of attention, chosen alike on every rank.
  std::vector<AttentionSpan> spans;
  for (int64_t first = 0; const SequenceStep& s : batch) {
    AttentionSpan sp{first, static_cast<int64_t>(s.tokens.size()), s.cache->num_tokens, false};
    const int64_t context = sp.start + sp.n;
    const double kv_bytes = static_cast<double>(context) * heads * (c.qk_nope_head_dim + c.v_head_dim) * 6;
    sp.expanded = attention_form_ == AttentionForm::kAuto
                      ? ExpandIsCheaper(c, heads, sp.n, context) && kv_bytes <= b.expanded_kv_budget()
                      : attention_form_ == AttentionForm::kExpanded;
    spans.push_back(sp);
    first += sp.n;
  }

  // Split, attention runs on every token for this rank's heads and the rest of the
  // layer on this rank's block of tokens [first, first + local); else on all of them.
  const TokenBlocks blocks = split ? SplitTokens(tokens, hidden, rank, ranks) : SplitTokens(tokens, hidden, 0, 1);
  const int64_t first = blocks.first;
  const int64_t local = blocks.local;
  // (A data-parallel rank may have no tokens in a step: buffers of one row at least.)
  const int64_t rows_held = std::max<int64_t>(tokens, 1);
  EPIC_ASSIGN_OR_RETURN(float* x, b.Activations(kX, rows_held * hidden));  // the residual, all tokens
  EPIC_ASSIGN_OR_RETURN(float* normed, b.Activations(kNormed, rows_held * hidden));
  EPIC_ASSIGN_OR_RETURN(float* attn, b.Activations(kAttn, rows_held * heads * c.v_head_dim));
  float* partial = nullptr;  // this rank's share of a row-parallel product, all tokens
  float* mine = x;           // this rank's block of the residual
  if (split) {
    EPIC_ASSIGN_OR_RETURN(partial, b.Activations(kPartial, tokens * hidden));
    EPIC_ASSIGN_OR_RETURN(mine, b.Activations(kMine, std::max<int64_t>(local, 1) * hidden));
  }
  EPIC_RETURN_IF_ERROR(b.Embed(x));

  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const LayerWeights& L = weights_->layers[l];
    EPIC_RETURN_IF_ERROR(Timed(Phase::kNorm, [&] { return b.Norm(NormWeight::kInput, l, x, tokens, normed); }));
    EPIC_RETURN_IF_ERROR(Timed(Phase::kAttention, [&] { return b.Attention(l, normed, spans, attn); }));
    // Row-parallel o_proj: the heads' shares summed, each rank keeping its tokens.
    if (!split) {
      EPIC_RETURN_IF_ERROR(
          Timed(Phase::kOutput, [&] { return b.OutputProjection(l, attn, tokens, x, /*accumulate=*/true); }));
    } else {
      EPIC_RETURN_IF_ERROR(
          Timed(Phase::kOutput, [&] { return b.OutputProjection(l, attn, tokens, partial, /*accumulate=*/false); }));
      EPIC_RETURN_IF_ERROR(comm->ReduceScatterSum(partial, mine, blocks.values));
      EPIC_RETURN_IF_ERROR(b.Add(mine, x + first * hidden, local * hidden));
    }

    EPIC_RETURN_IF_ERROR(
        Timed(Phase::kNorm, [&] { return b.Norm(NormWeight::kPostAttention, l, mine, local, normed); }));
    if (L.moe) EPIC_RETURN_IF_ERROR(MoeBlock(l, normed, local, first, mine, counts));
    // The dense MLP, or the shared experts, split by their intermediate dimension: every
    // rank runs its part on all tokens, and the parts are summed into the token blocks.
    if (!L.moe || L.has_shared) {
      if (!split) {
        EPIC_RETURN_IF_ERROR(Timed(Phase::kMlp, [&] { return b.Mlp(l, normed, tokens, x); }));
      } else {
        EPIC_ASSIGN_OR_RETURN(float* all, b.Activations(kNormedAll, tokens * hidden));
        EPIC_ASSIGN_OR_RETURN(float* summed, b.Activations(kSummed, std::max<int64_t>(local, 1) * hidden));
        EPIC_RETURN_IF_ERROR(comm->AllGather(normed, all, blocks.bytes));
        EPIC_RETURN_IF_ERROR(b.Zero(partial, tokens * hidden));
        EPIC_RETURN_IF_ERROR(Timed(Phase::kMlp, [&] { return b.Mlp(l, all, tokens, partial); }));
        EPIC_RETURN_IF_ERROR(comm->ReduceScatterSum(partial, summed, blocks.values));
        EPIC_RETURN_IF_ERROR(b.Add(mine, summed, local * hidden));
      }
    }
    if (split) EPIC_RETURN_IF_ERROR(comm->AllGather(mine, x, blocks.bytes));
    if (check_layers) {
      std::vector<float> host(static_cast<size_t>(tokens * hidden));
      EPIC_RETURN_IF_ERROR(b.CopyToHost(x, tokens * hidden, host.data()));
      EPIC_ASSIGN_OR_RETURN(const bool finite, OnEveryRank(AllFinite(host.data(), tokens * hidden)));
      if (!finite) {
        return InternalError("non-finite activations (NaN or Inf) first appear in layer " + std::to_string(l) +
                             (L.moe ? " (MoE)" : " (dense)") +
                             ": the checkpoint's weights or config are broken there");
      }
    }
  }
  if (check_layers) {
    // Finite through the layers: the final norm or lm_head is where it breaks.
    return InternalError("non-finite values (NaN or Inf) first appear in the final norm or lm_head");
  }

  // Final norm on the rows that want logits; each rank computes its vocabulary rows.
  const int64_t rows = static_cast<int64_t>(step.logit_rows.size());
  const int64_t my_vocab = vocab_end_ - vocab_begin_;
  logits->resize(static_cast<size_t>(rows * c.vocab_size));
  float* slice = nullptr;
  if (!split && !b.on_device() && rows > 0) {
    // In host memory the logits are written where the caller reads them: no copy of the
    // rows' vocabularies (26 MB a step for 64 sequences of V2-Lite's).
    slice = logits->data();
  } else {
    EPIC_ASSIGN_OR_RETURN(slice, b.Activations(kLogits, std::max<int64_t>(rows * my_vocab, 1)));
  }
  EPIC_RETURN_IF_ERROR(Timed(Phase::kLmHead, [&] { return b.LmHead(x, step.logit_rows, slice); }));
  if (!split) {
    EPIC_RETURN_IF_ERROR(b.CopyToHost(slice, rows * c.vocab_size, logits->data()));  // none if the same
  } else {
    // Gather the slices ([rows, vocab of rank r] from each rank r), then interleave.
    EPIC_ASSIGN_OR_RETURN(float* gathered, b.Activations(kGathered, rows * c.vocab_size));
    EPIC_RETURN_IF_ERROR(comm->AllGather(slice, gathered, VocabSliceBytes(rows, c.vocab_size, ranks)));
    std::vector<float>& host = gathered_logits_;  // kept: fresh pages each step cost their zeroing
    host.resize(static_cast<size_t>(rows * c.vocab_size));
    EPIC_RETURN_IF_ERROR(b.CopyToHost(gathered, rows * c.vocab_size, host.data()));
    InterleaveVocabSlices(host.data(), rows, c.vocab_size, ranks, logits->data());
  }
  for (SequenceStep& s : batch) s.cache->num_tokens += static_cast<int64_t>(s.tokens.size());
  return OkStatus();
}

// The routed experts of LAYER for this rank's TOKENS tokens X (normalised; the first is
// FIRST_TOKEN of the step), added into RESIDUAL: the gate, the plan, each token sent
// once to every rank holding one of its experts, the experts run on the rows grouped by
// slot (each expert's weights read once for all its tokens), and the rows sent back.
Status Model::MoeBlock(int64_t layer, const float* x, int64_t tokens, int64_t first_token, float* residual,
                       ExpertCounts* counts) {
  const ModelConfig& c = config();
  const int64_t hidden = c.hidden_size;
  const int64_t k = c.num_experts_per_tok;
  ComputeBackend& b = *backend_;
  std::vector<int32_t>& ids = gate_ids_;
  std::vector<float>& weights = gate_weights_;
  ids.resize(static_cast<size_t>(tokens * k));
  weights.resize(static_cast<size_t>(tokens * k));
  EPIC_RETURN_IF_ERROR(Timed(Phase::kGate, [&] { return b.Gate(layer, x, tokens, ids.data(), weights.data()); }));
  const parallel::DispatchPlan plan =
      parallel::PlanDispatch(*placement_, layer, comm_->rank(), ids.data(), weights.data(), tokens, k, first_token);
  const int64_t slots = static_cast<int64_t>(placement_->slots(layer, comm_->rank()).size());
  const parallel::MoeHandle* handle = nullptr;
  EPIC_RETURN_IF_ERROR(Timed(Phase::kExchange, [&]() -> Status {
    EPIC_ASSIGN_OR_RETURN(handle, exchange_->Dispatch(plan, x, hidden));
    return OkStatus();
  }));
  EPIC_ASSIGN_OR_RETURN(float* out, b.Activations(kExpertOut, std::max<int64_t>(handle->received, 1) * hidden));
  EPIC_RETURN_IF_ERROR(
      Timed(Phase::kExperts, [&] { return b.Experts(layer, handle->rows, handle->received, handle->layout, out); }));
  parallel::ExchangeStats combine;
  EPIC_RETURN_IF_ERROR(
      Timed(Phase::kExchange, [&] { return exchange_->Combine(*handle, out, hidden, residual, &combine); }));
  exchange_stats_.Add(handle->stats);
  exchange_stats_.Add(combine);
  if (counts != nullptr) {
    const std::vector<int32_t>& offsets = handle->layout.offsets;
    std::vector<int64_t> slot_rows(static_cast<size_t>(slots));
    for (int64_t s = 0; s < slots; ++s) slot_rows[s] = offsets[s + 1] - offsets[s];
    AddExchangeCounts(*placement_, layer, c.n_routed_experts, plan, slot_rows, handle->stats, combine, counts);
  }
  return OkStatus();
}

Status Model::ReduceExpertCounts(ExpertCounts* counts) {
  const int ranks = comm_->size();
  if (ranks == 1) return OkStatus();
  for (auto& layer : counts->tokens) {
    if (layer.empty()) continue;
    // Gather every rank's int64 counts and add them here: exact at any size.
    const int64_t bytes = static_cast<int64_t>(layer.size() * sizeof(int64_t));
    std::vector<int64_t> all(layer.size() * static_cast<size_t>(ranks));
    EPIC_RETURN_IF_ERROR(comm_->AllGather(layer.data(), all.data(), std::vector<int64_t>(ranks, bytes)));
    std::fill(layer.begin(), layer.end(), 0);
    for (int r = 0; r < ranks; ++r) {
      for (size_t e = 0; e < layer.size(); ++e) layer[e] += all[r * layer.size() + e];
    }
  }
  return OkStatus();
}

std::string PrecisionNote(const Model& model, cpu::Precision asked) {
  std::string note = cpu::PrecisionName(model.precision());
  if (model.precision() != asked) note += " (this processor has no AVX2 for fast)";
  return note;
}

}  // namespace epic
