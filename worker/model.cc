#include "worker/model.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>

#include "kernels/cpu/matmul.h"
#include "kernels/cpu/mla_attention.h"
#include "kernels/cpu/ops.h"
#include "parallel/self_communicator.h"

#include "worker/device_step.h"

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

const parallel::ExchangeStats& Model::exchange_stats() const {
  if (device_step_) return device_step_->exchange_stats();
  return exchange_stats_;
}

StatusOr<PlacementChange> Model::ApplyPlacement(const parallel::ExpertPlacement& next) {
  const ModelConfig& c = config();
  EPIC_RETURN_IF_ERROR(CheckPlacement(c, comm_->size(), next));
  const int rank = comm_->rank();
  PlacementChange change;
  const size_t layers = static_cast<size_t>(c.num_hidden_layers);
  std::vector<std::vector<MlpWeights>> experts(layers);
  std::vector<std::vector<std::shared_ptr<WeightArena>>> memory(layers);
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
      EPIC_ASSIGN_OR_RETURN(BoundExpert bound, BindExpert(*checkpoint_, static_cast<int64_t>(l), e, residency_));
      kept[l].push_back(-1);
      experts[l].push_back(bound.weights);
      memory[l].push_back(std::move(bound.memory));
      ++change.experts_loaded;
      change.bytes_loaded += bound.bytes;
    }
  }
  // The device's copies first: the last step that can fail.
  if (device_step_) EPIC_RETURN_IF_ERROR(device_step_->ChangeExperts(next, kept, experts));
  for (size_t l = 0; l < layers; ++l) {
    if (!next.is_moe_layer(static_cast<int64_t>(l))) continue;
    LayerWeights& L = weights_->layers[l];
    const auto& kept_experts = next.slots(static_cast<int64_t>(l), rank);
    const auto& held = placement_->slots(static_cast<int64_t>(l), rank);
    for (size_t s = 0; s < held.size(); ++s) {
      if (std::find(kept_experts.begin(), kept_experts.end(), held[s]) != kept_experts.end()) continue;
      ++change.experts_dropped;
      const MlpWeights& w = L.experts[s];
      change.bytes_dropped += (w.gate.rows * w.gate.cols + w.up.rows * w.up.cols + w.down.rows * w.down.cols) *
                              (w.gate.type == cpu::WeightType::kBF16 ? 2 : 4);
      // Experts loaded later free their own memory below; those of the shared arena
      // give their pages back here.
      const bool own = s < L.expert_memory.size() && L.expert_memory[s] != nullptr;
      if (!own && residency_ == WeightResidency::kCopy) ReleaseExpertPages(w);
    }
    L.experts = std::move(experts[l]);
    L.expert_memory = std::move(memory[l]);
  }
  placement_ = std::make_unique<parallel::ExpertPlacement>(next);
  if (device_step_) device_step_->set_placement(placement_.get());
  weights_->matrix_bytes += change.bytes_loaded - change.bytes_dropped;
  return change;
}

StatusOr<std::unique_ptr<Model>> Model::Load(const std::filesystem::path& dir,
                                             const ProgressFn& progress, WeightResidency residency,
                                             const ModelShard& shard, ComputeDevice device) {
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
  model->device_ = device;
  EPIC_ASSIGN_OR_RETURN(model->checkpoint_, Checkpoint::Open(dir));
  const ModelConfig& config = model->config();
  const int64_t shared_inter = config.moe_intermediate_size * config.n_shared_experts;
  if (config.intermediate_size < ranks || (shared_inter > 0 && shared_inter < ranks)) {
    return InvalidArgumentError("cannot split the MLPs' intermediate dimension (" +
                                std::to_string(config.intermediate_size) + ", shared experts " +
                                std::to_string(shared_inter) + ") over " + std::to_string(ranks) + " ranks");
  }
  if (config.num_attention_heads < ranks || config.vocab_size < ranks) {
    return InvalidArgumentError(
        "cannot split " + std::to_string(config.num_attention_heads) + " attention heads and a vocabulary of " +
        std::to_string(config.vocab_size) + " over " + std::to_string(ranks) +
        " ranks: run at most " + std::to_string(std::min(config.num_attention_heads, config.vocab_size)) +
        " ranks (uneven splits are fine)");
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
  model->head_begin_ = config.num_attention_heads * rank / ranks;
  model->head_end_ = config.num_attention_heads * (rank + 1) / ranks;
  model->vocab_begin_ = config.vocab_size * rank / ranks;
  model->vocab_end_ = config.vocab_size * (rank + 1) / ranks;
  WeightShard ws;
  ws.head_begin = model->head_begin_;
  ws.head_end = model->head_end_;
  ws.vocab_begin = model->vocab_begin_;
  ws.vocab_end = model->vocab_end_;
  ws.mlp_part = rank;
  ws.mlp_parts = ranks;
  for (int64_t l = 0; l < config.num_hidden_layers; ++l) ws.expert_slots.push_back(model->placement_->slots(l, rank));
  // The CUDA step copies the weights to the GPU from the file's pages: no host copy.
  const WeightResidency host = device == ComputeDevice::kCuda ? WeightResidency::kMapped : residency;
  EPIC_ASSIGN_OR_RETURN(model->weights_,
                        ModelWeights::Bind(*model->checkpoint_, device == ComputeDevice::kCuda ? ProgressFn{} : progress,
                                           host, ws));
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
  if (device != ComputeDevice::kCpu) {
    DeviceShard cs;
    cs.comm = ranks > 1 ? shard.device_comm : nullptr;
    cs.placement = model->placement_.get();
    cs.head_begin = model->head_begin_;
    cs.head_end = model->head_end_;
    cs.vocab_begin = model->vocab_begin_;
    cs.vocab_end = model->vocab_end_;
    EPIC_ASSIGN_OR_RETURN(model->device_step_, MakeDeviceStep(device, c, *model->weights_, ws.expert_slots,
                                                              model->rope_, g, cs, progress));
  }
  return model;
}

float* Model::Sized(std::vector<float>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(static_cast<size_t>(n));
  return v.data();
}

std::unique_ptr<LatentCache> Model::MakeCache(int64_t block_size, int64_t num_blocks) const {
  return std::make_unique<LatentCache>(config().num_hidden_layers, config().latent_dim(), block_size,
                                       num_blocks, /*host_rows=*/device_step_ == nullptr);
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

bool AllFinite(const float* v, int64_t n) {
  bool finite = true;
  for (int64_t i = 0; i < n; ++i) finite &= std::isfinite(v[i]);
  return finite;
}

std::string StepName(std::span<const SequenceStep> batch) {
  int64_t tokens = 0;
  for (const SequenceStep& s : batch) tokens += static_cast<int64_t>(s.tokens.size());
  return "the step of " + std::to_string(batch.size()) + " sequence(s), " + std::to_string(tokens) +
         " token(s), the first at position " + std::to_string(batch.empty() ? 0 : batch[0].cache->num_tokens);
}

}  // namespace

Status Model::Forward(std::span<SequenceStep> batch, LatentCache* cache, std::vector<float>* logits,
                      ExpertCounts* counts) {
  EPIC_RETURN_IF_ERROR(Step(batch, cache, logits, counts, /*check_layers=*/false));
  if (AllFinite(logits->data(), static_cast<int64_t>(logits->size()))) return OkStatus();
  // Only now look for the layer: the same step again, checked after every layer. It
  // writes the same cache rows; every rank sees the same logits, so all run it.
  for (SequenceStep& s : batch) s.cache->num_tokens -= static_cast<int64_t>(s.tokens.size());
  const std::string step = StepName(batch);
  if (device_step_) {
    return InternalError(step + " gave non-finite logits (NaN or Inf): the checkpoint's weights or config "
                         "are broken (run it with --device cpu to find the layer)");
  }
  // The checked run always ends in an error: at a layer, or at the final norm and lm_head.
  return InternalError(step + ": " + Step(batch, cache, logits, nullptr, /*check_layers=*/true).message());
}

Status Model::Step(std::span<SequenceStep> batch, LatentCache* cache, std::vector<float>* logits,
                   ExpertCounts* counts, bool check_layers) {
  const ModelConfig& c = config();
  const ModelWeights& w = *weights_;
  const int64_t hidden = c.hidden_size;
  EPIC_ASSIGN_OR_RETURN(StepTokens step, FlattenStep(batch, *cache, c.vocab_size));
  if (counts != nullptr && counts->tokens.size() != static_cast<size_t>(c.num_hidden_layers)) {
    const size_t layers = static_cast<size_t>(c.num_hidden_layers);
    counts->tokens.assign(layers, {});
    counts->slot_tokens.assign(layers, {});
    counts->dispatch.assign(layers, {});
    counts->combine.assign(layers, {});
  }
  if (device_step_) return device_step_->Forward(batch, step, cache, logits, counts, attention_form_);
  const std::vector<int64_t>& positions = step.positions;
  const std::vector<int32_t>& token_ids = step.ids;
  const std::vector<int64_t>& logit_rows = step.logit_rows;
  const int64_t tokens = static_cast<int64_t>(positions.size());
  parallel::Communicator& comm = *comm_;
  const int rank = comm.rank();
  const int ranks = comm.size();
  // Attention runs on every token for this rank's heads; the rest of the layer runs on
  // this rank's block of tokens [first, first + local).
  const TokenBlocks blocks = SplitTokens(tokens, hidden, rank, ranks);
  const int64_t first = blocks.first;
  const int64_t local = blocks.local;
  const std::vector<int64_t>& block_values = blocks.values;
  const std::vector<int64_t>& block_bytes = blocks.bytes;

  float* x = Sized(ws_.x, tokens * hidden);            // [tokens, hidden] residual, all tokens
  float* normed = Sized(ws_.normed, tokens * hidden);  // [tokens, hidden]
  float* attn = Sized(ws_.attn, tokens * (head_end_ - head_begin_) * c.v_head_dim);
  float* partial = Sized(ws_.partial, tokens * hidden);     // this rank's heads' share of o_proj
  float* mine = Sized(ws_.local, std::max<int64_t>(local, 1) * hidden);  // [local, hidden]
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t i = 0; i < hidden; ++i) x[t * hidden + i] = w.embed.At(token_ids[t], i);
  }

  const float eps = static_cast<float>(c.rms_norm_eps);
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const LayerWeights& L = w.layers[l];
    cpu::RmsNorm(x, tokens, hidden, hidden, L.input_norm.data(), eps, normed, hidden);
    Attention(l, batch, cache, positions, normed, attn);
    // Row-parallel o_proj: sum the heads' shares, each rank keeping its tokens.
    cpu::MatMul(attn, tokens, L.o_proj.cols, L.o_proj, partial, hidden);
    EPIC_RETURN_IF_ERROR(comm.ReduceScatterSum(partial, mine, block_values));
    for (int64_t i = 0; i < local * hidden; ++i) mine[i] += x[first * hidden + i];

    cpu::RmsNorm(mine, local, hidden, hidden, L.post_attention_norm.data(), eps, normed, hidden);
    if (L.moe) EPIC_RETURN_IF_ERROR(MoeBlock(l, normed, local, first, mine, counts));
    // The dense MLP, or the shared experts, split by their intermediate dimension: every
    // rank runs its part on all tokens, and the parts are summed into the token blocks.
    const MlpWeights* split = L.moe ? (L.has_shared ? &L.shared : nullptr) : &L.dense;
    if (split != nullptr) {
      float* all = Sized(ws_.normed_all, tokens * hidden);
      EPIC_RETURN_IF_ERROR(comm.AllGather(normed, all, block_bytes));
      std::fill(partial, partial + tokens * hidden, 0.0f);
      Mlp(*split, all, tokens, partial, nullptr, nullptr);
      float* summed = Sized(ws_.summed, std::max<int64_t>(local, 1) * hidden);
      EPIC_RETURN_IF_ERROR(comm.ReduceScatterSum(partial, summed, block_values));
      for (int64_t i = 0; i < local * hidden; ++i) mine[i] += summed[i];
    }
    EPIC_RETURN_IF_ERROR(comm.AllGather(mine, x, block_bytes));
    if (check_layers && !AllFinite(x, tokens * hidden)) {
      return InternalError("non-finite activations (NaN or Inf) first appear in layer " + std::to_string(l) +
                           (L.moe ? " (MoE)" : " (dense)") + ": the checkpoint's weights or config are broken there");
    }
  }
  if (check_layers) {
    // Finite through the layers: the final norm or lm_head is where it breaks.
    return InternalError("non-finite values (NaN or Inf) first appear in the final norm or lm_head");
  }
  for (SequenceStep& s : batch) s.cache->num_tokens += static_cast<int64_t>(s.tokens.size());

  // Final norm on the rows that want logits; each rank computes its vocabulary rows.
  const int64_t rows = static_cast<int64_t>(logit_rows.size());
  for (int64_t r = 0; r < rows; ++r) {
    cpu::RmsNorm(x + logit_rows[r] * hidden, 1, hidden, hidden, w.final_norm.data(), eps,
                 normed + r * hidden, hidden);
  }
  logits->resize(static_cast<size_t>(rows * c.vocab_size));
  if (ranks == 1) {
    cpu::MatMul(normed, rows, hidden, w.lm_head, logits->data(), c.vocab_size);
    return OkStatus();
  }
  const int64_t my_vocab = vocab_end_ - vocab_begin_;
  float* slice = Sized(ws_.logits, rows * my_vocab);  // [rows, my_vocab]
  cpu::MatMul(normed, rows, hidden, w.lm_head, slice, my_vocab);
  // Gather the slices ([rows, vocab of rank r] from each rank r), then interleave.
  std::vector<float> gathered(static_cast<size_t>(rows * c.vocab_size));
  EPIC_RETURN_IF_ERROR(comm.AllGather(slice, gathered.data(), VocabSliceBytes(rows, c.vocab_size, ranks)));
  InterleaveVocabSlices(gathered.data(), rows, c.vocab_size, ranks, logits->data());
  return OkStatus();
}

void Model::Attention(int64_t layer, std::span<SequenceStep> batch, LatentCache* cache,
                      const std::vector<int64_t>& positions, const float* x, float* out) {
  const ModelConfig& c = config();
  const LayerWeights& L = weights_->layers[layer];
  const int64_t tokens = static_cast<int64_t>(positions.size());
  const int64_t heads = head_end_ - head_begin_;  // this rank's heads
  const int64_t nope = c.qk_nope_head_dim;
  const int64_t rope = c.qk_rope_head_dim;
  const int64_t lora = c.kv_lora_rank;
  const int64_t qhd = c.q_head_dim();
  const int64_t vdim = c.v_head_dim;
  const int64_t kv_head = nope + vdim;  // rows of kv_b_proj per head
  const float eps = static_cast<float>(c.rms_norm_eps);
  const float scale = static_cast<float>(c.SoftmaxScale());

  // Queries [tokens, heads, q_head_dim].
  float* q = Sized(ws_.q, tokens * heads * qhd);
  if (c.q_lora_rank > 0) {
    float* qa = Sized(ws_.qa, tokens * c.q_lora_rank);
    cpu::MatMul(x, tokens, c.hidden_size, L.q_a_proj, qa, c.q_lora_rank);
    cpu::RmsNorm(qa, tokens, c.q_lora_rank, c.q_lora_rank, L.q_a_norm.data(), eps, qa,
                 c.q_lora_rank);
    cpu::MatMul(qa, tokens, c.q_lora_rank, L.q_b_proj, q, heads * qhd);
  } else {
    cpu::MatMul(x, tokens, c.hidden_size, L.q_proj, q, heads * qhd);
  }
  // Latent rows [tokens, kv_lora + rope]: normalise c_kv, rotate k_pe, then cache.
  const int64_t width = c.latent_dim();
  float* latent = Sized(ws_.latent, tokens * width);
  cpu::MatMul(x, tokens, c.hidden_size, L.kv_a_proj, latent, width);
  cpu::RmsNorm(latent, tokens, lora, width, L.kv_a_norm.data(), eps, latent, width);
  for (int64_t t = 0; t < tokens; ++t) {
    cpu::ApplyRope(latent + t * width + lora, positions[t], rope_.inv_freq.data(),
                   rope / 2, rope_.mscale);
    for (int64_t h = 0; h < heads; ++h) {
      cpu::ApplyRope(q + (t * heads + h) * qhd + nope, positions[t], rope_.inv_freq.data(),
                     rope / 2, rope_.mscale);
    }
  }

  int64_t first = 0;  // the sequence's first token in the step
  for (SequenceStep& s : batch) {
    const int64_t n = static_cast<int64_t>(s.tokens.size());
    const int64_t start = s.cache->num_tokens;
    const int64_t context = start + n;
    for (int64_t i = 0; i < n; ++i) {
      std::memcpy(cache->Row(layer, *s.cache, start + i), latent + (first + i) * width,
                  static_cast<size_t>(width) * sizeof(float));
    }
    const float* qs = q + first * heads * qhd;
    float* os = out + first * heads * vdim;

    const bool expand = attention_form_ == AttentionForm::kAuto ? ExpandIsCheaper(c, heads, n, context)
                                                                : attention_form_ == AttentionForm::kExpanded;
    if (expand) {
      float* c_kv = Sized(ws_.c_kv, context * lora);
      float* k_pe = Sized(ws_.k_pe, context * rope);
      const cpu::LatentRows rows = cache->Rows(layer, *s.cache);
      for (int64_t t = 0; t < context; ++t) {
        const float* row = rows.Row(t);
        std::memcpy(c_kv + t * lora, row, static_cast<size_t>(lora) * sizeof(float));
        std::memcpy(k_pe + t * rope, row + lora, static_cast<size_t>(rope) * sizeof(float));
      }
      float* kv = Sized(ws_.kv, context * heads * kv_head);
      cpu::MatMul(c_kv, context, lora, L.kv_b_proj, kv, heads * kv_head);
      cpu::MlaExpandedParams p;
      p.num_queries = n;
      p.start = start;
      p.num_heads = heads;
      p.nope_dim = nope;
      p.rope_dim = rope;
      p.v_dim = vdim;
      p.scale = scale;
      p.q = qs;
      p.kv = kv;
      p.k_pe = k_pe;
      p.out = os;
      cpu::MlaExpandedAttention(p);
    } else {
      // q_latent[i, h] = q_nope[i, h] W_UK[h], with W_UK[h] = kv_b_proj rows [h*kv_head, +nope).
      float* q_latent = Sized(ws_.q_latent, n * heads * lora);
      float* q_pe = Sized(ws_.q_pe, n * heads * rope);
      for (int64_t h = 0; h < heads; ++h) {
        cpu::MatMulNoTrans(qs + h * qhd, n, heads * qhd, L.kv_b_proj.Rows(h * kv_head, nope),
                           q_latent + h * lora, heads * lora);
      }
      for (int64_t i = 0; i < n * heads; ++i) {
        std::memcpy(q_pe + i * rope, qs + i * qhd + nope, static_cast<size_t>(rope) * sizeof(float));
      }
      float* o_latent = Sized(ws_.o_latent, n * heads * lora);
      cpu::MlaAbsorbedParams p;
      p.num_queries = n;
      p.start = start;
      p.num_heads = heads;
      p.kv_lora_rank = lora;
      p.rope_dim = rope;
      p.scale = scale;
      p.q_latent = q_latent;
      p.q_pe = q_pe;
      p.cache = cache->Rows(layer, *s.cache);
      p.out_latent = o_latent;
      cpu::MlaAbsorbedAttention(p);
      // out[i, h] = W_UV[h] o_latent[i, h], with W_UV[h] = rows [h*kv_head + nope, +vdim).
      for (int64_t h = 0; h < heads; ++h) {
        cpu::MatMul(o_latent + h * lora, n, heads * lora, L.kv_b_proj.Rows(h * kv_head + nope, vdim),
                    os + h * vdim, heads * vdim);
      }
    }
    first += n;
  }
}

void Model::Mlp(const MlpWeights& w, const float* x, int64_t tokens, float* residual,
                const float* row_scale, const int32_t* rows) {
  const int64_t hidden = config().hidden_size;
  const int64_t inter = w.gate.rows;
  float* gate = Sized(ws_.gate, tokens * inter);
  float* up = Sized(ws_.up, tokens * inter);
  cpu::MatMul(x, tokens, hidden, w.gate, gate, inter);
  cpu::MatMul(x, tokens, hidden, w.up, up, inter);
  cpu::SiluMul(gate, up, tokens * inter, gate);
  if (rows == nullptr) {
    cpu::MatMul(gate, tokens, inter, w.down, residual, hidden, /*accumulate=*/true);
    return;
  }
  // Routed expert: scale each token's output by its gate weight, add to its row.
  float* y = Sized(ws_.y, tokens * hidden);
  cpu::MatMul(gate, tokens, inter, w.down, y, hidden);
  for (int64_t t = 0; t < tokens; ++t) {
    cpu::Axpy(row_scale[t], y + t * hidden, hidden, residual + rows[t] * hidden);
  }
}

Status Model::MoeBlock(int64_t layer, const float* x, int64_t tokens, int64_t first_token, float* residual,
                       ExpertCounts* counts) {
  const ModelConfig& c = config();
  const LayerWeights& L = weights_->layers[layer];
  const int64_t hidden = c.hidden_size;
  const int64_t experts = c.n_routed_experts;
  const int64_t k = c.num_experts_per_tok;
  parallel::Communicator& comm = *comm_;

  float* router = Sized(ws_.router, std::max<int64_t>(tokens, 1) * experts);
  std::vector<int32_t> ids(static_cast<size_t>(tokens * k));
  float* weights = Sized(ws_.weights, std::max<int64_t>(tokens, 1) * k);
  if (tokens > 0) {
    cpu::MatMul(x, tokens, hidden, L.router, router, experts);
    cpu::GateParams gate = gate_;
    gate.choice_bias = L.choice_bias.empty() ? nullptr : L.choice_bias.data();
    cpu::SelectExperts(router, tokens, gate, ids.data(), weights);
  }

  // Each token goes once to every rank holding one of its experts; the rows a rank
  // receives are grouped by its slots, so each expert's weights are read once for all
  // of its tokens.
  const parallel::DispatchPlan plan =
      parallel::PlanDispatch(*placement_, layer, comm.rank(), ids.data(), weights, tokens, k, first_token);
  parallel::ReceivedTokens& received = received_;
  parallel::ExchangeStats dispatch, combine;
  EPIC_RETURN_IF_ERROR(parallel::Dispatch(comm, plan, x, hidden, &received, &dispatch));
  const int64_t slots = static_cast<int64_t>(L.experts.size());
  const parallel::SlotBatches batches = parallel::GroupBySlot(received, k, slots);
  const int64_t rows = received.rows();
  float* out = Sized(ws_.expert_out, std::max<int64_t>(rows, 1) * hidden);
  std::fill(out, out + rows * hidden, 0.0f);
  for (int64_t s = 0; s < slots; ++s) {
    const int64_t n = batches.offsets[s + 1] - batches.offsets[s];
    if (n == 0) continue;
    float* gathered = Sized(ws_.gathered, n * hidden);
    for (int64_t i = 0; i < n; ++i) {
      std::memcpy(gathered + i * hidden, received.hidden.data() + batches.row[batches.offsets[s] + i] * hidden,
                  static_cast<size_t>(hidden) * sizeof(float));
    }
    Mlp(L.experts[s], gathered, n, out, batches.weight.data() + batches.offsets[s],
        batches.row.data() + batches.offsets[s]);
  }
  EPIC_RETURN_IF_ERROR(parallel::Combine(comm, plan, received, out, hidden, residual, &combine));
  exchange_stats_.Add(dispatch);
  exchange_stats_.Add(combine);

  if (counts != nullptr) {
    std::vector<int64_t> slot_rows(static_cast<size_t>(slots));
    for (int64_t s = 0; s < slots; ++s) slot_rows[s] = batches.offsets[s + 1] - batches.offsets[s];
    AddExchangeCounts(*placement_, layer, experts, plan, slot_rows, dispatch, combine, counts);
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

}  // namespace epic
