#include "tests/reference/reference_model.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <numbers>
#include <numeric>
#include <string>
#include <utility>

namespace epic::reference {
namespace {

using Vector = std::vector<double>;
using Rows = std::vector<Vector>;  // [tokens][features]

[[noreturn]] void Fail(const std::string& message) {
  std::fprintf(stderr, "reference model: %s\n", message.c_str());
  std::abort();
}

// The 16-bit formats widened by hand rather than with common/half.h, so that the
// oracle shares no arithmetic with the engine.
double Bf16ToDouble(uint16_t bits) {
  const uint32_t word = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &word, sizeof f);
  return f;
}

double F16ToDouble(uint16_t bits) {
  const int exponent = (bits >> 10) & 0x1f;
  const int mantissa = bits & 0x3ff;
  double magnitude;
  if (exponent == 0) {
    magnitude = std::ldexp(mantissa, -24);  // zero or subnormal
  } else if (exponent == 31) {
    magnitude = mantissa ? std::numeric_limits<double>::quiet_NaN()
                         : std::numeric_limits<double>::infinity();
  } else {
    magnitude = std::ldexp(1024 + mantissa, exponent - 25);
  }
  return (bits & 0x8000) ? -magnitude : magnitude;
}

// Element I (row-major) of a checkpoint tensor, as a double.
double Element(const TensorView& t, int64_t i) {
  switch (t.dtype) {
    case DType::kF32: {
      float f;
      std::memcpy(&f, t.data + 4 * i, 4);
      return f;
    }
    case DType::kBF16: {
      uint16_t h;
      std::memcpy(&h, t.data + 2 * i, 2);
      return Bf16ToDouble(h);
    }
    case DType::kF16: {
      uint16_t h;
      std::memcpy(&h, t.data + 2 * i, 2);
      return F16ToDouble(h);
    }
    default:
      Fail("tensor '" + t.name + "' has dtype " + DTypeName(t.dtype) + ", not BF16/F16/F32");
  }
}

// A 1-D weight (norm scale, correction bias) as doubles.
Vector LoadVector(const Checkpoint& ckpt, const std::string& name) {
  const TensorView& t = ckpt.Get(name);
  if (t.shape.size() != 1) Fail("tensor '" + name + "' is not 1-D");
  Vector v(t.shape[0]);
  for (int64_t i = 0; i < t.shape[0]; ++i) v[i] = Element(t, i);
  return v;
}

// y[t] = W x[t] for the weight W [out, in] named NAME. Rows of W are widened one at a
// time, so even a large vocabulary head never exists in double as a whole.
Rows Linear(const Checkpoint& ckpt, const std::string& name, const Rows& xs) {
  const TensorView& w = ckpt.Get(name);
  if (w.shape.size() != 2) Fail("tensor '" + name + "' is not 2-D");
  const int64_t out = w.shape[0];
  const int64_t in = w.shape[1];
  for (const Vector& x : xs) {
    if (static_cast<int64_t>(x.size()) != in) Fail("input width mismatch for '" + name + "'");
  }
  Rows ys(xs.size(), Vector(out, 0.0));
  Vector row(in);
  for (int64_t o = 0; o < out; ++o) {
    for (int64_t i = 0; i < in; ++i) row[i] = Element(w, o * in + i);
    for (size_t t = 0; t < xs.size(); ++t) {
      double sum = 0.0;
      for (int64_t i = 0; i < in; ++i) sum += row[i] * xs[t][i];
      ys[t][o] = sum;
    }
  }
  return ys;
}

// DeepseekV2RMSNorm: weight * x / sqrt(mean(x^2) + eps).
Rows RmsNorm(const Rows& xs, const Vector& weight, double eps) {
  Rows ys = xs;
  for (Vector& y : ys) {
    if (y.size() != weight.size()) Fail("RMSNorm width mismatch");
    double sum_sq = 0.0;
    for (double v : y) sum_sq += v * v;
    const double inv_rms = 1.0 / std::sqrt(sum_sq / static_cast<double>(y.size()) + eps);
    for (size_t i = 0; i < y.size(); ++i) y[i] = weight[i] * (y[i] * inv_rms);
  }
  return ys;
}

Rows RmsNorm(const Checkpoint& ckpt, const std::string& weight_name, const Rows& xs) {
  return RmsNorm(xs, LoadVector(ckpt, weight_name), ckpt.config().rms_norm_eps);
}

// Columns [begin, begin + width) of every row.
Rows Columns(const Rows& xs, int64_t begin, int64_t width) {
  Rows ys;
  for (const Vector& x : xs) ys.emplace_back(x.begin() + begin, x.begin() + begin + width);
  return ys;
}

double Silu(double x) { return x / (1.0 + std::exp(-x)); }

// DeepseekV2MLP: down(silu(gate(x)) * up(x)), with PREFIX "mlp", "mlp.shared_experts"
// or "mlp.experts.E".
Rows Mlp(const Checkpoint& ckpt, int64_t layer, const std::string& prefix, const Rows& xs) {
  Rows gate = Linear(ckpt, LayerTensor(layer, prefix + ".gate_proj"), xs);
  const Rows up = Linear(ckpt, LayerTensor(layer, prefix + ".up_proj"), xs);
  for (size_t t = 0; t < gate.size(); ++t) {
    for (size_t i = 0; i < gate[t].size(); ++i) gate[t][i] = Silu(gate[t][i]) * up[t][i];
  }
  return Linear(ckpt, LayerTensor(layer, prefix + ".down_proj"), gate);
}

// HF yarn_get_mscale.
double YarnGetMscale(double scale, double mscale) {
  if (scale <= 1.0) return 1.0;
  return 0.1 * mscale * std::log(scale) + 1.0;
}

// The rotary embedding of the qk_rope_head_dim slice: DeepseekV2RotaryEmbedding and its
// Linear and Yarn variants.
struct Rotary {
  Vector inv_freq;            // [qk_rope_head_dim / 2]
  double position_divisor = 1.0;  // linear scaling divides positions by the factor
  double magnitude = 1.0;     // YaRN multiplies cos and sin by this
};

Rotary MakeRotary(const ModelConfig& c) {
  const int64_t d = c.qk_rope_head_dim;
  const double theta = c.rope_theta;
  const RopeScaling& s = c.rope_scaling;
  Rotary r;
  r.inv_freq.resize(d / 2);
  for (int64_t i = 0; i < d / 2; ++i) {
    r.inv_freq[i] = 1.0 / std::pow(theta, static_cast<double>(2 * i) / static_cast<double>(d));
  }
  if (s.type == RopeScaling::Type::kLinear) {
    r.position_divisor = s.factor;
  } else if (s.type == RopeScaling::Type::kYarn) {
    // The pair index at which a frequency completes ROTATIONS turns over the original
    // context (HF yarn_find_correction_dim).
    auto correction_dim = [&](double rotations) {
      return static_cast<double>(d) *
             std::log(static_cast<double>(s.original_max_position_embeddings) /
                      (rotations * 2.0 * std::numbers::pi)) /
             (2.0 * std::log(theta));
    };
    const double low = std::max(std::floor(correction_dim(s.beta_fast)), 0.0);
    double high = std::min(std::ceil(correction_dim(s.beta_slow)), static_cast<double>(d - 1));
    if (low == high) high += 0.001;
    for (int64_t i = 0; i < d / 2; ++i) {
      const double ramp = std::clamp((static_cast<double>(i) - low) / (high - low), 0.0, 1.0);
      const double extrapolation = 1.0 - ramp;  // HF's inv_freq_mask
      const double freq_extra = r.inv_freq[i];
      const double freq_inter =
          1.0 / (s.factor * std::pow(theta, static_cast<double>(2 * i) / static_cast<double>(d)));
      r.inv_freq[i] = freq_inter * (1.0 - extrapolation) + freq_extra * extrapolation;
    }
    r.magnitude = YarnGetMscale(s.factor, s.mscale) / YarnGetMscale(s.factor, s.mscale_all_dim);
  }
  return r;
}

// Rotates the interleaved pairs (x[2i], x[2i+1]) of a rope slice by position * inv_freq[i].
void ApplyRotary(const Rotary& r, int64_t position, double* x) {
  const double p = static_cast<double>(position) / r.position_divisor;
  for (size_t i = 0; i < r.inv_freq.size(); ++i) {
    const double angle = p * r.inv_freq[i];
    const double cos = std::cos(angle) * r.magnitude;
    const double sin = std::sin(angle) * r.magnitude;
    const double a = x[2 * i];
    const double b = x[2 * i + 1];
    x[2 * i] = a * cos - b * sin;
    x[2 * i + 1] = b * cos + a * sin;
  }
}

// DeepseekV2Attention.__init__'s softmax_scale. HF applies the mscale_all_dim factor
// whenever rope_scaling is set, whatever its type.
double SoftmaxScale(const ModelConfig& c) {
  double scale = 1.0 / std::sqrt(static_cast<double>(c.qk_nope_head_dim + c.qk_rope_head_dim));
  const RopeScaling& s = c.rope_scaling;
  if (s.type != RopeScaling::Type::kNone && s.mscale_all_dim != 0.0) {
    const double m = YarnGetMscale(s.factor, s.mscale_all_dim);
    scale *= m * m;
  }
  return scale;
}

// Multi-head latent attention in its plain (up-projected) form over the whole causal
// sequence. XS: the normed hidden states [tokens][hidden]; returns o_proj's output.
Rows Attention(const Checkpoint& ckpt, int64_t layer, const Rotary& rotary, const Rows& xs) {
  const ModelConfig& c = ckpt.config();
  const int64_t heads = c.num_attention_heads;
  const int64_t nope = c.qk_nope_head_dim;
  const int64_t rope = c.qk_rope_head_dim;
  const int64_t v_dim = c.v_head_dim;
  const int64_t q_dim = nope + rope;
  const int64_t kv_dim = nope + v_dim;  // per head in kv_b_proj's output: k_nope | v
  const int64_t tokens = static_cast<int64_t>(xs.size());

  Rows q;  // [tokens][heads * q_dim], each head q_nope | q_pe
  if (c.q_lora_rank == 0) {
    q = Linear(ckpt, LayerTensor(layer, "self_attn.q_proj"), xs);
  } else {
    const Rows q_latent = RmsNorm(ckpt, LayerTensor(layer, "self_attn.q_a_layernorm"),
                                  Linear(ckpt, LayerTensor(layer, "self_attn.q_a_proj"), xs));
    q = Linear(ckpt, LayerTensor(layer, "self_attn.q_b_proj"), q_latent);
  }
  // [tokens][kv_lora_rank + rope]: compressed kv | k_pe
  const Rows ckv = Linear(ckpt, LayerTensor(layer, "self_attn.kv_a_proj_with_mqa"), xs);
  const Rows c_kv = RmsNorm(ckpt, LayerTensor(layer, "self_attn.kv_a_layernorm"),
                            Columns(ckv, 0, c.kv_lora_rank));
  const Rows kv = Linear(ckpt, LayerTensor(layer, "self_attn.kv_b_proj"), c_kv);  // [tokens][heads * kv_dim]
  Rows k_pe = Columns(ckv, c.kv_lora_rank, rope);  // [tokens][rope], shared by all heads

  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t h = 0; h < heads; ++h) ApplyRotary(rotary, t, &q[t][h * q_dim + nope]);
    ApplyRotary(rotary, t, k_pe[t].data());
  }

  const double scale = SoftmaxScale(c);
  Rows attended(tokens, Vector(heads * v_dim, 0.0));  // [tokens][heads * v_dim]
  Vector scores(tokens);
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t h = 0; h < heads; ++h) {
      const double* query = &q[t][h * q_dim];
      double max_score = -std::numeric_limits<double>::infinity();
      for (int64_t s = 0; s <= t; ++s) {  // causal: keys at positions 0..t
        const double* k_nope = &kv[s][h * kv_dim];
        double dot = 0.0;
        for (int64_t i = 0; i < nope; ++i) dot += query[i] * k_nope[i];
        for (int64_t i = 0; i < rope; ++i) dot += query[nope + i] * k_pe[s][i];
        scores[s] = dot * scale;
        max_score = std::max(max_score, scores[s]);
      }
      double total = 0.0;
      for (int64_t s = 0; s <= t; ++s) {
        scores[s] = std::exp(scores[s] - max_score);
        total += scores[s];
      }
      double* out = &attended[t][h * v_dim];
      for (int64_t s = 0; s <= t; ++s) {
        const double p = scores[s] / total;
        const double* v = &kv[s][h * kv_dim + nope];
        for (int64_t j = 0; j < v_dim; ++j) out[j] += p * v[j];
      }
    }
  }
  return Linear(ckpt, LayerTensor(layer, "self_attn.o_proj"), attended);
}

// Indices of the K largest VALUES, best first; ties go to the lower index.
std::vector<int64_t> TopK(const Vector& values, int64_t k) {
  std::vector<int64_t> order(values.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return values[a] > values[b]; });
  order.resize(k);
  return order;
}

struct Route {
  std::vector<int64_t> experts;  // [top_k]
  Vector weights;                // [top_k]
};

// MoEGate.forward for one token: router LOGITS [n_routed_experts] -> experts and weights.
// BIAS is e_score_correction_bias (noaux_tc only).
Route Gate(const ModelConfig& c, const Vector& logits, const Vector& bias) {
  const int64_t n = c.n_routed_experts;
  Vector scores(n);
  if (c.scoring_func == ScoringFunc::kSoftmax) {
    const double max_logit = *std::max_element(logits.begin(), logits.end());
    double total = 0.0;
    for (int64_t e = 0; e < n; ++e) {
      scores[e] = std::exp(logits[e] - max_logit);
      total += scores[e];
    }
    for (double& s : scores) s /= total;
  } else {
    for (int64_t e = 0; e < n; ++e) scores[e] = 1.0 / (1.0 + std::exp(-logits[e]));
  }

  // The values experts are chosen by; under noaux_tc the bias steers the choice only.
  Vector choice = scores;
  if (c.topk_method == TopkMethod::kNoauxTc) {
    for (int64_t e = 0; e < n; ++e) choice[e] += bias[e];
  }
  if (c.topk_method != TopkMethod::kGreedy) {
    const int64_t per_group = n / c.n_group;
    Vector group_score(c.n_group);
    for (int64_t g = 0; g < c.n_group; ++g) {
      Vector members(choice.begin() + g * per_group, choice.begin() + (g + 1) * per_group);
      std::sort(members.begin(), members.end(), std::greater<double>());
      // group_limited_greedy ranks a group by its best expert, noaux_tc by its best two.
      group_score[g] = c.topk_method == TopkMethod::kGroupLimitedGreedy ? members[0]
                                                                        : members[0] + members[1];
    }
    std::vector<bool> kept(c.n_group, false);
    for (int64_t g : TopK(group_score, c.topk_group)) kept[g] = true;
    for (int64_t e = 0; e < n; ++e) {
      if (!kept[e / per_group]) choice[e] = -std::numeric_limits<double>::infinity();
    }
  }

  Route route;
  route.experts = TopK(choice, c.num_experts_per_tok);
  for (int64_t e : route.experts) route.weights.push_back(scores[e]);  // never the bias
  const bool normalise = c.num_experts_per_tok > 1 && c.norm_topk_prob;
  if (normalise) {
    double total = 0.0;
    for (double w : route.weights) total += w;
    for (double& w : route.weights) w /= total + 1e-20;
  }
  // V3 always scales; V2 scales only the weights it did not normalise.
  if (c.model_type == "deepseek_v3" || !normalise) {
    for (double& w : route.weights) w *= c.routed_scaling_factor;
  }
  return route;
}

// DeepseekV2MoE: routed experts weighted by the gate plus the shared experts. Each
// expert runs only on the tokens that chose it. Adds each expert's token count to COUNTS.
Rows Moe(const Checkpoint& ckpt, int64_t layer, const Rows& xs, std::vector<int64_t>* counts) {
  const ModelConfig& c = ckpt.config();
  const int64_t tokens = static_cast<int64_t>(xs.size());
  const Rows logits = Linear(ckpt, LayerTensor(layer, "mlp.gate"), xs);  // [tokens][n_routed]
  Vector bias;
  if (c.topk_method == TopkMethod::kNoauxTc) {
    bias = LoadVector(ckpt, "model.layers." + std::to_string(layer) + ".mlp.gate.e_score_correction_bias");
  }

  // For each expert, the tokens that chose it and their weights.
  std::vector<std::vector<std::pair<int64_t, double>>> chosen_by(c.n_routed_experts);
  for (int64_t t = 0; t < tokens; ++t) {
    const Route route = Gate(c, logits[t], bias);
    for (size_t k = 0; k < route.experts.size(); ++k) {
      chosen_by[route.experts[k]].push_back({t, route.weights[k]});
    }
  }

  Rows out(tokens, Vector(c.hidden_size, 0.0));
  counts->assign(c.n_routed_experts, 0);
  for (int64_t e = 0; e < c.n_routed_experts; ++e) {
    (*counts)[e] = static_cast<int64_t>(chosen_by[e].size());
    if (chosen_by[e].empty()) continue;
    Rows inputs;
    for (const auto& [t, w] : chosen_by[e]) inputs.push_back(xs[t]);
    const Rows ys = Mlp(ckpt, layer, "mlp.experts." + std::to_string(e), inputs);
    for (size_t i = 0; i < ys.size(); ++i) {
      const auto& [t, w] = chosen_by[e][i];
      for (int64_t j = 0; j < c.hidden_size; ++j) out[t][j] += w * ys[i][j];
    }
  }
  if (c.n_shared_experts > 0) {
    const Rows shared = Mlp(ckpt, layer, "mlp.shared_experts", xs);
    for (int64_t t = 0; t < tokens; ++t) {
      for (int64_t j = 0; j < c.hidden_size; ++j) out[t][j] += shared[t][j];
    }
  }
  return out;
}

void AddInPlace(Rows* hidden, const Rows& delta) {
  for (size_t t = 0; t < hidden->size(); ++t) {
    for (size_t j = 0; j < (*hidden)[t].size(); ++j) (*hidden)[t][j] += delta[t][j];
  }
}

}  // namespace

ReferenceOutput Forward(const Checkpoint& checkpoint, const std::vector<int64_t>& tokens) {
  const ModelConfig& c = checkpoint.config();
  const TensorView& embed = checkpoint.Get("model.embed_tokens.weight");

  Rows hidden;  // [tokens][hidden_size]: the residual stream
  for (int64_t token : tokens) {
    if (token < 0 || token >= c.vocab_size) Fail("token " + std::to_string(token) + " out of range");
    Vector row(c.hidden_size);
    for (int64_t j = 0; j < c.hidden_size; ++j) row[j] = Element(embed, token * c.hidden_size + j);
    hidden.push_back(std::move(row));
  }

  const Rotary rotary = MakeRotary(c);
  ReferenceOutput output;
  output.expert_counts.resize(c.num_hidden_layers);
  for (int64_t layer = 0; layer < c.num_hidden_layers; ++layer) {
    const Rows attn_in = RmsNorm(checkpoint, LayerTensor(layer, "input_layernorm"), hidden);
    AddInPlace(&hidden, Attention(checkpoint, layer, rotary, attn_in));

    const Rows mlp_in = RmsNorm(checkpoint, LayerTensor(layer, "post_attention_layernorm"), hidden);
    const bool moe = c.n_routed_experts > 0 && layer >= c.first_k_dense_replace &&
                     layer % c.moe_layer_freq == 0;
    if (moe) {
      AddInPlace(&hidden, Moe(checkpoint, layer, mlp_in, &output.expert_counts[layer]));
    } else {
      AddInPlace(&hidden, Mlp(checkpoint, layer, "mlp", mlp_in));
    }
  }

  const Rows final_hidden = RmsNorm(checkpoint, "model.norm.weight", hidden);
  output.logits = Linear(
      checkpoint, c.tie_word_embeddings ? "model.embed_tokens.weight" : "lm_head.weight", final_hidden);
  return output;
}

}  // namespace epic::reference
