#include "worker/model.h"

#include <algorithm>
#include <cstring>
#include <string>

#include "kernels/cpu/matmul.h"
#include "kernels/cpu/mla_attention.h"
#include "kernels/cpu/ops.h"

namespace epic {
StatusOr<std::unique_ptr<Model>> Model::Load(const std::filesystem::path& dir,
                                             const ProgressFn& progress, WeightResidency residency) {
  std::unique_ptr<Model> model(new Model());
  EPIC_ASSIGN_OR_RETURN(model->checkpoint_, Checkpoint::Open(dir));
  EPIC_ASSIGN_OR_RETURN(model->weights_, ModelWeights::Bind(*model->checkpoint_, progress, residency));
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
  return model;
}

float* Model::Sized(std::vector<float>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(static_cast<size_t>(n));
  return v.data();
}

std::unique_ptr<LatentCache> Model::MakeCache(int64_t block_size, int64_t num_blocks) const {
  return std::make_unique<LatentCache>(config().num_hidden_layers, config().latent_dim(), block_size,
                                       num_blocks);
}

Status Model::Forward(std::span<SequenceStep> batch, LatentCache* cache, std::vector<float>* logits,
                      ExpertCounts* counts) {
  const ModelConfig& c = config();
  const ModelWeights& w = *weights_;
  const int64_t hidden = c.hidden_size;

  // Flatten the batch: token i of the step has a position and a sequence.
  std::vector<int64_t> positions;
  std::vector<int32_t> token_ids;
  std::vector<int64_t> logit_rows;
  for (const SequenceStep& s : batch) {
    if (s.tokens.empty()) return InvalidArgumentError("a sequence in the step has no tokens");
    const int64_t start = s.cache->num_tokens;
    if (cache->BlocksFor(start + static_cast<int64_t>(s.tokens.size())) >
        static_cast<int64_t>(s.cache->blocks.size())) {
      return FailedPreconditionError("latent cache: sequence holds too few blocks for its tokens");
    }
    for (size_t i = 0; i < s.tokens.size(); ++i) {
      if (s.tokens[i] < 0 || s.tokens[i] >= c.vocab_size) {
        return InvalidArgumentError("token id " + std::to_string(s.tokens[i]) +
                                    " is outside the vocabulary [0, " + std::to_string(c.vocab_size) + ")");
      }
      if (s.all_logits || i + 1 == s.tokens.size()) logit_rows.push_back(static_cast<int64_t>(positions.size()));
      positions.push_back(start + static_cast<int64_t>(i));
      token_ids.push_back(s.tokens[i]);
    }
  }
  const int64_t tokens = static_cast<int64_t>(positions.size());
  if (counts != nullptr && counts->tokens.size() != static_cast<size_t>(c.num_hidden_layers)) {
    counts->tokens.assign(static_cast<size_t>(c.num_hidden_layers), {});
  }

  float* x = Sized(ws_.x, tokens * hidden);                          // [tokens, hidden] residual
  float* normed = Sized(ws_.normed, tokens * hidden);                // [tokens, hidden]
  float* attn = Sized(ws_.attn, tokens * c.num_attention_heads * c.v_head_dim);
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t i = 0; i < hidden; ++i) x[t * hidden + i] = w.embed.At(token_ids[t], i);
  }

  const float eps = static_cast<float>(c.rms_norm_eps);
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const LayerWeights& L = w.layers[l];
    cpu::RmsNorm(x, tokens, hidden, hidden, L.input_norm.data(), eps, normed, hidden);
    Attention(l, batch, cache, positions, normed, attn);
    cpu::MatMul(attn, tokens, L.o_proj.cols, L.o_proj, x, hidden, /*accumulate=*/true);

    cpu::RmsNorm(x, tokens, hidden, hidden, L.post_attention_norm.data(), eps, normed, hidden);
    if (L.moe) {
      MoeBlock(l, normed, tokens, x, counts);
    } else {
      Mlp(L.dense, normed, tokens, x, nullptr, nullptr);
    }
  }
  for (SequenceStep& s : batch) s.cache->num_tokens += static_cast<int64_t>(s.tokens.size());

  // Final norm and lm_head only on the rows that want logits.
  const int64_t rows = static_cast<int64_t>(logit_rows.size());
  for (int64_t r = 0; r < rows; ++r) {
    cpu::RmsNorm(x + logit_rows[r] * hidden, 1, hidden, hidden, w.final_norm.data(), eps,
                 normed + r * hidden, hidden);
  }
  logits->resize(static_cast<size_t>(rows * c.vocab_size));
  cpu::MatMul(normed, rows, hidden, w.lm_head, logits->data(), c.vocab_size);
  return OkStatus();
}

void Model::Attention(int64_t layer, std::span<SequenceStep> batch, LatentCache* cache,
                      const std::vector<int64_t>& positions, const float* x, float* out) {
  const ModelConfig& c = config();
  const LayerWeights& L = weights_->layers[layer];
  const int64_t tokens = static_cast<int64_t>(positions.size());
  const int64_t heads = c.num_attention_heads;
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

    // Multiply-adds of each form: expanding every context row through kv_b_proj
    // against folding W_UK/W_UV into each query. Prefill expands; decode absorbs.
    const double expanded = static_cast<double>(context) * lora * heads * kv_head +
                            static_cast<double>(n) * context * heads * (qhd + vdim);
    const double absorbed = static_cast<double>(n) * heads *
                            (nope * lora + context * (2 * lora + rope) + lora * vdim);
    const bool expand = attention_form_ == AttentionForm::kAuto ? expanded < absorbed
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

void Model::MoeBlock(int64_t layer, const float* x, int64_t tokens, float* residual,
                     ExpertCounts* counts) {
  const ModelConfig& c = config();
  const LayerWeights& L = weights_->layers[layer];
  const int64_t hidden = c.hidden_size;
  const int64_t experts = c.n_routed_experts;
  const int64_t k = c.num_experts_per_tok;

  float* router = Sized(ws_.router, tokens * experts);
  cpu::MatMul(x, tokens, hidden, L.router, router, experts);
  std::vector<int32_t> ids(static_cast<size_t>(tokens * k));
  float* weights = Sized(ws_.weights, tokens * k);
  cpu::GateParams gate = gate_;
  gate.choice_bias = L.choice_bias.empty() ? nullptr : L.choice_bias.data();
  cpu::SelectExperts(router, tokens, gate, ids.data(), weights);

  // Group the (token, weight) pairs by expert so each expert's weights are read once
  // for all of its tokens.
  std::vector<int64_t> offsets(static_cast<size_t>(experts + 1), 0);
  for (int32_t e : ids) ++offsets[e + 1];
  for (int64_t e = 0; e < experts; ++e) offsets[e + 1] += offsets[e];
  std::vector<int32_t> rows(ids.size());
  float* scales = Sized(ws_.scales, tokens * k);
  std::vector<int64_t> fill(offsets.begin(), offsets.end() - 1);
  for (int64_t i = 0; i < tokens * k; ++i) {
    const int64_t slot = fill[ids[i]]++;
    rows[slot] = static_cast<int32_t>(i / k);
    scales[slot] = weights[i];
  }
  if (counts != nullptr) {
    auto& layer_counts = counts->tokens[layer];
    layer_counts.resize(static_cast<size_t>(experts), 0);
    for (int64_t e = 0; e < experts; ++e) layer_counts[e] += offsets[e + 1] - offsets[e];
  }

  for (int64_t e = 0; e < experts; ++e) {
    const int64_t n = offsets[e + 1] - offsets[e];
    if (n == 0) continue;
    float* gathered = Sized(ws_.gathered, n * hidden);
    for (int64_t i = 0; i < n; ++i) {
      std::memcpy(gathered + i * hidden, x + rows[offsets[e] + i] * hidden,
                  static_cast<size_t>(hidden) * sizeof(float));
    }
    Mlp(L.experts[e], gathered, n, residual, scales + offsets[e], rows.data() + offsets[e]);
  }
  if (L.has_shared) Mlp(L.shared, x, tokens, residual, nullptr, nullptr);
}

}  // namespace epic
