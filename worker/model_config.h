// ModelConfig: the parts of a Hugging Face DeepSeek config.json that change the math,
// parsed once and validated. Anything that would change the math and is not
// supported is refused with an error naming the field, never silently ignored.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "common/status.h"

namespace epic {

enum class TopkMethod { kGreedy, kGroupLimitedGreedy, kNoauxTc };
enum class ScoringFunc { kSoftmax, kSigmoid };

const char* TopkMethodName(TopkMethod method);

struct RopeScaling {
  enum class Type { kNone, kLinear, kYarn };
  Type type = Type::kNone;
  double factor = 1.0;
  double mscale_all_dim = 0.0;  // any type: scales the softmax (see SoftmaxScale)
  // YaRN only.
  int64_t original_max_position_embeddings = 4096;
  double beta_fast = 32.0;
  double beta_slow = 1.0;
  double mscale = 1.0;
};

struct ModelConfig {
  std::string model_type;  // "deepseek_v2" or "deepseek_v3"
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;      // dense MLP layers
  int64_t moe_intermediate_size = 0;  // each routed expert; shared = this * n_shared_experts
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t q_lora_rank = 0;  // 0: no query LoRA (V2-Lite's `q_lora_rank: null`)
  int64_t kv_lora_rank = 0;
  int64_t qk_nope_head_dim = 0;
  int64_t qk_rope_head_dim = 0;
  int64_t v_head_dim = 0;

  int64_t n_routed_experts = 0;  // 0: every layer is dense
  int64_t n_shared_experts = 0;
  int64_t num_experts_per_tok = 0;
  int64_t n_group = 1;
  int64_t topk_group = 1;
  int64_t moe_layer_freq = 1;
  int64_t first_k_dense_replace = 0;
  TopkMethod topk_method = TopkMethod::kGreedy;
  ScoringFunc scoring_func = ScoringFunc::kSoftmax;
  bool norm_topk_prob = false;
  double routed_scaling_factor = 1.0;

  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;
  int64_t max_position_embeddings = 0;
  bool tie_word_embeddings = false;
  std::vector<int64_t> eos_token_ids;

  int64_t q_head_dim() const { return qk_nope_head_dim + qk_rope_head_dim; }
  // Values cached per token per layer: c_kv and k_pe.
  int64_t latent_dim() const { return kv_lora_rank + qk_rope_head_dim; }
  bool IsMoeLayer(int64_t layer) const {
    return n_routed_experts > 0 && layer >= first_k_dense_replace && layer % moe_layer_freq == 0;
  }
  // DeepSeek-V2 multiplies by routed_scaling_factor only when it does not
  // renormalise the top-k weights; V3 always does.
  bool ScalesAfterNormalising() const { return model_type == "deepseek_v3"; }
  // q_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 when rope_scaling is set.
  double SoftmaxScale() const;
  // One line: "deepseek_v2, 27 layers, hidden 2048, 16 heads, 64 routed experts top-6, ...".
  std::string Summary() const;
};

// YaRN's attention-temperature factor: 0.1 * mscale * ln(scale) + 1 for scale > 1.
double YarnMscale(double scale, double mscale);

// Parses config.json text; `source` names the file in error messages.
StatusOr<ModelConfig> ParseModelConfig(const std::string& json_text, const std::string& source);
// Reads DIR/config.json.
StatusOr<ModelConfig> LoadModelConfig(const std::filesystem::path& model_dir);

}  // namespace epic
