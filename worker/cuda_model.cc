#include "worker/cuda_model.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <string>
#include <utility>

#include "common/half.h"
#include "kernels/cuda/buffer.h"
#include "kernels/cuda/device.h"
#include "kernels/cuda/gemm.h"
#include "kernels/cuda/mla.h"
#include "kernels/cuda/moe.h"
#include "kernels/cuda/ops.h"
#include "parallel/dispatch.h"
#include "parallel/exchange_layout.h"
#include "worker/model.h"

namespace epic {
namespace {

using cuda::DeviceBuffer;
using cuda::DeviceMatrix;

struct DeviceMlp {
  DeviceMatrix gate_up;  // [2 * inter, hidden]: gate's rows, then up's
  DeviceMatrix down;     // [hidden, inter]
  int64_t inter = 0;
};

struct DeviceLayer {
  DeviceBuffer<float> input_norm, post_attention_norm, q_a_norm, kv_a_norm, choice_bias;
  DeviceMatrix q_proj, q_a_proj, q_b_proj, kv_a_proj, kv_b_proj, o_proj;
  DeviceMatrix router;  // F32: routing decides on the CPU's values, not BF16-rounded ones
  bool moe = false;
  bool has_shared = false;
  DeviceMlp dense, shared;
  std::vector<DeviceMlp> experts;  // slot order
  // Each routed expert in memory of its own, so that a rank dropping it frees it.
  std::vector<std::shared_ptr<cuda::DeviceMemory>> expert_memory;
  // For GroupedMatMul: by logical expert (one rank: routing groups by expert on the
  // device) and by slot (several ranks: received rows are grouped by slot).
  DeviceBuffer<const uint16_t*> gate_up_by_expert, down_by_expert, gate_up_by_slot, down_by_slot;
};

// One device allocation for every matrix, filled matrix by matrix: each host matrix
// (BF16 or F32, any row stride; several stacked by rows for a fused gate|up) becomes a
// contiguous device matrix of the wanted type.
class WeightUpload {
 public:
  void Add(std::vector<cpu::WeightMatrix> parts, cuda::DType type, DeviceMatrix* target) {
    int64_t rows = 0;
    for (const auto& p : parts) rows += p.rows;
    const int64_t cols = parts.empty() ? 0 : parts[0].cols;
    target->type = type;
    target->rows = rows;
    target->cols = cols;
    target->ld = cols;
    const int64_t bytes = rows * cols * (type == cuda::DType::kBF16 ? 2 : 4);
    items_.push_back({std::move(parts), target, total_});
    total_ += (bytes + 255) / 256 * 256;
  }

  // Allocates and copies, then points every target at its part of MEMORY.
  Status Run(cuda::DeviceMemory* memory, const ProgressFn& progress) {
    EPIC_ASSIGN_OR_RETURN(*memory, cuda::DeviceMemory::Allocate(static_cast<size_t>(total_)));
    std::vector<uint8_t> staging;
    for (const Item& item : items_) {
      DeviceMatrix& t = *item.target;
      const size_t row_bytes = static_cast<size_t>(t.cols * t.ElementBytes());
      int64_t row = 0;
      for (const cpu::WeightMatrix& p : item.parts) {
        const size_t offset = static_cast<size_t>(item.offset) + static_cast<size_t>(row) * row_bytes;
        const bool same = (p.type == cpu::WeightType::kBF16) == (t.type == cuda::DType::kBF16);
        if (same && p.row_stride == p.cols) {
          EPIC_RETURN_IF_ERROR(memory->CopyFromHost(p.data, static_cast<size_t>(p.rows) * row_bytes, offset));
        } else {
          staging.resize(static_cast<size_t>(p.rows) * row_bytes);
          for (int64_t r = 0; r < p.rows; ++r) {
            for (int64_t c = 0; c < p.cols; ++c) {
              const float v = p.At(r, c);
              if (t.type == cuda::DType::kBF16) {
                const uint16_t h = FloatToBf16(v);
                std::memcpy(staging.data() + (r * p.cols + c) * 2, &h, 2);
              } else {
                std::memcpy(staging.data() + (r * p.cols + c) * 4, &v, 4);
              }
            }
          }
          EPIC_RETURN_IF_ERROR(memory->CopyFromHost(staging.data(), staging.size(), offset));
        }
        row += p.rows;
        done_ += static_cast<int64_t>(p.rows * row_bytes);
        if (progress) progress(done_, total_);
      }
      t.data = static_cast<const char*>(memory->data()) + item.offset;
    }
    return OkStatus();
  }

  int64_t total_bytes() const { return total_; }

 private:
  struct Item {
    std::vector<cpu::WeightMatrix> parts;
    DeviceMatrix* target;
    int64_t offset;
  };
  std::vector<Item> items_;
  int64_t total_ = 0;
  int64_t done_ = 0;
};

// Grows B to hold at least N values (never shrinks); contents are not kept.
template <typename T>
Status Grow(DeviceBuffer<T>& b, int64_t n) {
  if (b.size() >= n) return OkStatus();
  EPIC_ASSIGN_OR_RETURN(b, DeviceBuffer<T>::Allocate(std::max<int64_t>(n, 1)));
  return OkStatus();
}

// BF16 bytes of an MLP's three matrices.
int64_t MlpBytes(const MlpWeights& w) {
  return 2 * (w.gate.rows * w.gate.cols + w.up.rows * w.up.cols + w.down.rows * w.down.cols);
}

// One routed expert copied to memory of its own.
struct DeviceExpert {
  DeviceMlp mlp;
  std::shared_ptr<cuda::DeviceMemory> memory;
  int64_t bytes = 0;
};

StatusOr<DeviceExpert> UploadExpert(const MlpWeights& w, const ProgressFn& progress) {
  DeviceExpert e;
  WeightUpload upload;
  e.mlp.inter = w.gate.rows;
  upload.Add({w.gate, w.up}, cuda::DType::kBF16, &e.mlp.gate_up);
  upload.Add({w.down}, cuda::DType::kBF16, &e.mlp.down);
  e.memory = std::make_shared<cuda::DeviceMemory>();
  EPIC_RETURN_IF_ERROR(upload.Run(e.memory.get(), progress));
  e.bytes = upload.total_bytes();
  return e;
}

// A layer's tables of expert pointers for GroupedMatMul: by slot (several ranks group
// received rows by slot), and by logical expert (one rank routes on the device, and
// then holds every expert once).
struct ExpertTables {
  DeviceBuffer<const uint16_t*> gate_up_by_slot, down_by_slot, gate_up_by_expert, down_by_expert;
};

StatusOr<ExpertTables> MakeExpertTables(const std::vector<DeviceMlp>& experts, const std::vector<int32_t>& slots,
                                        bool by_expert, int64_t num_experts, int64_t layer) {
  ExpertTables t;
  std::vector<const uint16_t*> gate_up, down;
  for (const DeviceMlp& e : experts) {
    gate_up.push_back(static_cast<const uint16_t*>(e.gate_up.data));
    down.push_back(static_cast<const uint16_t*>(e.down.data));
  }
  EPIC_ASSIGN_OR_RETURN(t.gate_up_by_slot, DeviceBuffer<const uint16_t*>::FromHost(gate_up));
  EPIC_ASSIGN_OR_RETURN(t.down_by_slot, DeviceBuffer<const uint16_t*>::FromHost(down));
  if (!by_expert) return t;
  std::vector<const uint16_t*> gate_up_e(static_cast<size_t>(num_experts), nullptr);
  std::vector<const uint16_t*> down_e(static_cast<size_t>(num_experts), nullptr);
  for (size_t s = 0; s < slots.size() && s < experts.size(); ++s) {
    gate_up_e.at(static_cast<size_t>(slots[s])) = gate_up[s];
    down_e.at(static_cast<size_t>(slots[s])) = down[s];
  }
  for (int64_t e = 0; e < num_experts; ++e) {
    if (gate_up_e[e] == nullptr) {
      return FailedPreconditionError("CUDA step: layer " + std::to_string(layer) + " does not hold expert " +
                                     std::to_string(e) + "; a one-rank job must hold every expert");
    }
  }
  EPIC_ASSIGN_OR_RETURN(t.gate_up_by_expert, DeviceBuffer<const uint16_t*>::FromHost(gate_up_e));
  EPIC_ASSIGN_OR_RETURN(t.down_by_expert, DeviceBuffer<const uint16_t*>::FromHost(down_e));
  return t;
}

void Install(ExpertTables t, DeviceLayer* d) {
  d->gate_up_by_slot = std::move(t.gate_up_by_slot);
  d->down_by_slot = std::move(t.down_by_slot);
  d->gate_up_by_expert = std::move(t.gate_up_by_expert);
  d->down_by_expert = std::move(t.down_by_expert);
}

}  // namespace

struct CudaForward::Impl {
  ModelConfig config;
  cpu::GateParams gate;
  cuda::DeviceMemory weight_memory;
  int64_t weight_bytes = 0;
  DeviceMatrix embed, lm_head;
  DeviceBuffer<float> final_norm;
  std::vector<DeviceLayer> layers;
  std::vector<std::vector<int32_t>> expert_slots;  // [layer][slot]: its logical expert
  CudaShard shard;
  int rank = 0, ranks = 1;
  int64_t heads = 0;  // this rank's
  int64_t vocab = 0;  // this rank's rows of lm_head
  cuda::RopeFrequencies rope_freq;
  std::unique_ptr<cuda::Blas> blas;
  int sm_count = 1;
  int64_t block_size = 0;  // of the cache of the current step
  parallel::ExchangeStats exchange_totals;  // all MoE exchanges since load

  // Per-step buffers, grown to the largest step seen.
  struct Workspace {
    DeviceBuffer<int32_t> token_ids, context, table_start, block_tables, logit_rows, expert_ids, counts;
    DeviceBuffer<int32_t> ex_offsets, ex_source, ex_grouped, ex_scratch, tiles;
    DeviceBuffer<int64_t> positions, slots;
    DeviceBuffer<float> x, normed, qa, q, latent, q_latent, o_latent, attn, gate_up, mid, router, gate_weights,
        ex_weight, expert_out, mla, selected, logits;
    DeviceBuffer<uint16_t> xb, wide_b, mid_b, rows_b;
    // The expanded form: one sequence's rows, keys and values, one chunk's scores.
    DeviceBuffer<uint16_t> latent_rows, kv_b, probs;
    DeviceBuffer<float> kv, scores;
    // Several ranks: this rank's token block, and the MoE exchange.
    DeviceBuffer<float> partial, mine, normed_all, summed, received, out_rows, back, ones, gathered;
    DeviceBuffer<int32_t> layout_offsets, layout_source, layout_grouped, token_source;
    DeviceBuffer<float> layout_weight;
    DeviceBuffer<parallel::RouteEntry> route_send, route_recv;
  } ws;

  Status Mlp(const DeviceMlp& m, const uint16_t* xb, int64_t tokens, float* y);
  // A sequence of the step, for the expanded form.
  struct Span {
    int64_t first = 0;        // its first token in the step
    int64_t n = 0;            // its new tokens
    int64_t start = 0;        // rows cached before the step
    int64_t table_start = 0;  // where its block ids start in ws.block_tables
  };
  Status Attention(int64_t layer, int64_t tokens, int64_t max_context, uint16_t* pool, bool expanded,
                   const std::vector<Span>& spans);
  Status ExpandedAttention(const DeviceLayer& L, const uint16_t* pool, const std::vector<Span>& spans);
  Status GroupedExperts(const float* x, const int32_t* source, const int32_t* count, int64_t max_rows,
                        const int32_t* offsets, const DeviceBuffer<const uint16_t*>& gate_up,
                        const DeviceBuffer<const uint16_t*>& down);
  Status Gate(const DeviceLayer& L, int64_t tokens);
  Status Moe(int64_t layer, int64_t tokens, int32_t* counts);
  Status MoeExchange(int64_t layer, int64_t tokens, int64_t first_token, float* y, ExpertCounts* counts);
};

CudaForward::CudaForward(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
CudaForward::~CudaForward() = default;

int64_t CudaForward::weight_bytes() const { return impl_->weight_bytes; }
const parallel::ExchangeStats& CudaForward::exchange_stats() const { return impl_->exchange_totals; }

StatusOr<std::unique_ptr<CudaForward>> CudaForward::Create(const ModelConfig& c, const ModelWeights& w,
                                                           const std::vector<std::vector<int32_t>>& expert_slots,
                                                           const RopeTable& rope, const cpu::GateParams& gate,
                                                           const CudaShard& shard, const ProgressFn& progress) {
  auto impl = std::make_unique<Impl>();
  impl->config = c;
  impl->gate = gate;
  impl->expert_slots = expert_slots;
  impl->shard = shard;
  impl->rank = shard.comm != nullptr ? shard.comm->rank() : 0;
  impl->ranks = shard.comm != nullptr ? shard.comm->size() : 1;
  impl->heads = shard.head_end - shard.head_begin;
  impl->vocab = shard.vocab_end - shard.vocab_begin;
  if (impl->ranks > 1 && shard.placement == nullptr) {
    return InvalidArgumentError("CUDA step of several ranks without an expert placement");
  }
  EPIC_ASSIGN_OR_RETURN(impl->sm_count, cuda::MultiprocessorCount());
  EPIC_ASSIGN_OR_RETURN(impl->blas, cuda::Blas::Create());
  EPIC_ASSIGN_OR_RETURN(impl->rope_freq, cuda::RopeFrequencies::FromHost(rope.inv_freq, rope.mscale));
  EPIC_ASSIGN_OR_RETURN(impl->final_norm, DeviceBuffer<float>::FromHost(w.final_norm));

  WeightUpload upload;
  upload.Add({w.embed}, cuda::DType::kBF16, &impl->embed);
  // Tied embeddings: lm_head is embed's rows, so the device holds them once.
  const bool tied = w.lm_head.data == w.embed.data && w.lm_head.rows == w.embed.rows;
  if (!tied) upload.Add({w.lm_head}, cuda::DType::kBF16, &impl->lm_head);
  impl->layers.resize(w.layers.size());
  auto add_mlp = [&](const MlpWeights& m, DeviceMlp* d) {
    d->inter = m.gate.rows;
    upload.Add({m.gate, m.up}, cuda::DType::kBF16, &d->gate_up);
    upload.Add({m.down}, cuda::DType::kBF16, &d->down);
  };
  for (size_t l = 0; l < w.layers.size(); ++l) {
    const LayerWeights& L = w.layers[l];
    DeviceLayer& D = impl->layers[l];
    EPIC_ASSIGN_OR_RETURN(D.input_norm, DeviceBuffer<float>::FromHost(L.input_norm));
    EPIC_ASSIGN_OR_RETURN(D.post_attention_norm, DeviceBuffer<float>::FromHost(L.post_attention_norm));
    EPIC_ASSIGN_OR_RETURN(D.kv_a_norm, DeviceBuffer<float>::FromHost(L.kv_a_norm));
    if (c.q_lora_rank > 0) {
      EPIC_ASSIGN_OR_RETURN(D.q_a_norm, DeviceBuffer<float>::FromHost(L.q_a_norm));
      upload.Add({L.q_a_proj}, cuda::DType::kBF16, &D.q_a_proj);
      upload.Add({L.q_b_proj}, cuda::DType::kBF16, &D.q_b_proj);
    } else {
      upload.Add({L.q_proj}, cuda::DType::kBF16, &D.q_proj);
    }
    upload.Add({L.kv_a_proj}, cuda::DType::kBF16, &D.kv_a_proj);
    upload.Add({L.kv_b_proj}, cuda::DType::kBF16, &D.kv_b_proj);
    upload.Add({L.o_proj}, cuda::DType::kBF16, &D.o_proj);
    D.moe = L.moe;
    D.has_shared = L.has_shared;
    if (!L.moe) {
      add_mlp(L.dense, &D.dense);
      continue;
    }
    upload.Add({L.router}, cuda::DType::kF32, &D.router);
    if (!L.choice_bias.empty()) {
      EPIC_ASSIGN_OR_RETURN(D.choice_bias, DeviceBuffer<float>::FromHost(L.choice_bias));
    }
    if (L.has_shared) add_mlp(L.shared, &D.shared);
  }
  // Progress over everything: the shared allocation, then expert by expert.
  int64_t total = upload.total_bytes(), done = 0;
  for (const LayerWeights& L : w.layers) {
    for (const MlpWeights& e : L.experts) total += MlpBytes(e);
  }
  auto report = [&](int64_t d, int64_t) {
    if (progress) progress(std::min(done + d, total), total);
  };
  EPIC_RETURN_IF_ERROR(upload.Run(&impl->weight_memory, report));
  if (tied) impl->lm_head = impl->embed;
  impl->weight_bytes = upload.total_bytes();
  done = upload.total_bytes();
  for (size_t l = 0; l < w.layers.size(); ++l) {
    DeviceLayer& D = impl->layers[l];
    for (const MlpWeights& e : w.layers[l].experts) {
      EPIC_ASSIGN_OR_RETURN(DeviceExpert d, UploadExpert(e, report));
      D.experts.push_back(d.mlp);
      D.expert_memory.push_back(std::move(d.memory));
      impl->weight_bytes += d.bytes;
      done += MlpBytes(e);
    }
  }

  for (size_t l = 0; l < w.layers.size(); ++l) {
    DeviceLayer& D = impl->layers[l];
    if (!D.moe) continue;
    EPIC_ASSIGN_OR_RETURN(ExpertTables tables, MakeExpertTables(D.experts, expert_slots.at(l), impl->ranks == 1,
                                                                c.n_routed_experts, static_cast<int64_t>(l)));
    Install(std::move(tables), &D);
  }
  return std::unique_ptr<CudaForward>(new CudaForward(std::move(impl)));
}

Status CudaForward::ChangeExperts(const parallel::ExpertPlacement& next, const std::vector<std::vector<int>>& kept,
                                 const std::vector<std::vector<MlpWeights>>& weights) {
  Impl& m = *impl_;
  struct Pending {
    std::vector<DeviceMlp> experts;
    std::vector<std::shared_ptr<cuda::DeviceMemory>> memory;
    ExpertTables tables;
    int64_t added = 0;
  };
  std::vector<Pending> pending(m.layers.size());
  for (size_t l = 0; l < m.layers.size(); ++l) {
    if (!next.is_moe_layer(static_cast<int64_t>(l))) continue;
    const DeviceLayer& D = m.layers[l];
    Pending& p = pending[l];
    const std::vector<int32_t>& slots = next.slots(static_cast<int64_t>(l), m.rank);
    for (size_t j = 0; j < slots.size(); ++j) {
      const int old = kept.at(l).at(j);
      if (old >= 0) {
        p.experts.push_back(D.experts.at(static_cast<size_t>(old)));
        p.memory.push_back(D.expert_memory.at(static_cast<size_t>(old)));
        continue;
      }
      EPIC_ASSIGN_OR_RETURN(DeviceExpert e, UploadExpert(weights.at(l).at(j), {}));
      p.experts.push_back(e.mlp);
      p.memory.push_back(std::move(e.memory));
      p.added += e.bytes;
    }
    EPIC_ASSIGN_OR_RETURN(p.tables, MakeExpertTables(p.experts, slots, m.ranks == 1, m.config.n_routed_experts,
                                                     static_cast<int64_t>(l)));
  }
  EPIC_RETURN_IF_ERROR(cuda::Synchronize());  // no kernel still reads what is freed below
  for (size_t l = 0; l < m.layers.size(); ++l) {
    if (!next.is_moe_layer(static_cast<int64_t>(l))) continue;
    DeviceLayer& D = m.layers[l];
    Pending& p = pending[l];
    for (size_t s = 0; s < D.expert_memory.size(); ++s) {
      const bool stays = std::find(kept[l].begin(), kept[l].end(), static_cast<int>(s)) != kept[l].end();
      if (!stays && D.expert_memory[s]) m.weight_bytes -= static_cast<int64_t>(D.expert_memory[s]->bytes());
    }
    m.weight_bytes += p.added;
    D.experts = std::move(p.experts);
    D.expert_memory = std::move(p.memory);
    Install(std::move(p.tables), &D);
    m.expert_slots[l] = next.slots(static_cast<int64_t>(l), m.rank);
  }
  return OkStatus();
}

void CudaForward::set_placement(const parallel::ExpertPlacement* placement) { impl_->shard.placement = placement; }

// y += down(silu(gate(xb)) * up(xb)) for TOKENS rows.
Status CudaForward::Impl::Mlp(const DeviceMlp& m, const uint16_t* xb, int64_t tokens, float* y) {
  const int64_t hidden = config.hidden_size;
  EPIC_RETURN_IF_ERROR(cuda::MatMul(*blas, xb, tokens, hidden, m.gate_up, ws.gate_up.data(), 2 * m.inter));
  EPIC_RETURN_IF_ERROR(cuda::SiluMul(ws.gate_up.data(), ws.gate_up.data() + m.inter, tokens, m.inter, 2 * m.inter,
                                     ws.mid.data(), m.inter));
  EPIC_RETURN_IF_ERROR(cuda::ToBf16(ws.mid.data(), tokens, m.inter, m.inter, ws.mid_b.data(), m.inter));
  return cuda::MatMul(*blas, ws.mid_b.data(), tokens, m.inter, m.down, y, hidden, /*accumulate=*/true);
}

// ws.attn = this layer's attention over ws.normed (and its BF16 copy ws.xb), the
// new latent rows written to POOL first.
Status CudaForward::Impl::Attention(int64_t layer, int64_t tokens, int64_t max_context, uint16_t* pool,
                                    bool expanded, const std::vector<Span>& spans) {
  const ModelConfig& c = config;
  const DeviceLayer& L = layers[layer];
  const int64_t hidden = c.hidden_size;
  const int64_t heads = this->heads;  // this rank's
  const int64_t nope = c.qk_nope_head_dim, rope = c.qk_rope_head_dim, lora = c.kv_lora_rank;
  const int64_t qhd = c.q_head_dim(), vdim = c.v_head_dim, width = c.latent_dim();
  const float eps = static_cast<float>(c.rms_norm_eps);

  float* q = ws.q.data();  // [tokens, heads * qhd]
  if (c.q_lora_rank > 0) {
    const int64_t r = c.q_lora_rank;
    EPIC_RETURN_IF_ERROR(cuda::MatMul(*blas, ws.xb.data(), tokens, hidden, L.q_a_proj, ws.qa.data(), r));
    EPIC_RETURN_IF_ERROR(cuda::RmsNorm(ws.qa.data(), tokens, r, r, L.q_a_norm.data(), eps, ws.qa.data(), r));
    EPIC_RETURN_IF_ERROR(cuda::ToBf16(ws.qa.data(), tokens, r, r, ws.wide_b.data(), r));
    EPIC_RETURN_IF_ERROR(cuda::MatMul(*blas, ws.wide_b.data(), tokens, r, L.q_b_proj, q, heads * qhd));
  } else {
    EPIC_RETURN_IF_ERROR(cuda::MatMul(*blas, ws.xb.data(), tokens, hidden, L.q_proj, q, heads * qhd));
  }
  float* latent = ws.latent.data();  // [tokens, width]: c_kv normalised, k_pe rotated
  EPIC_RETURN_IF_ERROR(cuda::MatMul(*blas, ws.xb.data(), tokens, hidden, L.kv_a_proj, latent, width));
  EPIC_RETURN_IF_ERROR(cuda::RmsNorm(latent, tokens, lora, width, L.kv_a_norm.data(), eps, latent, width));
  EPIC_RETURN_IF_ERROR(cuda::ApplyRope({latent, tokens, width, lora, 1, 0}, ws.positions.data(), rope_freq));
  EPIC_RETURN_IF_ERROR(
      cuda::ApplyRope({q, tokens, heads * qhd, nope, heads, qhd}, ws.positions.data(), rope_freq));
  EPIC_RETURN_IF_ERROR(cuda::WriteLatentRows(latent, tokens, width, width, ws.slots.data(), pool));

  EPIC_RETURN_IF_ERROR(cuda::ToBf16(q, tokens, heads * qhd, heads * qhd, ws.wide_b.data(), heads * qhd));
  if (expanded) return ExpandedAttention(L, pool, spans);

  // q_latent[t, h] = q_nope[t, h] W_UK[h] (gemm.h: MlaHeads).
  const cuda::MlaHeads mla{L.kv_b_proj, heads, nope, vdim};
  EPIC_RETURN_IF_ERROR(
      cuda::FoldQuery(*blas, mla, ws.wide_b.data(), tokens, heads * qhd, qhd, ws.q_latent.data(), heads * lora));

  cuda::MlaAttentionParams p;
  p.tokens = tokens;
  p.num_heads = heads;
  p.kv_lora_rank = lora;
  p.rope_dim = rope;
  p.scale = static_cast<float>(c.SoftmaxScale());
  p.q_latent = ws.q_latent.data();
  p.q_pe = q + nope;
  p.q_pe_token_stride = heads * qhd;
  p.q_pe_head_stride = qhd;
  p.cache = {pool, block_size, ws.block_tables.data()};
  p.table_start = ws.table_start.data();
  p.context = ws.context.data();
  p.max_context = max_context;
  p.out_latent = ws.o_latent.data();
  const cuda::MlaSplits splits = cuda::PlanMlaSplits(tokens, heads, max_context, sm_count);
  const int64_t scratch = cuda::MlaWorkspaceFloats(tokens, heads, lora, splits);
  EPIC_RETURN_IF_ERROR(Grow(ws.mla, scratch));
  EPIC_RETURN_IF_ERROR(cuda::MlaAbsorbedAttention(p, splits, ws.mla.data(), ws.mla.size()));

  // attn[t, h] = W_UV[h] o_latent[t, h].
  EPIC_RETURN_IF_ERROR(
      cuda::ToBf16(ws.o_latent.data(), tokens, heads * lora, heads * lora, ws.wide_b.data(), heads * lora));
  return cuda::UnfoldLatent(*blas, mla, ws.wide_b.data(), tokens, heads * lora, ws.attn.data(), heads * vdim);
}

// The expanded form, sequence by sequence: its cached rows (the new ones written) up-
// projected through kv_b_proj into per-head keys and values, then causal attention per
// head as cuBLAS products around CausalSoftmax, over chunks of queries that bound the
// score matrix. Reads ws.wide_b (q in BF16); writes ws.attn.
Status CudaForward::Impl::ExpandedAttention(const DeviceLayer& L, const uint16_t* pool,
                                            const std::vector<Span>& spans) {
  const ModelConfig& c = config;
  const int64_t nope = c.qk_nope_head_dim, rope = c.qk_rope_head_dim, lora = c.kv_lora_rank;
  const int64_t qhd = c.q_head_dim(), vdim = c.v_head_dim, width = c.latent_dim();
  const int64_t kv_head = nope + vdim;
  const int64_t ldq = heads * qhd;
  const float scale = static_cast<float>(c.SoftmaxScale());
  constexpr int64_t kScoreBudget = int64_t{64} << 20;  // score values at a time (256 MiB of F32)
  for (const Span& sp : spans) {
    const int64_t context = sp.start + sp.n;
    EPIC_RETURN_IF_ERROR(Grow(ws.latent_rows, context * width));
    EPIC_RETURN_IF_ERROR(Grow(ws.kv, context * heads * kv_head));
    EPIC_RETURN_IF_ERROR(Grow(ws.kv_b, context * heads * kv_head));
    EPIC_RETURN_IF_ERROR(cuda::GatherLatentRows(pool, block_size, ws.block_tables.data() + sp.table_start, context,
                                                width, ws.latent_rows.data()));
    // kv[t] = kv_b_proj c_kv[t]: per head [k_nope | v].
    EPIC_RETURN_IF_ERROR(
        cuda::MatMul(*blas, ws.latent_rows.data(), context, width, L.kv_b_proj, ws.kv.data(), heads * kv_head));
    EPIC_RETURN_IF_ERROR(cuda::ToBf16(ws.kv.data(), context, heads * kv_head, heads * kv_head, ws.kv_b.data(),
                                      heads * kv_head));
    const int64_t chunk = std::clamp<int64_t>(kScoreBudget / std::max<int64_t>(heads * context, 1), 1, sp.n);
    for (int64_t i0 = 0; i0 < sp.n; i0 += chunk) {
      const int64_t nq = std::min(chunk, sp.n - i0);
      EPIC_RETURN_IF_ERROR(Grow(ws.scores, heads * nq * context));
      EPIC_RETURN_IF_ERROR(Grow(ws.probs, heads * nq * context));
      const uint16_t* q = ws.wide_b.data() + (sp.first + i0) * ldq;
      // scores[h] = q_nope[h] k_nope[h]^T + q_pe[h] k_pe^T, k_pe shared by the heads.
      cuda::BatchedMatMulArgs qk;
      qk.x = q;
      qk.m = nq;
      qk.ldx = ldq;
      qk.x_stride = qhd;
      qk.w = {cuda::DType::kBF16, ws.kv_b.data(), context, nope, heads * kv_head};
      qk.w_stride = kv_head;
      qk.y = ws.scores.data();
      qk.ldy = context;
      qk.y_stride = nq * context;
      qk.batches = heads;
      EPIC_RETURN_IF_ERROR(cuda::BatchedMatMul(*blas, qk));
      if (rope > 0) {
        cuda::BatchedMatMulArgs pe = qk;
        pe.x = q + nope;
        pe.w = {cuda::DType::kBF16, ws.latent_rows.data() + lora, context, rope, width};
        pe.w_stride = 0;
        pe.accumulate = true;
        EPIC_RETURN_IF_ERROR(cuda::BatchedMatMul(*blas, pe));
      }
      EPIC_RETURN_IF_ERROR(cuda::CausalSoftmax(ws.scores.data(), heads, nq, context, sp.start + i0, scale,
                                               ws.probs.data()));
      // attn[i, h] = probs[h, i] v[h].
      cuda::BatchedMatMulArgs pv;
      pv.x = ws.probs.data();
      pv.m = nq;
      pv.ldx = context;
      pv.x_stride = nq * context;
      pv.w = {cuda::DType::kBF16, ws.kv_b.data() + nope, context, vdim, heads * kv_head};
      pv.w_stride = kv_head;
      pv.transpose_w = false;
      pv.y = ws.attn.data() + (sp.first + i0) * heads * vdim;
      pv.ldy = heads * vdim;
      pv.y_stride = vdim;
      pv.batches = heads;
      EPIC_RETURN_IF_ERROR(cuda::BatchedMatMul(*blas, pv));
    }
  }
  return OkStatus();
}

// ws.expert_ids and ws.gate_weights [tokens, top_k] = the router's choices for ws.normed.
Status CudaForward::Impl::Gate(const DeviceLayer& L, int64_t tokens) {
  EPIC_RETURN_IF_ERROR(cuda::MatMul(*blas, ws.normed.data(), tokens, config.hidden_size, L.router, ws.router.data(),
                                    config.n_routed_experts));
  // TopKGating reads the bias from its device copy; the host pointer only says there is one.
  static const float kHasBias = 0.0f;
  cpu::GateParams g = gate;
  const bool biased = L.choice_bias.size() > 0;
  g.choice_bias = biased ? &kHasBias : nullptr;
  return cuda::TopKGating(ws.router.data(), tokens, g, biased ? L.choice_bias.data() : nullptr, ws.expert_ids.data(),
                          ws.gate_weights.data());
}

// ws.expert_out[r] = the expert of grouped row r applied to x[source[r]], for the rows r
// below *COUNT (all MAX_ROWS when COUNT is nullptr), grouped by OFFSETS over the experts
// whose weights GATE_UP and DOWN point to. Rows past the count are left stale.
Status CudaForward::Impl::GroupedExperts(const float* x, const int32_t* source, const int32_t* count,
                                         int64_t max_rows, const int32_t* offsets,
                                         const DeviceBuffer<const uint16_t*>& gate_up,
                                         const DeviceBuffer<const uint16_t*>& down) {
  const int64_t hidden = config.hidden_size;
  const int64_t inter = config.moe_intermediate_size;
  const int64_t experts = gate_up.size();
  EPIC_RETURN_IF_ERROR(cuda::GatherRowsToBf16(x, hidden, hidden, source, count, max_rows, ws.rows_b.data(), hidden));
  const cuda::GroupedWeights first{gate_up.data(), experts, 2 * inter, hidden, hidden};
  EPIC_RETURN_IF_ERROR(cuda::GroupedMatMul(ws.rows_b.data(), max_rows, hidden, offsets, first, ws.gate_up.data(),
                                           2 * inter, ws.tiles.data(), ws.tiles.size()));
  EPIC_RETURN_IF_ERROR(cuda::SiluMul(ws.gate_up.data(), ws.gate_up.data() + inter, max_rows, inter, 2 * inter,
                                     ws.mid.data(), inter));
  EPIC_RETURN_IF_ERROR(cuda::ToBf16(ws.mid.data(), max_rows, inter, inter, ws.mid_b.data(), inter));
  const cuda::GroupedWeights second{down.data(), experts, hidden, inter, inter};
  return cuda::GroupedMatMul(ws.mid_b.data(), max_rows, inter, offsets, second, ws.expert_out.data(), hidden,
                             ws.tiles.data(), ws.tiles.size());
}

// x += the routed experts' weighted outputs for ws.normed; COUNTS [n_routed_experts]
// receives the choices per expert.
Status CudaForward::Impl::Moe(int64_t layer, int64_t tokens, int32_t* counts) {
  const ModelConfig& c = config;
  const DeviceLayer& L = layers[layer];
  const int64_t hidden = c.hidden_size;
  const int64_t experts = c.n_routed_experts;
  const int64_t k = c.num_experts_per_tok;
  const int64_t choices = tokens * k;

  EPIC_RETURN_IF_ERROR(Gate(L, tokens));
  cuda::ExpertRows rows;
  rows.counts = counts;
  rows.offsets = ws.ex_offsets.data();
  rows.source_token = ws.ex_source.data();
  rows.weight = ws.ex_weight.data();
  rows.grouped_row = ws.ex_grouped.data();
  rows.scratch = ws.ex_scratch.data();
  EPIC_RETURN_IF_ERROR(cuda::PermuteByExpert(ws.expert_ids.data(), ws.gate_weights.data(), tokens, k, experts, rows));
  const int32_t* routed = ws.ex_offsets.data() + experts;  // offsets[experts]: the rows routed
  EPIC_RETURN_IF_ERROR(GroupedExperts(ws.normed.data(), rows.source_token, routed, choices, ws.ex_offsets.data(),
                                      L.gate_up_by_expert, L.down_by_expert));
  return cuda::ScatterAddWeighted(ws.expert_out.data(), choices, hidden, hidden, rows.grouped_row,
                                  ws.gate_weights.data(), tokens, k, ws.x.data(), hidden);
}

// Several ranks: y (this rank's block of TOKENS tokens, the first being FIRST_TOKEN of
// the step) += the routed experts' outputs for ws.normed, the tokens sent to the ranks
// holding their experts and the results sent back as parallel::Dispatch and Combine
// do, with the rows on the device and only routes and counts on the host.
Status CudaForward::Impl::MoeExchange(int64_t layer, int64_t tokens, int64_t first_token, float* y,
                                      ExpertCounts* counts) {
  using Clock = std::chrono::steady_clock;
  const ModelConfig& c = config;
  const DeviceLayer& L = layers[layer];
  parallel::Communicator& comm = *shard.comm;
  const int64_t hidden = c.hidden_size;
  const int64_t experts = c.n_routed_experts;
  const int64_t k = c.num_experts_per_tok;
  const int64_t inter = c.moe_intermediate_size;
  const int64_t slots = static_cast<int64_t>(L.experts.size());
  const int64_t row_bytes = hidden * static_cast<int64_t>(sizeof(float));

  // The gate on the device; the plan on the host.
  std::vector<int32_t> ids(static_cast<size_t>(tokens * k));
  std::vector<float> weights(static_cast<size_t>(tokens * k));
  if (tokens > 0) {
    EPIC_RETURN_IF_ERROR(Gate(L, tokens));
    EPIC_RETURN_IF_ERROR(ws.expert_ids.CopyToHost(ids.data(), tokens * k));  // waits for the gate
    EPIC_RETURN_IF_ERROR(ws.gate_weights.CopyToHost(weights.data(), tokens * k));
  }
  const parallel::DispatchPlan plan = parallel::PlanDispatch(*shard.placement, layer, rank, ids.data(),
                                                             weights.data(), tokens, k, first_token);

  // Dispatch: each token's row once to every rank holding one of its experts, with its routes.
  auto start = Clock::now();
  std::vector<int64_t> rows_from(static_cast<size_t>(ranks), 0);
  EPIC_RETURN_IF_ERROR(comm.ExchangeCounts(plan.send_rows, rows_from));
  int64_t received = 0;
  for (int64_t n : rows_from) received += n;
  const int64_t sent = static_cast<int64_t>(plan.send_token.size());
  EPIC_RETURN_IF_ERROR(Grow(ws.received, received * hidden));
  EPIC_RETURN_IF_ERROR(Grow(ws.route_send, sent * k));
  EPIC_RETURN_IF_ERROR(Grow(ws.route_recv, received * k));
  EPIC_RETURN_IF_ERROR(ws.route_send.CopyFromHost(plan.send_route.data(), sent * k));
  const int64_t route_bytes = k * static_cast<int64_t>(sizeof(parallel::RouteEntry));
  EPIC_RETURN_IF_ERROR(cuda::Synchronize());  // NCCL's stream reads rows the default stream wrote
  EPIC_RETURN_IF_ERROR(comm.AllToAllRowsWithTail(ws.normed.data(), row_bytes, plan.send_token, plan.send_rows,
                                                 ws.received.data(), rows_from, ws.route_send.data(), route_bytes,
                                                 ws.route_recv.data()));
  std::vector<parallel::RouteEntry> routes(static_cast<size_t>(received * k));
  EPIC_RETURN_IF_ERROR(ws.route_recv.CopyToHost(routes.data(), received * k));
  parallel::ExchangeStats dispatch{sent * (row_bytes + route_bytes), received * (row_bytes + route_bytes),
                                   std::chrono::duration<double>(Clock::now() - start).count()};

  // The local experts on their rows, then each received row's weighted sum.
  const parallel::ExpertLayout layout = parallel::MakeExpertLayout(routes, received, k, slots);
  const int64_t grouped = layout.offsets[slots];
  EPIC_RETURN_IF_ERROR(Grow(ws.layout_offsets, slots + 1));
  EPIC_RETURN_IF_ERROR(Grow(ws.layout_source, grouped));
  EPIC_RETURN_IF_ERROR(Grow(ws.layout_grouped, received * k));
  EPIC_RETURN_IF_ERROR(Grow(ws.layout_weight, received * k));
  EPIC_RETURN_IF_ERROR(Grow(ws.rows_b, grouped * hidden));
  EPIC_RETURN_IF_ERROR(Grow(ws.gate_up, grouped * 2 * inter));
  EPIC_RETURN_IF_ERROR(Grow(ws.mid, grouped * inter));
  EPIC_RETURN_IF_ERROR(Grow(ws.mid_b, grouped * inter));
  EPIC_RETURN_IF_ERROR(Grow(ws.expert_out, grouped * hidden));
  EPIC_RETURN_IF_ERROR(Grow(ws.tiles, cuda::GroupedScratchCount(grouped, std::max<int64_t>(slots, 1))));
  EPIC_RETURN_IF_ERROR(Grow(ws.out_rows, received * hidden));
  EPIC_RETURN_IF_ERROR(ws.layout_offsets.CopyFromHost(layout.offsets.data(), slots + 1));
  EPIC_RETURN_IF_ERROR(ws.layout_source.CopyFromHost(layout.grouped_source.data(), grouped));
  EPIC_RETURN_IF_ERROR(ws.layout_grouped.CopyFromHost(layout.row_grouped.data(), received * k));
  EPIC_RETURN_IF_ERROR(ws.layout_weight.CopyFromHost(layout.row_weight.data(), received * k));
  EPIC_RETURN_IF_ERROR(cuda::ZeroOnDevice(ws.out_rows.data(), static_cast<size_t>(received * row_bytes)));
  if (grouped > 0) {
    EPIC_RETURN_IF_ERROR(GroupedExperts(ws.received.data(), ws.layout_source.data(), nullptr, grouped,
                                        ws.layout_offsets.data(), L.gate_up_by_slot, L.down_by_slot));
    EPIC_RETURN_IF_ERROR(cuda::ScatterAddWeighted(ws.expert_out.data(), grouped, hidden, hidden,
                                                  ws.layout_grouped.data(), ws.layout_weight.data(), received, k,
                                                  ws.out_rows.data(), hidden));
  }

  // Combine: the rows go back; each token adds what its ranks returned, in rank order.
  const parallel::CombineLayout back = parallel::MakeCombineLayout(plan, rows_from, rank);
  const int64_t back_rows = back.returned + back.self_rows;
  EPIC_RETURN_IF_ERROR(Grow(ws.back, back_rows * hidden));
  EPIC_RETURN_IF_ERROR(Grow(ws.token_source, tokens * back.sources));
  if (ws.ones.size() < tokens * back.sources) {  // the combine's unit weights, filled once
    EPIC_RETURN_IF_ERROR(Grow(ws.ones, tokens * back.sources));
    EPIC_RETURN_IF_ERROR(ws.ones.CopyFromHost(std::vector<float>(static_cast<size_t>(ws.ones.size()), 1.0f).data(),
                                              ws.ones.size()));
  }
  EPIC_RETURN_IF_ERROR(cuda::Synchronize());  // the experts' rows are complete before NCCL reads them
  start = Clock::now();  // the exchange and the adds, as the CPU's Combine times
  EPIC_RETURN_IF_ERROR(comm.AllToAllRows(ws.out_rows.data(), row_bytes, back.send_index, back.send_rows,
                                         ws.back.data(), back.recv_rows));
  EPIC_RETURN_IF_ERROR(cuda::CopyOnDevice(ws.back.data() + back.returned * hidden,
                                          ws.out_rows.data() + back.self_first * hidden,
                                          static_cast<size_t>(back.self_rows * row_bytes)));
  EPIC_RETURN_IF_ERROR(ws.token_source.CopyFromHost(back.token_source.data(), tokens * back.sources));
  EPIC_RETURN_IF_ERROR(cuda::ScatterAddWeighted(ws.back.data(), back_rows, hidden, hidden, ws.token_source.data(),
                                                ws.ones.data(), tokens, back.sources, y, hidden));
  const int64_t sent_back = static_cast<int64_t>(back.send_index.size());
  parallel::ExchangeStats combine{sent_back * row_bytes, back.returned * row_bytes,
                                  std::chrono::duration<double>(Clock::now() - start).count()};

  exchange_totals.Add(dispatch);
  exchange_totals.Add(combine);
  if (counts != nullptr) {
    std::vector<int64_t> slot_rows(static_cast<size_t>(slots));
    for (int64_t s = 0; s < slots; ++s) slot_rows[s] = layout.offsets[s + 1] - layout.offsets[s];
    AddExchangeCounts(*shard.placement, layer, experts, plan, slot_rows, dispatch, combine, counts);
  }
  return OkStatus();
}

Status CudaForward::Forward(std::span<SequenceStep> batch, const StepTokens& steps, LatentCache* cache,
                            std::vector<float>* logits, ExpertCounts* counts, AttentionForm form) {
  Impl& m = *impl_;
  const ModelConfig& c = m.config;
  auto& ws = m.ws;
  const int64_t hidden = c.hidden_size;
  const int64_t heads = m.heads;
  const int64_t tokens = static_cast<int64_t>(steps.ids.size());
  const int64_t layers = c.num_hidden_layers;
  const int64_t width = c.latent_dim();
  const int64_t experts = c.n_routed_experts;
  const int64_t k = std::max<int64_t>(c.num_experts_per_tok, 1);
  const int64_t bs = cache->block_size();
  const float eps = static_cast<float>(c.rms_norm_eps);
  const int rank = m.rank, ranks = m.ranks;

  // The cache's rows on the device: [layers, blocks, block_size, width] BF16.
  const int64_t layer_rows = cache->num_blocks() * bs;
  if (!cache->device_rows()) {
    EPIC_ASSIGN_OR_RETURN(cuda::DeviceMemory rows, cuda::DeviceMemory::Allocate(
                                                       static_cast<size_t>(layers * layer_rows * width * 2)));
    cache->device_rows() = std::make_shared<cuda::DeviceMemory>(std::move(rows));
  }
  uint16_t* pool = static_cast<uint16_t*>(static_cast<cuda::DeviceMemory*>(cache->device_rows().get())->data());

  // The step's layout for the kernels: per token its sequence's block table, context
  // and cache slot.
  std::vector<int32_t> context(static_cast<size_t>(tokens)), table_start(static_cast<size_t>(tokens));
  std::vector<int64_t> slots(static_cast<size_t>(tokens));
  std::vector<int32_t> tables;
  int64_t max_context = 1;
  std::vector<Impl::Span> spans;
  {
    size_t t = 0;
    for (const SequenceStep& s : batch) {
      const int32_t start = static_cast<int32_t>(tables.size());
      spans.push_back({static_cast<int64_t>(t), static_cast<int64_t>(s.tokens.size()), s.cache->num_tokens, start});
      tables.insert(tables.end(), s.cache->blocks.begin(), s.cache->blocks.end());
      for (size_t i = 0; i < s.tokens.size(); ++i, ++t) {
        const int64_t pos = steps.positions[t];
        context[t] = static_cast<int32_t>(pos + 1);
        table_start[t] = start;
        slots[t] = static_cast<int64_t>(s.cache->blocks[static_cast<size_t>(pos / bs)]) * bs + pos % bs;
        max_context = std::max(max_context, pos + 1);
      }
    }
  }
  // Expand only when every sequence is cheaper so (Model::Attention's count of
  // multiply-adds); one launch of the absorbed kernel serves any mix.
  constexpr double kExpandedKvBytes = 1 << 30;
  bool expanded = form == AttentionForm::kExpanded;
  if (form == AttentionForm::kAuto) {
    expanded = !spans.empty();
    for (const Impl::Span& sp : spans) {
      // Its keys and values, F32 and BF16, must also fit a budget: the absorbed form
      // needs no such memory, and every rank must choose alike (no rank may run out).
      const int64_t context = sp.start + sp.n;
      const double kv_bytes = static_cast<double>(context) * heads * (c.qk_nope_head_dim + c.v_head_dim) * 6;
      expanded = expanded && ExpandIsCheaper(c, heads, sp.n, context) && kv_bytes <= kExpandedKvBytes;
    }
  }
  std::vector<int32_t> logit_rows(steps.logit_rows.begin(), steps.logit_rows.end());
  const int64_t rows = static_cast<int64_t>(logit_rows.size());

  // Attention runs on every token for this rank's heads; the rest of the layer on this
  // rank's block of tokens [first, first + local), as in Model::Forward.
  const TokenBlocks blocks = SplitTokens(tokens, hidden, rank, ranks);
  const int64_t first = blocks.first;
  const int64_t local = blocks.local;
  const std::vector<int64_t>& block_values = blocks.values;
  const std::vector<int64_t>& block_bytes = blocks.bytes;

  const int64_t choices = tokens * k;
  const int64_t qhd = c.q_head_dim();
  const int64_t lora = c.kv_lora_rank;
  const int64_t wide = std::max({hidden, c.q_lora_rank, heads * qhd, heads * lora, heads * c.v_head_dim});
  const int64_t inter = std::max({c.intermediate_size, c.moe_intermediate_size * std::max<int64_t>(c.n_shared_experts, 1),
                                  c.moe_intermediate_size});
  const int64_t mlp_rows = std::max(tokens, choices);
  EPIC_RETURN_IF_ERROR(Grow(ws.token_ids, tokens));
  EPIC_RETURN_IF_ERROR(Grow(ws.positions, tokens));
  EPIC_RETURN_IF_ERROR(Grow(ws.context, tokens));
  EPIC_RETURN_IF_ERROR(Grow(ws.table_start, tokens));
  EPIC_RETURN_IF_ERROR(Grow(ws.slots, tokens));
  EPIC_RETURN_IF_ERROR(Grow(ws.block_tables, static_cast<int64_t>(tables.size())));
  EPIC_RETURN_IF_ERROR(Grow(ws.logit_rows, rows));
  EPIC_RETURN_IF_ERROR(Grow(ws.x, tokens * hidden));
  EPIC_RETURN_IF_ERROR(Grow(ws.normed, tokens * hidden));
  EPIC_RETURN_IF_ERROR(Grow(ws.xb, tokens * hidden));
  EPIC_RETURN_IF_ERROR(Grow(ws.qa, tokens * std::max<int64_t>(c.q_lora_rank, 1)));
  EPIC_RETURN_IF_ERROR(Grow(ws.q, tokens * heads * qhd));
  EPIC_RETURN_IF_ERROR(Grow(ws.latent, tokens * width));
  EPIC_RETURN_IF_ERROR(Grow(ws.q_latent, tokens * heads * lora));
  EPIC_RETURN_IF_ERROR(Grow(ws.o_latent, tokens * heads * lora));
  EPIC_RETURN_IF_ERROR(Grow(ws.attn, tokens * heads * c.v_head_dim));
  EPIC_RETURN_IF_ERROR(Grow(ws.wide_b, tokens * wide));
  EPIC_RETURN_IF_ERROR(Grow(ws.gate_up, mlp_rows * 2 * inter));
  EPIC_RETURN_IF_ERROR(Grow(ws.mid, mlp_rows * inter));
  EPIC_RETURN_IF_ERROR(Grow(ws.mid_b, mlp_rows * inter));
  EPIC_RETURN_IF_ERROR(Grow(ws.selected, rows * hidden));
  EPIC_RETURN_IF_ERROR(Grow(ws.logits, rows * std::max<int64_t>(m.vocab, 1)));
  if (experts > 0) {
    EPIC_RETURN_IF_ERROR(Grow(ws.router, tokens * experts));
    EPIC_RETURN_IF_ERROR(Grow(ws.expert_ids, choices));
    EPIC_RETURN_IF_ERROR(Grow(ws.gate_weights, choices));
    EPIC_RETURN_IF_ERROR(Grow(ws.ex_offsets, experts + 1));
    EPIC_RETURN_IF_ERROR(Grow(ws.ex_source, choices));
    EPIC_RETURN_IF_ERROR(Grow(ws.ex_weight, choices));
    EPIC_RETURN_IF_ERROR(Grow(ws.ex_grouped, choices));
    EPIC_RETURN_IF_ERROR(Grow(ws.ex_scratch, cuda::PermuteScratchCount(tokens, k, experts)));
    EPIC_RETURN_IF_ERROR(Grow(ws.tiles, cuda::GroupedScratchCount(choices, experts)));
    EPIC_RETURN_IF_ERROR(Grow(ws.rows_b, choices * hidden));
    EPIC_RETURN_IF_ERROR(Grow(ws.expert_out, choices * hidden));
    EPIC_RETURN_IF_ERROR(Grow(ws.counts, layers * experts));
  }
  if (ranks > 1) {
    EPIC_RETURN_IF_ERROR(Grow(ws.partial, tokens * hidden));
    EPIC_RETURN_IF_ERROR(Grow(ws.mine, std::max<int64_t>(local, 1) * hidden));
    EPIC_RETURN_IF_ERROR(Grow(ws.normed_all, tokens * hidden));
    EPIC_RETURN_IF_ERROR(Grow(ws.summed, std::max<int64_t>(local, 1) * hidden));
  }
  EPIC_RETURN_IF_ERROR(ws.token_ids.CopyFromHost(steps.ids.data(), tokens));
  EPIC_RETURN_IF_ERROR(ws.positions.CopyFromHost(steps.positions.data(), tokens));
  EPIC_RETURN_IF_ERROR(ws.context.CopyFromHost(context.data(), tokens));
  EPIC_RETURN_IF_ERROR(ws.table_start.CopyFromHost(table_start.data(), tokens));
  EPIC_RETURN_IF_ERROR(ws.slots.CopyFromHost(slots.data(), tokens));
  EPIC_RETURN_IF_ERROR(ws.block_tables.CopyFromHost(tables.data(), static_cast<int64_t>(tables.size())));
  EPIC_RETURN_IF_ERROR(ws.logit_rows.CopyFromHost(logit_rows.data(), rows));

  const DeviceMatrix& embed = m.embed;
  EPIC_RETURN_IF_ERROR(cuda::GatherRowsBf16(ws.token_ids.data(), tokens, static_cast<const uint16_t*>(embed.data),
                                            embed.rows, hidden, ws.x.data(), hidden));
  m.block_size = bs;
  parallel::Communicator* comm = m.shard.comm;
  // NCCL runs on its own stream: the kernels that fill its inputs must finish first.
  auto collective = [&](auto op) -> Status {
    EPIC_RETURN_IF_ERROR(cuda::Synchronize());
    return op();
  };
  // This rank's residual rows: all tokens on one rank, else its block.
  float* mine = ranks == 1 ? ws.x.data() : ws.mine.data();
  const int64_t mine_rows = ranks == 1 ? tokens : local;
  for (int64_t l = 0; l < layers; ++l) {
    const DeviceLayer& L = m.layers[l];
    EPIC_RETURN_IF_ERROR(
        cuda::RmsNorm(ws.x.data(), tokens, hidden, hidden, L.input_norm.data(), eps, ws.normed.data(), hidden));
    EPIC_RETURN_IF_ERROR(cuda::ToBf16(ws.normed.data(), tokens, hidden, hidden, ws.xb.data(), hidden));
    EPIC_RETURN_IF_ERROR(m.Attention(l, tokens, max_context, pool + l * layer_rows * width, expanded, spans));
    const int64_t attn_width = heads * c.v_head_dim;
    EPIC_RETURN_IF_ERROR(cuda::ToBf16(ws.attn.data(), tokens, attn_width, attn_width, ws.wide_b.data(), attn_width));
    if (ranks == 1) {
      EPIC_RETURN_IF_ERROR(cuda::MatMul(*m.blas, ws.wide_b.data(), tokens, attn_width, L.o_proj, ws.x.data(), hidden,
                                        /*accumulate=*/true));
    } else {
      // Row-parallel o_proj: the heads' shares summed, each rank keeping its tokens.
      EPIC_RETURN_IF_ERROR(
          cuda::MatMul(*m.blas, ws.wide_b.data(), tokens, attn_width, L.o_proj, ws.partial.data(), hidden));
      EPIC_RETURN_IF_ERROR(collective([&] { return comm->ReduceScatterSum(ws.partial.data(), mine, block_values); }));
      EPIC_RETURN_IF_ERROR(cuda::AddInPlace(mine, ws.x.data() + first * hidden, local * hidden));
    }

    EPIC_RETURN_IF_ERROR(cuda::RmsNorm(mine, mine_rows, hidden, hidden, L.post_attention_norm.data(), eps,
                                       ws.normed.data(), hidden));
    if (L.moe) {
      if (ranks == 1) {
        EPIC_RETURN_IF_ERROR(m.Moe(l, tokens, ws.counts.data() + l * experts));
      } else {
        EPIC_RETURN_IF_ERROR(m.MoeExchange(l, local, first, mine, counts));
      }
    }
    // The dense MLP, or the shared experts: on one rank directly; on several split by
    // their intermediate dimension, every rank running its part on all tokens.
    const DeviceMlp* split = L.moe ? (L.has_shared ? &L.shared : nullptr) : &L.dense;
    if (split != nullptr && ranks == 1) {
      EPIC_RETURN_IF_ERROR(cuda::ToBf16(ws.normed.data(), tokens, hidden, hidden, ws.xb.data(), hidden));
      EPIC_RETURN_IF_ERROR(m.Mlp(*split, ws.xb.data(), tokens, ws.x.data()));
    } else if (split != nullptr) {
      EPIC_RETURN_IF_ERROR(
          collective([&] { return comm->AllGather(ws.normed.data(), ws.normed_all.data(), block_bytes); }));
      EPIC_RETURN_IF_ERROR(cuda::ToBf16(ws.normed_all.data(), tokens, hidden, hidden, ws.xb.data(), hidden));
      EPIC_RETURN_IF_ERROR(cuda::ZeroOnDevice(ws.partial.data(), static_cast<size_t>(tokens * hidden) * sizeof(float)));
      EPIC_RETURN_IF_ERROR(m.Mlp(*split, ws.xb.data(), tokens, ws.partial.data()));
      EPIC_RETURN_IF_ERROR(
          collective([&] { return comm->ReduceScatterSum(ws.partial.data(), ws.summed.data(), block_values); }));
      EPIC_RETURN_IF_ERROR(cuda::AddInPlace(mine, ws.summed.data(), local * hidden));
    }
    if (ranks > 1) {
      EPIC_RETURN_IF_ERROR(collective([&] { return comm->AllGather(mine, ws.x.data(), block_bytes); }));
    }
  }

  // Final norm on the rows that want logits, then this rank's vocabulary rows.
  EPIC_RETURN_IF_ERROR(cuda::GatherRows(ws.logit_rows.data(), rows, ws.x.data(), tokens, hidden, ws.selected.data(),
                                        hidden));
  EPIC_RETURN_IF_ERROR(cuda::RmsNorm(ws.selected.data(), rows, hidden, hidden, m.final_norm.data(), eps,
                                     ws.selected.data(), hidden));
  EPIC_RETURN_IF_ERROR(cuda::ToBf16(ws.selected.data(), rows, hidden, hidden, ws.xb.data(), hidden));
  EPIC_RETURN_IF_ERROR(cuda::MatMul(*m.blas, ws.xb.data(), rows, hidden, m.lm_head, ws.logits.data(), m.vocab));
  logits->resize(static_cast<size_t>(rows * c.vocab_size));
  if (ranks == 1) {
    // A synchronous copy: it waits for the step and returns any fault of its kernels.
    EPIC_RETURN_IF_ERROR(ws.logits.CopyToHost(logits->data(), rows * c.vocab_size));
  } else {
    // Gather the slices ([rows, vocab of rank r] from each rank r), then interleave.
    EPIC_RETURN_IF_ERROR(Grow(ws.gathered, rows * c.vocab_size));
    const std::vector<int64_t> slice_bytes = VocabSliceBytes(rows, c.vocab_size, ranks);
    EPIC_RETURN_IF_ERROR(
        collective([&] { return comm->AllGather(ws.logits.data(), ws.gathered.data(), slice_bytes); }));
    std::vector<float> gathered(static_cast<size_t>(rows * c.vocab_size));
    EPIC_RETURN_IF_ERROR(ws.gathered.CopyToHost(gathered.data(), rows * c.vocab_size));
    InterleaveVocabSlices(gathered.data(), rows, c.vocab_size, ranks, logits->data());
  }

  if (counts != nullptr && experts > 0 && ranks == 1) {
    std::vector<int32_t> routed(static_cast<size_t>(layers * experts));
    EPIC_RETURN_IF_ERROR(ws.counts.CopyToHost(routed.data(), layers * experts));
    for (int64_t l = 0; l < layers; ++l) {
      if (!m.layers[l].moe) continue;
      auto& per_expert = counts->tokens[l];
      per_expert.resize(static_cast<size_t>(experts), 0);
      for (int64_t e = 0; e < experts; ++e) per_expert[e] += routed[l * experts + e];
      // One rank: slot s ran every token routed to its expert.
      const auto& held = m.expert_slots[l];
      auto& per_slot = counts->slot_tokens[l];
      per_slot.resize(held.size(), 0);
      for (size_t s = 0; s < held.size(); ++s) per_slot[s] += routed[l * experts + held[s]];
    }
  }
  for (SequenceStep& s : batch) s.cache->num_tokens += static_cast<int64_t>(s.tokens.size());
  return OkStatus();
}

}  // namespace epic
