#include "worker/model_config.h"

#include <cmath>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

namespace epic {
namespace {

using nlohmann::json;

// Reads config fields with messages that name the file and the field.
class FieldReader {
 public:
  FieldReader(const json& root, const std::string& source) : root_(root), source_(source) {}

  Status Error(const std::string& field, const std::string& what) const {
    return InvalidArgumentError(source_ + ": field '" + field + "' " + what);
  }
  Status Unsupported(const std::string& field, const std::string& what) const {
    return UnimplementedError(source_ + ": field '" + field + "' " + what);
  }
  bool Has(const std::string& field) const {
    return root_.contains(field) && !root_.at(field).is_null();
  }

  // Sizes and counts past this are refused before anything is sized from them: a typo
  // like 1e9 layers would otherwise allocate until memory runs out.
  static constexpr int64_t kMaxSize = int64_t{1} << 24;

  // A required integer in [min_value, max_value].
  Status Int(const std::string& field, int64_t min_value, int64_t* out, int64_t max_value = kMaxSize) const {
    if (!root_.contains(field)) return Error(field, "is missing");
    return IntValue(field, root_.at(field), min_value, max_value, out);
  }
  // An optional integer: absent or null leaves *out unchanged.
  Status OptionalInt(const std::string& field, int64_t min_value, int64_t* out, int64_t max_value = kMaxSize) const {
    if (!Has(field)) return OkStatus();
    return IntValue(field, root_.at(field), min_value, max_value, out);
  }
  Status OptionalDouble(const std::string& field, double* out) const {
    if (!Has(field)) return OkStatus();
    const json& v = root_.at(field);
    if (!v.is_number()) return Error(field, "must be a number, not " + v.dump());
    *out = v.get<double>();
    if (!std::isfinite(*out)) return Error(field, "must be finite");
    return OkStatus();
  }
  Status OptionalBool(const std::string& field, bool* out) const {
    if (!Has(field)) return OkStatus();
    const json& v = root_.at(field);
    if (!v.is_boolean()) return Error(field, "must be true or false, not " + v.dump());
    *out = v.get<bool>();
    return OkStatus();
  }
  Status OptionalString(const std::string& field, std::string* out) const {
    if (!Has(field)) return OkStatus();
    const json& v = root_.at(field);
    if (!v.is_string()) return Error(field, "must be a string, not " + v.dump());
    *out = v.get<std::string>();
    return OkStatus();
  }

 private:
  Status IntValue(const std::string& field, const json& v, int64_t min_value, int64_t max_value, int64_t* out) const {
    if (!v.is_number_integer() || (v.is_number_unsigned() && v.get<uint64_t>() > uint64_t{INT64_MAX})) {
      return Error(field, "must be an integer, not " + v.dump());
    }
    const int64_t value = v.get<int64_t>();
    if (value < min_value) {
      return Error(field, "must be at least " + std::to_string(min_value) + ", not " +
                              std::to_string(value));
    }
    if (value > max_value) {
      return Error(field, "is " + std::to_string(value) + ", more than epic accepts (" + std::to_string(max_value) + ")");
    }
    *out = value;
    return OkStatus();
  }

  const json& root_;
  const std::string& source_;
};

Status ParseRopeScaling(const json& root, const std::string& source, RopeScaling* out) {
  if (!root.contains("rope_scaling") || root.at("rope_scaling").is_null()) return OkStatus();
  const json& rs = root.at("rope_scaling");
  if (!rs.is_object()) {
    return InvalidArgumentError(source + ": field 'rope_scaling' must be an object or null");
  }
  FieldReader r(rs, source);
  std::string type;
  EPIC_RETURN_IF_ERROR(r.OptionalString("type", &type));
  if (type.empty()) EPIC_RETURN_IF_ERROR(r.OptionalString("rope_type", &type));
  if (type == "yarn") {
    out->type = RopeScaling::Type::kYarn;
  } else if (type == "linear") {
    out->type = RopeScaling::Type::kLinear;
  } else if (type == "default" || type.empty()) {
    return OkStatus();
  } else {
    return UnimplementedError(source + ": rope_scaling type '" + type +
                              "' is not supported (supported: yarn, linear)");
  }
  if (!r.Has("factor")) {
    return InvalidArgumentError(source + ": rope_scaling.factor is missing");
  }
  EPIC_RETURN_IF_ERROR(r.OptionalDouble("factor", &out->factor));
  if (!(out->factor > 0)) {
    return InvalidArgumentError(source + ": rope_scaling.factor must be positive");
  }
  // The attention scale reads mscale_all_dim under any scaling type, as HF's code does.
  EPIC_RETURN_IF_ERROR(r.OptionalDouble("mscale_all_dim", &out->mscale_all_dim));
  if (out->type == RopeScaling::Type::kYarn) {
    EPIC_RETURN_IF_ERROR(r.OptionalInt("original_max_position_embeddings", 1,
                                       &out->original_max_position_embeddings));
    EPIC_RETURN_IF_ERROR(r.OptionalDouble("beta_fast", &out->beta_fast));
    EPIC_RETURN_IF_ERROR(r.OptionalDouble("beta_slow", &out->beta_slow));
    EPIC_RETURN_IF_ERROR(r.OptionalDouble("mscale", &out->mscale));
  }
  return OkStatus();
}

}  // namespace

const char* TopkMethodName(TopkMethod method) {
  switch (method) {
    case TopkMethod::kGreedy: return "greedy";
    case TopkMethod::kGroupLimitedGreedy: return "group_limited_greedy";
    case TopkMethod::kNoauxTc: return "noaux_tc";
  }
  return "?";
}

double YarnMscale(double scale, double mscale) {
  if (scale <= 1.0) return 1.0;
  return 0.1 * mscale * std::log(scale) + 1.0;
}

double ModelConfig::SoftmaxScale() const {
  double scale = 1.0 / std::sqrt(static_cast<double>(q_head_dim()));
  if (rope_scaling.type != RopeScaling::Type::kNone && rope_scaling.mscale_all_dim != 0.0) {
    const double m = YarnMscale(rope_scaling.factor, rope_scaling.mscale_all_dim);
    scale *= m * m;
  }
  return scale;
}

std::string ModelConfig::Summary() const {
  std::ostringstream s;
  s << model_type << ", " << num_hidden_layers << " layers, hidden " << hidden_size << ", "
    << num_attention_heads << " heads, kv_lora " << kv_lora_rank << ", q_lora "
    << (q_lora_rank ? std::to_string(q_lora_rank) : std::string("none"));
  if (n_routed_experts > 0) {
    s << ", " << n_routed_experts << " routed + " << n_shared_experts << " shared experts, top-"
      << num_experts_per_tok << " " << TopkMethodName(topk_method) << " (" << n_group
      << " groups, " << topk_group << " per token)";
  }
  s << ", vocab " << vocab_size;
  return s.str();
}

StatusOr<ModelConfig> ParseModelConfig(const std::string& json_text, const std::string& source) {
  json root;
  try {
    root = json::parse(json_text);
  } catch (const json::exception& e) {  // parse errors, and numbers past a double (1e400)
    return InvalidArgumentError(source + ": not valid JSON: " + e.what());
  }
  if (!root.is_object()) return InvalidArgumentError(source + ": expected a JSON object");
  FieldReader r(root, source);
  ModelConfig c;

  EPIC_RETURN_IF_ERROR(r.OptionalString("model_type", &c.model_type));
  if (c.model_type != "deepseek_v2" && c.model_type != "deepseek_v3") {
    return r.Unsupported("model_type", "is '" + c.model_type +
                                           "'; epic serves deepseek_v2 and deepseek_v3");
  }
  if (r.Has("quantization_config")) {
    return r.Unsupported("quantization_config",
                         "is set: quantised (FP8) checkpoints are not supported yet");
  }
  std::string act = "silu";
  EPIC_RETURN_IF_ERROR(r.OptionalString("hidden_act", &act));
  if (act != "silu") return r.Unsupported("hidden_act", "is '" + act + "'; only silu is supported");
  bool attention_bias = false;
  EPIC_RETURN_IF_ERROR(r.OptionalBool("attention_bias", &attention_bias));
  if (attention_bias) return r.Unsupported("attention_bias", "is true; only false is supported");

  EPIC_RETURN_IF_ERROR(r.Int("vocab_size", 1, &c.vocab_size));
  EPIC_RETURN_IF_ERROR(r.Int("hidden_size", 1, &c.hidden_size));
  EPIC_RETURN_IF_ERROR(r.Int("intermediate_size", 1, &c.intermediate_size));
  EPIC_RETURN_IF_ERROR(r.Int("num_hidden_layers", 1, &c.num_hidden_layers, /*max_value=*/4096));
  EPIC_RETURN_IF_ERROR(r.Int("num_attention_heads", 1, &c.num_attention_heads));
  EPIC_RETURN_IF_ERROR(r.Int("kv_lora_rank", 1, &c.kv_lora_rank));
  EPIC_RETURN_IF_ERROR(r.Int("qk_nope_head_dim", 1, &c.qk_nope_head_dim));
  EPIC_RETURN_IF_ERROR(r.Int("qk_rope_head_dim", 2, &c.qk_rope_head_dim));
  EPIC_RETURN_IF_ERROR(r.Int("v_head_dim", 1, &c.v_head_dim));
  if (c.qk_rope_head_dim % 2 != 0) return r.Error("qk_rope_head_dim", "must be even");
  if (!root.contains("q_lora_rank")) {
    return r.Error("q_lora_rank", "is missing (write null for no query LoRA)");
  }
  EPIC_RETURN_IF_ERROR(r.OptionalInt("q_lora_rank", 1, &c.q_lora_rank));

  // Fields a config leaves out take the defaults of its model type's HF config class.
  std::string method = "greedy";
  std::string scoring = "softmax";
  if (c.model_type == "deepseek_v3") {
    c.n_group = 8;
    c.topk_group = 4;
    c.first_k_dense_replace = 3;
    c.norm_topk_prob = true;
    c.routed_scaling_factor = 2.5;
    method = "noaux_tc";
    scoring = "sigmoid";
  }
  EPIC_RETURN_IF_ERROR(r.OptionalInt("n_routed_experts", 1, &c.n_routed_experts, /*max_value=*/65536));
  if (c.n_routed_experts > 0) {
    EPIC_RETURN_IF_ERROR(r.Int("moe_intermediate_size", 1, &c.moe_intermediate_size));
    EPIC_RETURN_IF_ERROR(r.Int("num_experts_per_tok", 1, &c.num_experts_per_tok));
    EPIC_RETURN_IF_ERROR(r.OptionalInt("n_shared_experts", 0, &c.n_shared_experts));
    EPIC_RETURN_IF_ERROR(r.OptionalInt("n_group", 1, &c.n_group));
    EPIC_RETURN_IF_ERROR(r.OptionalInt("topk_group", 1, &c.topk_group));
    EPIC_RETURN_IF_ERROR(r.OptionalInt("moe_layer_freq", 1, &c.moe_layer_freq));
    EPIC_RETURN_IF_ERROR(r.OptionalInt("first_k_dense_replace", 0, &c.first_k_dense_replace));
    EPIC_RETURN_IF_ERROR(r.OptionalBool("norm_topk_prob", &c.norm_topk_prob));
    EPIC_RETURN_IF_ERROR(r.OptionalDouble("routed_scaling_factor", &c.routed_scaling_factor));

    EPIC_RETURN_IF_ERROR(r.OptionalString("topk_method", &method));
    if (method == "greedy" || method == "gready") {  // "gready": HF DeepseekV2Config's default
      c.topk_method = TopkMethod::kGreedy;
    } else if (method == "group_limited_greedy") {
      c.topk_method = TopkMethod::kGroupLimitedGreedy;
    } else if (method == "noaux_tc") {
      c.topk_method = TopkMethod::kNoauxTc;
    } else {
      return r.Unsupported("topk_method", "is '" + method +
                                              "' (supported: greedy, group_limited_greedy, noaux_tc)");
    }
    EPIC_RETURN_IF_ERROR(r.OptionalString("scoring_func", &scoring));
    if (scoring == "softmax") {
      c.scoring_func = ScoringFunc::kSoftmax;
    } else if (scoring == "sigmoid") {
      c.scoring_func = ScoringFunc::kSigmoid;
    } else {
      return r.Unsupported("scoring_func", "is '" + scoring + "' (supported: softmax, sigmoid)");
    }

    if (c.num_experts_per_tok > c.n_routed_experts) {
      return r.Error("num_experts_per_tok", "exceeds n_routed_experts");
    }
    if (c.n_routed_experts % c.n_group != 0) {
      return r.Error("n_group", "must divide n_routed_experts (" +
                                    std::to_string(c.n_routed_experts) + ")");
    }
    if (c.topk_group > c.n_group) return r.Error("topk_group", "exceeds n_group");
    const int64_t per_group = c.n_routed_experts / c.n_group;
    if (c.topk_method != TopkMethod::kGreedy && c.topk_group * per_group < c.num_experts_per_tok) {
      return r.Error("topk_group", "leaves fewer experts than num_experts_per_tok to choose from");
    }
    if (c.topk_method == TopkMethod::kNoauxTc && per_group < 2) {
      return r.Error("n_group", "leaves fewer than 2 experts a group, which noaux_tc ranks by "
                                "the sum of their top two");
    }
    if (!(c.routed_scaling_factor > 0)) return r.Error("routed_scaling_factor", "must be positive");
    // Each expert of each MoE layer is three tensors, all listed before any is read: past
    // about a million (as many as the largest safetensors header epic reads can name) the
    // list alone would take gigabytes. DeepSeek-V3 has 58 * 256 experts.
    constexpr int64_t kMaxExperts = int64_t{1} << 18;
    int64_t moe_layers = 0;
    for (int64_t l = 0; l < c.num_hidden_layers; ++l) moe_layers += c.IsMoeLayer(l);
    if (moe_layers * c.n_routed_experts > kMaxExperts) {
      return r.Error("n_routed_experts", "is " + std::to_string(c.n_routed_experts) + " in each of " +
                                             std::to_string(moe_layers) + " MoE layers, " +
                                             std::to_string(moe_layers * c.n_routed_experts) +
                                             " experts in all: more than epic accepts (" + std::to_string(kMaxExperts) + ")");
    }
  }

  EPIC_RETURN_IF_ERROR(r.OptionalDouble("rms_norm_eps", &c.rms_norm_eps));
  if (!(c.rms_norm_eps > 0)) return r.Error("rms_norm_eps", "must be positive");
  EPIC_RETURN_IF_ERROR(r.OptionalDouble("rope_theta", &c.rope_theta));
  if (!(c.rope_theta > 0)) return r.Error("rope_theta", "must be positive");
  EPIC_RETURN_IF_ERROR(r.OptionalInt("max_position_embeddings", 1, &c.max_position_embeddings));
  if (c.max_position_embeddings == 0) c.max_position_embeddings = 2048;  // HF's default
  EPIC_RETURN_IF_ERROR(r.OptionalBool("tie_word_embeddings", &c.tie_word_embeddings));
  EPIC_RETURN_IF_ERROR(ParseRopeScaling(root, source, &c.rope_scaling));

  if (r.Has("eos_token_id")) {
    const json& eos = root.at("eos_token_id");
    auto add = [&](const json& v) -> Status {
      if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() >= c.vocab_size) {
        return r.Error("eos_token_id", "must hold token ids below vocab_size, not " + v.dump());
      }
      c.eos_token_ids.push_back(v.get<int64_t>());
      return OkStatus();
    };
    if (eos.is_array()) {
      for (const json& v : eos) EPIC_RETURN_IF_ERROR(add(v));
    } else {
      EPIC_RETURN_IF_ERROR(add(eos));
    }
  }
  return c;
}

StatusOr<ModelConfig> LoadModelConfig(const std::filesystem::path& model_dir) {
  const std::filesystem::path path = model_dir / "config.json";
  std::ifstream in(path);
  if (!in) return NotFoundError(path.string() + ": cannot open (is this a model directory?)");
  std::stringstream text;
  text << in.rdbuf();
  return ParseModelConfig(text.str(), path.string());
}

}  // namespace epic
