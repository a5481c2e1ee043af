// The CPU backend: kernels/cpu over the weights in host memory, exact (F32 products of
// BF16 or F32 weights), the reference every other backend is tested against.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "common/scratch_buffer.h"
#include "kernels/cpu/matmul.h"
#include "kernels/cpu/matmul_fast.h"
#include "kernels/cpu/matmul_int8.h"
#include "kernels/cpu/mla_attention.h"
#include "kernels/cpu/ops.h"
#include "kernels/cpu/parallel.h"
#include "worker/compute.h"
#include "worker/model.h"

namespace epic {
namespace {

class CpuBackend final : public ComputeBackend {
 public:
  CpuBackend(const ModelConfig& config, const ModelWeights& weights, const RopeTable& rope,
             const cpu::GateParams& gate, const ComputeShard& shard, parallel::Communicator* comm,
             cpu::Precision precision)
      : c_(config),
        w_(weights),
        rope_(rope),
        gate_(gate),
        shard_(shard),
        comm_(comm),
        bf16_attention_(precision == cpu::Precision::kFast && cpu::Bf16ProductsBeatF32()) {}

  bool on_device() const override { return false; }
  StatusOr<float*> Activations(int id, int64_t values) override { return Sized(activations_, id, values); }
  parallel::RowSpace& rows() override { return rows_; }
  parallel::Communicator* comm() override { return comm_; }

  Status BeginStep(std::span<const SequenceStep> batch, const StepTokens& tokens, LatentCache* cache) override {
    batch_ = batch;
    tokens_ = &tokens;
    cache_ = cache;
    // Each token's rotation factors, shared by every layer's queries and keys.
    const int64_t rope = c_.qk_rope_head_dim;
    const int64_t n = static_cast<int64_t>(tokens.positions.size());
    double* factors = RopeFactorsOf(n);
    cpu::ParallelRows(n, n >= 64, [&](int64_t t) {
      double* cos = factors + t * rope;
      cpu::RopeFactors(tokens.positions[t], rope_.inv_freq.data(), rope / 2, rope_.mscale, cos, cos + rope / 2);
    });
    return OkStatus();
  }

  Status Embed(float* x) override {
    const int64_t hidden = c_.hidden_size;
    const std::vector<int32_t>& ids = tokens_->ids;
    const int64_t n = static_cast<int64_t>(ids.size());
    cpu::ParallelRows(n, n >= 64, [&](int64_t t) {
      for (int64_t i = 0; i < hidden; ++i) x[t * hidden + i] = w_.embed.At(ids[t], i);
    });
    return OkStatus();
  }

  Status Norm(NormWeight norm, int64_t layer, const float* x, int64_t rows, float* out) override {
    const int64_t hidden = c_.hidden_size;
    const float* weight = norm == NormWeight::kFinal           ? w_.final_norm.data()
                          : norm == NormWeight::kInput         ? w_.layers[layer].input_norm.data()
                                                               : w_.layers[layer].post_attention_norm.data();
    cpu::RmsNorm(x, rows, hidden, hidden, weight, static_cast<float>(c_.rms_norm_eps), out, hidden);
    return OkStatus();
  }

  Status Attention(int64_t layer, const float* x, std::span<const AttentionSpan> spans, float* out) override;

  Status OutputProjection(int64_t layer, const float* attn, int64_t rows, float* y, bool accumulate) override {
    const cpu::WeightMatrix& o = w_.layers[layer].o_proj;
    cpu::MatMul(attn, rows, o.cols, o, y, c_.hidden_size, accumulate);
    return OkStatus();
  }

  Status Mlp(int64_t layer, const float* x, int64_t rows, float* y) override {
    const LayerWeights& L = w_.layers[layer];
    const MlpWeights& w = L.moe ? L.shared : L.dense;
    float* gate = Scratch(kGate, rows * 2 * w.gate.rows);
    MlpInto(w, {x, nullptr}, rows, gate, y, /*accumulate=*/true);
    return OkStatus();
  }

  Status Gate(int64_t layer, const float* x, int64_t rows, int32_t* ids, float* weights) override {
    if (rows == 0) return OkStatus();
    const LayerWeights& L = w_.layers[layer];
    float* router = Scratch(kRouter, rows * c_.n_routed_experts);
    cpu::MatMul(x, rows, c_.hidden_size, L.router, router, c_.n_routed_experts);
    cpu::GateParams gate = gate_;
    gate.choice_bias = L.choice_bias.empty() ? nullptr : L.choice_bias.data();
    cpu::SelectExperts(router, rows, gate, ids, weights);
    return OkStatus();
  }

  // Each slot's rows gathered and run together, so its weights are read once for all.
  // Each grouped row's output lands in a row of its own and is added into OUT afterwards,
  // in slot order: experts sharing a token never add into its row at once. With enough
  // busy slots the threads take whole experts, each product on one thread, most rows
  // first: a team woken for every expert's small products cost more than it saved
  // (measured faster in decode, batched decode and 512-token prefill on both model
  // shapes). With few, each product takes every thread.
  Status Experts(int64_t layer, const float* rows, int64_t received, const parallel::ExpertLayout& layout,
                 float* out) override {
    const LayerWeights& L = w_.layers[layer];
    const int64_t hidden = c_.hidden_size;
    std::vector<int64_t> busy;  // slots with rows
    for (size_t s = 0; s + 1 < layout.offsets.size(); ++s) {
      if (layout.offsets[s + 1] > layout.offsets[s]) busy.push_back(static_cast<int64_t>(s));
    }
    const int64_t grouped = layout.offsets.empty() ? 0 : layout.offsets.back();
    float* each = Scratch(kGroupedOut, std::max<int64_t>(grouped, 1) * hidden);
    const int threads = omp_get_max_threads();
    const bool whole_experts = threads > 1 && static_cast<int64_t>(busy.size()) >= 2 * threads;
    if (whole_experts) {
      // Most rows first: the threads take them as they come free, and a large expert
      // left to the end would keep one thread busy while the others wait.
      std::stable_sort(busy.begin(), busy.end(), [&](int64_t a, int64_t b) {
        return layout.offsets[a + 1] - layout.offsets[a] > layout.offsets[b + 1] - layout.offsets[b];
      });
    }
    // Int8 weights (fast): the received rows quantized once, each expert gathering its
    // rows' int8 values instead of quantizing its copies of them (512-token prefill
    // x1.010-1.026 on small experts, x1.033 on V2-Lite's shape).
    const bool int8 = !busy.empty() && FirstProduct(L.experts[static_cast<size_t>(busy[0])]).type ==
                                           cpu::WeightType::kI8;
    if (int8) received_int8_.Quantize(rows, received, hidden, hidden);
    cpu::ParallelFor(static_cast<int64_t>(busy.size()), whole_experts, [&](int64_t j) {
      const int64_t s = busy[j];
      const int64_t begin = layout.offsets[s];
      const int64_t n = layout.offsets[s + 1] - begin;
      const MlpWeights& w = L.experts[static_cast<size_t>(s)];
      thread_local ScratchBuffer gathered_memory, gate_memory;
      thread_local cpu::Int8Rows gathered_int8;
      float* gate = gate_memory.Get<float>(n * 2 * w.gate.rows);
      const int32_t* source = layout.grouped_source.data() + begin;
      if (int8) {
        gathered_int8.Gather(received_int8_, source, n);
        MlpInto(w, {nullptr, &gathered_int8}, n, gate, each + begin * hidden, /*accumulate=*/false);
        return;
      }
      float* gathered = gathered_memory.Get<float>(n * hidden);
      for (int64_t i = 0; i < n; ++i) {
        std::memcpy(gathered + i * hidden, rows + source[i] * hidden, static_cast<size_t>(hidden) * sizeof(float));
      }
      MlpInto(w, {gathered, nullptr}, n, gate, each + begin * hidden, /*accumulate=*/false);
    });
    // Each row's shares (its route entries' grouped rows) added in slot order, as one
    // loop over the grouped rows would add them, with the rows spread over the threads:
    // the same sums, bit for bit (a 512-token prefill's 3072 shares took 2% of it on one
    // thread). All of a row's shares in one pass (WeightedSum), not one Axpy each:
    // 512-token prefill's combine 1.4-1.6x (small experts, Zen 4, alternating in one
    // process).
    const int64_t top_k = received > 0 ? static_cast<int64_t>(layout.row_grouped.size()) / received : 0;
    cpu::ParallelRows(received, grouped * hidden >= (1 << 16), [&](int64_t r) {
      const int32_t* shares = layout.row_grouped.data() + r * top_k;  // -1 for pads
      thread_local std::vector<const float*> x;
      thread_local std::vector<float> weight;
      x.resize(static_cast<size_t>(top_k));
      weight.resize(static_cast<size_t>(top_k));
      size_t count = 0;
      for (int32_t last = -1;;) {
        int32_t g = std::numeric_limits<int32_t>::max();  // the next grouped row after LAST
        for (int64_t e = 0; e < top_k; ++e) {
          if (shares[e] > last && shares[e] < g) g = shares[e];
        }
        if (g == std::numeric_limits<int32_t>::max()) break;
        x[count] = each + g * hidden;
        weight[count++] = layout.grouped_weight[g];
        last = g;
      }
      cpu::WeightedSum({x.data(), count}, weight.data(), hidden, out + r * hidden);
    });
    return OkStatus();
  }

  Status LmHead(const float* x, std::span<const int64_t> rows, float* logits) override {
    const int64_t hidden = c_.hidden_size;
    const int64_t n = static_cast<int64_t>(rows.size());
    float* normed = Scratch(kSelected, std::max<int64_t>(n, 1) * hidden);
    for (int64_t r = 0; r < n; ++r) {
      cpu::RmsNorm(x + rows[r] * hidden, 1, hidden, hidden, w_.final_norm.data(),
                   static_cast<float>(c_.rms_norm_eps), normed + r * hidden, hidden);
    }
    cpu::MatMul(normed, n, hidden, w_.lm_head, logits, shard_.vocab_end - shard_.vocab_begin);
    return OkStatus();
  }

  Status Add(float* y, const float* x, int64_t n) override {
    for (int64_t i = 0; i < n; ++i) y[i] += x[i];
    return OkStatus();
  }
  Status Zero(float* y, int64_t n) override {
    std::fill(y, y + n, 0.0f);
    return OkStatus();
  }
  Status CopyToHost(const float* x, int64_t n, float* host) override {
    if (host != x) std::memcpy(host, x, static_cast<size_t>(n) * sizeof(float));
    return OkStatus();
  }

  double expanded_kv_budget() const override { return HUGE_VAL; }

  Status ChangeExperts(const parallel::ExpertPlacement&, int, const std::vector<std::vector<int>>&,
                       const std::vector<std::vector<MlpWeights>>&) override {
    return OkStatus();  // the model's host weights are these
  }

 private:
  // The backend's own scratch, beside the schedule's activations.
  enum : int { kQ, kQa, kQaLatent, kLatent, kCKv, kKPe, kKv, kQLatent, kQPe, kOLatent, kRouter, kGate, kSelected,
               kGroupedOut, kScratchCount };

  // BUFFERS[ID] grown to hold at least N values (never shrunk); its data. A fresh
  // allocation of this size in every step costs a page clear per 4 KiB, which showed as
  // 15% of decode time.
  static float* Sized(std::vector<ScratchBuffer>& buffers, int id, int64_t n) {
    if (static_cast<size_t>(id) >= buffers.size()) buffers.resize(static_cast<size_t>(id) + 1);
    return buffers[static_cast<size_t>(id)].Get<float>(std::max<int64_t>(n, 1));
  }
  float* Scratch(int id, int64_t n) { return Sized(scratch_, id, n); }
  // The step's rope factors: token t's cosines then sines, qk_rope_head_dim / 2 each.
  double* RopeFactorsOf(int64_t tokens) {
    const auto n = static_cast<size_t>(std::max<int64_t>(tokens, 1) * c_.qk_rope_head_dim);
    if (rope_factors_.size() < n) rope_factors_.resize(n);
    return rope_factors_.data();
  }

  // An MLP's input rows: F32, or quantized already for its int8 weights.
  struct MlpInput {
    const float* f32;
    const cpu::Int8Rows* int8;
  };

  // An MLP's first product (gate|up stacked, else gate): its type is the MLP's precision.
  static const cpu::WeightMatrix& FirstProduct(const MlpWeights& w) {
    return w.gate_up.data != nullptr ? w.gate_up : w.gate;
  }

  // Y (+)= down(silu(gate(x)) * up(x)) for TOKENS rows, through SCRATCH of
  // TOKENS x 2 x intermediate floats: with gate|up stacked, one product fills each row
  // with its gate then its up values.
  void MlpInto(const MlpWeights& w, MlpInput x, int64_t tokens, float* scratch, float* y, bool accumulate) const {
    const int64_t hidden = c_.hidden_size;
    const int64_t inter = w.gate.rows;
    auto from_input = [&](const cpu::WeightMatrix& m, float* out, int64_t ldo) {
      if (x.int8 != nullptr) {
        cpu::MatMulInt8(*x.int8, m, out, ldo, /*accumulate=*/false);
      } else {
        cpu::MatMul(x.f32, tokens, hidden, m, out, ldo);
      }
    };
    if (w.gate_up.data != nullptr) {
      from_input(w.gate_up, scratch, 2 * inter);
      cpu::ParallelRows(tokens, tokens * inter >= (1 << 15), [&](int64_t t) {
        float* row = scratch + t * 2 * inter;
        cpu::SiluMul(row, row + inter, inter, row);
      });
      cpu::MatMul(scratch, tokens, 2 * inter, w.down, y, hidden, accumulate);
      return;
    }
    float* up = scratch + tokens * inter;
    from_input(w.gate, scratch, inter);
    from_input(w.up, up, inter);
    cpu::SiluMul(scratch, up, tokens * inter, scratch);
    cpu::MatMul(scratch, tokens, inter, w.down, y, hidden, accumulate);
  }

  const ModelConfig& c_;
  const ModelWeights& w_;
  const RopeTable& rope_;
  cpu::GateParams gate_;
  ComputeShard shard_;
  parallel::Communicator* comm_;
  const bool bf16_attention_;  // the expanded form's products with BF16 operands
  parallel::HostRowSpace rows_;
  std::vector<ScratchBuffer> activations_, scratch_;  // in huge pages from 2 MiB
  cpu::Int8Rows received_int8_;  // Experts' rows, quantized once
  std::vector<double> rope_factors_;
  std::span<const SequenceStep> batch_;
  const StepTokens* tokens_ = nullptr;
  LatentCache* cache_ = nullptr;
};

Status CpuBackend::Attention(int64_t layer, const float* x, std::span<const AttentionSpan> spans, float* out) {
  const ModelConfig& c = c_;
  const LayerWeights& L = w_.layers[layer];
  const std::vector<int64_t>& positions = tokens_->positions;
  const int64_t tokens = static_cast<int64_t>(positions.size());
  const int64_t heads = shard_.head_end - shard_.head_begin;
  const int64_t nope = c.qk_nope_head_dim;
  const int64_t rope = c.qk_rope_head_dim;
  const int64_t lora = c.kv_lora_rank;
  const int64_t qhd = c.q_head_dim();
  const int64_t vdim = c.v_head_dim;
  const int64_t kv_head = nope + vdim;  // rows of kv_b_proj per head
  const float eps = static_cast<float>(c.rms_norm_eps);
  const float scale = static_cast<float>(c.SoftmaxScale());

  // Latent rows [tokens, kv_lora + rope] (normalise c_kv, rotate k_pe, then cache) and,
  // with a query LoRA, its rank's rows, normalised.
  const int64_t rank = c.q_lora_rank;
  const int64_t width = c.latent_dim();
  float* latent = Scratch(kLatent, tokens * width);
  float* qa = rank > 0 ? Scratch(kQa, tokens * rank) : nullptr;
  // The products' rows, LD apart, before they are normalised into QA and LATENT.
  const float* qa_in = qa;
  const float* kv_in = latent;
  int64_t qa_ld = rank, kv_ld = width;
  if (L.q_a_kv_a.data != nullptr) {
    // Both from one product (one pass over x, one start of the team), split as they are
    // normalised.
    const int64_t both = rank + width;
    float* y = Scratch(kQaLatent, tokens * both);
    cpu::MatMul(x, tokens, c.hidden_size, L.q_a_kv_a, y, both);
    qa_in = y;
    kv_in = y + rank;
    qa_ld = kv_ld = both;
    for (int64_t t = 0; t < tokens; ++t) {
      std::memcpy(latent + t * width + lora, y + t * both + rank + lora, static_cast<size_t>(rope) * sizeof(float));
    }
  } else {
    if (rank > 0) cpu::MatMul(x, tokens, c.hidden_size, L.q_a_proj, qa, rank);
    cpu::MatMul(x, tokens, c.hidden_size, L.kv_a_proj, latent, width);
  }
  if (rank > 0) cpu::RmsNorm(qa_in, tokens, rank, qa_ld, L.q_a_norm.data(), eps, qa, rank);
  cpu::RmsNorm(kv_in, tokens, lora, kv_ld, L.kv_a_norm.data(), eps, latent, width);
  // Queries [tokens, heads, q_head_dim].
  float* q = Scratch(kQ, tokens * heads * qhd);
  if (rank > 0) {
    cpu::MatMul(qa, tokens, rank, L.q_b_proj, q, heads * qhd);
  } else {
    cpu::MatMul(x, tokens, c.hidden_size, L.q_proj, q, heads * qhd);
  }
  // Rotated by the step's factors (BeginStep): a prefill's tokens spread over the threads.
  cpu::ParallelRows(tokens, tokens >= 16, [&](int64_t t) {
    const double* cos = rope_factors_.data() + t * rope;
    cpu::ApplyRope(latent + t * width + lora, 1, 0, cos, cos + rope / 2, rope / 2);
    cpu::ApplyRope(q + t * heads * qhd + nope, heads, qhd, cos, cos + rope / 2, rope / 2);
  });

  // Every span's new rows into the cache first: attention reads them.
  for (size_t i = 0; i < spans.size(); ++i) {
    const AttentionSpan& sp = spans[i];
    for (int64_t j = 0; j < sp.n; ++j) {
      cache_->Write(layer, *batch_[i].cache, sp.start + j, latent + (sp.first + j) * width);
    }
  }
  for (size_t i = 0; i < spans.size();) {
    const AttentionSpan& sp = spans[i];
    if (sp.expanded) {
      const BlockTable& table = *batch_[i].cache;
      const int64_t context = sp.start + sp.n;
      float* c_kv = Scratch(kCKv, context * lora);
      float* k_pe = Scratch(kKPe, context * rope);
      const cpu::LatentRows rows = cache_->Rows(layer, table);
      for (int64_t t = 0; t < context; ++t) {
        rows.Widen(t, 0, lora, c_kv + t * lora);
        rows.Widen(t, lora, rope, k_pe + t * rope);
      }
      float* kv = Scratch(kKv, context * heads * kv_head);
      cpu::MatMul(c_kv, context, lora, L.kv_b_expand, kv, heads * kv_head);
      cpu::MlaExpandedParams p;
      p.num_queries = sp.n;
      p.start = sp.start;
      p.num_heads = heads;
      p.nope_dim = nope;
      p.rope_dim = rope;
      p.v_dim = vdim;
      p.scale = scale;
      p.q = q + sp.first * heads * qhd;
      p.kv = kv;
      p.k_pe = k_pe;
      p.out = out + sp.first * heads * vdim;
      p.bf16 = bf16_attention_;
      cpu::MlaExpandedAttention(p);
      ++i;
      continue;
    }
    // A run of absorbed spans (a step's decodes come together): their tokens' queries
    // folded through W_UK and outputs through W_UV once per head for the whole run, so
    // each head's weights are read once a step rather than once a sequence.
    size_t last = i;
    while (last + 1 < spans.size() && !spans[last + 1].expanded) ++last;
    const int64_t first = sp.first;
    const int64_t n = spans[last].first + spans[last].n - first;
    const float* qs = q + first * heads * qhd;
    // q_latent[t, h] = q_nope[t, h] W_UK[h], with W_UK[h] = kv_b_proj rows [h*kv_head, +nope).
    float* q_latent = Scratch(kQLatent, n * heads * lora);
    float* q_pe = Scratch(kQPe, n * heads * rope);
    // Heads over the threads, each thread's one after another (half the heads each): each
    // head's product is small (16 KiB of int8 on small experts), and heads taken one at a
    // time in turn broke each thread's stream through W_UK (decode 4% faster in one
    // process alternating the two, small experts after 512 tokens).
    cpu::ParallelRows(heads, true, [&](int64_t h) {
      if (L.kv_b_uk.data != nullptr) {  // fast: W_UK[h]^T's int8 rows
        cpu::MatMul(qs + h * qhd, n, heads * qhd, L.kv_b_uk.Rows(h * lora, lora), q_latent + h * lora, heads * lora);
      } else {
        cpu::MatMulNoTrans(qs + h * qhd, n, heads * qhd, L.kv_b_proj.Rows(h * kv_head, nope), q_latent + h * lora,
                           heads * lora);
      }
    });
    for (int64_t j = 0; j < n * heads; ++j) {
      std::memcpy(q_pe + j * rope, qs + j * qhd + nope, static_cast<size_t>(rope) * sizeof(float));
    }
    float* o_latent = Scratch(kOLatent, n * heads * lora);
    // Many sequences (batched decode): each one's attention on one thread, the next
    // one's queries and cache rows fetched as it runs; few: each spreads its heads over
    // the threads.
    const int64_t sequences = static_cast<int64_t>(last - i + 1);
    auto params = [&](int64_t k) {
      const size_t r = i + static_cast<size_t>(k);
      const int64_t at = spans[r].first - first;
      cpu::MlaAbsorbedParams p;
      p.num_queries = spans[r].n;
      p.start = spans[r].start;
      p.num_heads = heads;
      p.kv_lora_rank = lora;
      p.rope_dim = rope;
      p.scale = scale;
      p.q_latent = q_latent + at * heads * lora;
      p.q_pe = q_pe + at * heads * rope;
      p.cache = cache_->Rows(layer, *batch_[r].cache);
      p.out_latent = o_latent + at * heads * lora;
      return p;
    };
    cpu::ParallelForAhead(
        sequences, sequences >= 2 * omp_get_max_threads(), [&](int64_t k) { cpu::PrefetchAbsorbed(params(k)); },
        [&](int64_t k) { cpu::MlaAbsorbedAttention(params(k)); });
    // out[t, h] = W_UV[h] o_latent[t, h], with W_UV[h] = rows [h*kv_head + nope, +vdim):
    // under fast from kv_b_proj's int8 copy (half the bytes), where its heads start at
    // whole panels.
    float* os = out + first * heads * vdim;
    const cpu::WeightMatrix& uv =
        L.kv_b_expand.type != cpu::WeightType::kI8 ||
                (kv_head % cpu::internal::kInt8PanelRows == 0 && nope % cpu::internal::kInt8PanelRows == 0)
            ? L.kv_b_expand
            : L.kv_b_proj;
    cpu::ParallelRows(heads, true, [&](int64_t h) {
      cpu::MatMul(o_latent + h * lora, n, heads * lora, uv.Rows(h * kv_head + nope, vdim), os + h * vdim,
                  heads * vdim);
    });
    i = last + 1;
  }
  return OkStatus();
}

}  // namespace

std::unique_ptr<ComputeBackend> MakeCpuBackend(const ModelConfig& config, const ModelWeights& weights,
                                               const RopeTable& rope, const cpu::GateParams& gate,
                                               const ComputeShard& shard, parallel::Communicator* comm,
                                               cpu::Precision precision) {
  return std::make_unique<CpuBackend>(config, weights, rope, gate, shard, comm, precision);
}

}  // namespace epic
