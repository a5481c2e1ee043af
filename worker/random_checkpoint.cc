#include "worker/random_checkpoint.h"

#include <cmath>
#include <cstring>
#include <fstream>

#include "common/half.h"
#include "text/tokenizer_writer.h"

namespace epic {
namespace {

using nlohmann::json;

json BaseConfig() {
  return json{
      {"architectures", {"DeepseekV2ForCausalLM"}},
      {"model_type", "deepseek_v2"},
      {"hidden_act", "silu"},
      {"attention_bias", false},
      {"bos_token_id", 0},
      {"eos_token_id", 1},
      {"rms_norm_eps", 1e-6},
      {"rope_theta", 10000.0},
      {"rope_scaling", nullptr},
      {"max_position_embeddings", 4096},
      {"tie_word_embeddings", false},
      {"moe_layer_freq", 1},
      {"first_k_dense_replace", 1},
      {"scoring_func", "softmax"},
      {"norm_topk_prob", false},
      {"torch_dtype", "bfloat16"},
  };
}

uint64_t SplitMix64(uint64_t* state) {
  uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

uint64_t HashName(const std::string& name, uint64_t seed) {
  uint64_t h = 1469598103934665603ull ^ seed;
  for (unsigned char ch : name) h = (h ^ ch) * 1099511628211ull;
  return h;
}

// How a tensor's values are drawn: centre + uniform(-half_width, half_width).
struct Distribution {
  float centre = 0.0f;
  float half_width = 1.0f;
};

Distribution DistributionFor(const TensorSpec& spec) {
  const std::string& n = spec.name;
  auto ends_with = [&](const std::string& s) {
    return n.size() >= s.size() && n.compare(n.size() - s.size(), s.size(), s) == 0;
  };
  if (ends_with("norm.weight") || ends_with("layernorm.weight")) return {1.0f, 0.1f};
  if (ends_with("e_score_correction_bias")) return {0.0f, 0.1f};
  if (n == "model.embed_tokens.weight") return {0.0f, 1.0f};
  const double fan_in = static_cast<double>(spec.shape.back());
  return {0.0f, static_cast<float>(std::sqrt(3.0 / fan_in))};
}

void FillRandom(const TensorSpec& spec, uint64_t seed, std::byte* out) {
  const Distribution d = DistributionFor(spec);
  const int64_t numel = spec.nbytes() / DTypeSize(spec.dtype);
  const uint64_t base = HashName(spec.name, seed);
  constexpr int64_t kChunk = 1 << 16;  // a seed per chunk: the same values at any thread count
  const int64_t chunks = (numel + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < chunks; ++c) {
    uint64_t state = base ^ (static_cast<uint64_t>(c) * 0xd1342543de82ef95ull);
    const int64_t end = std::min(numel, (c + 1) * kChunk);
    for (int64_t i = c * kChunk; i < end; ++i) {
      const double u = static_cast<double>(SplitMix64(&state) >> 11) * 0x1.0p-53;  // [0, 1)
      const float v = d.centre + d.half_width * static_cast<float>(2.0 * u - 1.0);
      if (spec.dtype == DType::kF32) {
        std::memcpy(out + 4 * i, &v, 4);
      } else {
        // BF16, or F16 written through float: both round from the same float.
        uint16_t h;
        if (spec.dtype == DType::kBF16) {
          h = FloatToBf16(v);
        } else {
          h = FloatToF16(v);
        }
        std::memcpy(out + 2 * i, &h, 2);
      }
    }
  }
}

}  // namespace

std::vector<std::string> PresetNames() {
  return {"tiny", "v2-160", "v2-lite-shape", "v2-small-experts", "v3-tiny"};
}

StatusOr<json> PresetConfig(const std::string& name) {
  json c = BaseConfig();
  if (name == "tiny") {
    c.update(json{{"vocab_size", 256}, {"hidden_size", 64}, {"intermediate_size", 128},
                  {"moe_intermediate_size", 32}, {"num_hidden_layers", 3},
                  {"num_attention_heads", 4}, {"num_key_value_heads", 4}, {"q_lora_rank", 48},
                  {"kv_lora_rank", 32}, {"qk_nope_head_dim", 16}, {"qk_rope_head_dim", 8},
                  {"v_head_dim", 16}, {"n_routed_experts", 16}, {"n_shared_experts", 1},
                  {"num_experts_per_tok", 4}, {"n_group", 4}, {"topk_group", 2},
                  {"topk_method", "group_limited_greedy"}, {"routed_scaling_factor", 1.0}});
  } else if (name == "v2-160") {
    // DeepSeek-V2's routing exactly (160 routed + 2 shared, top-6 of 3 of 8 groups,
    // scaling 16, q LoRA, YaRN as V2 ships it) at small dimensions.
    c.update(json{{"vocab_size", 1024}, {"hidden_size", 128}, {"intermediate_size", 256},
                  {"moe_intermediate_size", 32}, {"num_hidden_layers", 3},
                  {"num_attention_heads", 4}, {"num_key_value_heads", 4}, {"q_lora_rank", 96},
                  {"kv_lora_rank", 64}, {"qk_nope_head_dim", 32}, {"qk_rope_head_dim", 16},
                  {"v_head_dim", 32}, {"n_routed_experts", 160}, {"n_shared_experts", 2},
                  {"num_experts_per_tok", 6}, {"n_group", 8}, {"topk_group", 3},
                  {"topk_method", "group_limited_greedy"}, {"routed_scaling_factor", 16.0},
                  {"max_position_embeddings", 163840},
                  {"rope_scaling", {{"type", "yarn"}, {"factor", 40}, {"beta_fast", 32},
                                    {"beta_slow", 1}, {"mscale", 0.707}, {"mscale_all_dim", 0.707},
                                    {"original_max_position_embeddings", 4096}}}});
  } else if (name == "v2-lite-shape") {
    // DeepSeek-V2-Lite's real layer dimensions; pick the depth with --layers.
    c.update(json{{"vocab_size", 102400}, {"hidden_size", 2048}, {"intermediate_size", 10944},
                  {"moe_intermediate_size", 1408}, {"num_hidden_layers", 27},
                  {"num_attention_heads", 16}, {"num_key_value_heads", 16}, {"q_lora_rank", nullptr},
                  {"kv_lora_rank", 512}, {"qk_nope_head_dim", 128}, {"qk_rope_head_dim", 64},
                  {"v_head_dim", 128}, {"n_routed_experts", 64}, {"n_shared_experts", 2},
                  {"num_experts_per_tok", 6}, {"n_group", 1}, {"topk_group", 1},
                  {"topk_method", "greedy"}, {"routed_scaling_factor", 1.0},
                  {"bos_token_id", 100000}, {"eos_token_id", 100001},
                  {"max_position_embeddings", 163840},
                  {"rope_scaling", {{"type", "yarn"}, {"factor", 40}, {"beta_fast", 32},
                                    {"beta_slow", 1}, {"mscale", 0.707}, {"mscale_all_dim", 0.707},
                                    {"original_max_position_embeddings", 4096}}}});
  } else if (name == "v2-small-experts") {
    // DeepSeek-V2's routing over many small experts (0.94B parameters): the shape where
    // per-expert overheads, not bandwidth, decide CPU speed.
    c.update(json{{"vocab_size", 8000}, {"hidden_size", 1024}, {"intermediate_size", 2816},
                  {"moe_intermediate_size", 256}, {"num_hidden_layers", 8}, {"first_k_dense_replace", 1},
                  {"num_attention_heads", 16}, {"num_key_value_heads", 16}, {"q_lora_rank", 384},
                  {"kv_lora_rank", 256}, {"qk_nope_head_dim", 64}, {"qk_rope_head_dim", 32},
                  {"v_head_dim", 64}, {"n_routed_experts", 160}, {"n_shared_experts", 2},
                  {"num_experts_per_tok", 6}, {"n_group", 8}, {"topk_group", 3},
                  {"topk_method", "group_limited_greedy"}, {"routed_scaling_factor", 16.0},
                  {"max_position_embeddings", 16384}});
  } else if (name == "v3-tiny") {
    // DeepSeek-V3's routing (sigmoid scores, noaux_tc with a correction bias).
    c.update(json{{"architectures", {"DeepseekV3ForCausalLM"}}, {"model_type", "deepseek_v3"},
                  {"vocab_size", 512}, {"hidden_size", 64}, {"intermediate_size", 160},
                  {"moe_intermediate_size", 24}, {"num_hidden_layers", 3},
                  {"num_attention_heads", 4}, {"num_key_value_heads", 4}, {"q_lora_rank", 48},
                  {"kv_lora_rank", 32}, {"qk_nope_head_dim", 16}, {"qk_rope_head_dim", 8},
                  {"v_head_dim", 16}, {"n_routed_experts", 32}, {"n_shared_experts", 1},
                  {"num_experts_per_tok", 4}, {"n_group", 4}, {"topk_group", 2},
                  {"topk_method", "noaux_tc"}, {"scoring_func", "sigmoid"},
                  {"norm_topk_prob", true}, {"routed_scaling_factor", 2.5}});
  } else {
    std::string known;
    for (const std::string& n : PresetNames()) known += (known.empty() ? "" : ", ") + n;
    return InvalidArgumentError("unknown preset '" + name + "' (known: " + known + ")");
  }
  return c;
}

Status WriteRandomCheckpoint(const json& config, const std::filesystem::path& out,
                             const RandomCheckpointOptions& options) {
  EPIC_ASSIGN_OR_RETURN(ModelConfig parsed, ParseModelConfig(config.dump(), "config"));
  if (options.dtype != DType::kBF16 && options.dtype != DType::kF16 && options.dtype != DType::kF32) {
    return InvalidArgumentError("random checkpoints are BF16, F16 or F32");
  }
  if (options.shards < 1) return InvalidArgumentError("shards must be at least 1");
  std::error_code ec;
  std::filesystem::create_directories(out, ec);
  if (ec) return NotFoundError(out.string() + ": cannot create: " + ec.message());

  json written = config;
  written["torch_dtype"] = options.dtype == DType::kF32   ? "float32"
                           : options.dtype == DType::kF16 ? "float16"
                                                          : "bfloat16";
  {
    std::ofstream f(out / "config.json");
    f << written.dump(2) << "\n";
    if (!f) return DataLossError((out / "config.json").string() + ": write failed");
  }

  // A tokenizer sized to the vocabulary, so that the model takes text end to end; a
  // vocabulary too small for byte-level BPE (under 250 ids) gets none.
  const int64_t bos = config.value("bos_token_id", int64_t{0});
  const int64_t eos = parsed.eos_token_ids.empty() ? config.value("eos_token_id", int64_t{1}) : parsed.eos_token_ids[0];
  if (auto tokenizer = text::MakeByteLevelTokenizer(parsed.vocab_size, bos, eos); tokenizer.ok()) {
    EPIC_RETURN_IF_ERROR(text::WriteTokenizerFiles(*tokenizer, out));
  }

  std::vector<TensorSpec> all;
  int64_t total = 0;
  for (const ExpectedTensor& e : ExpectedTensors(parsed)) {
    // The correction bias is F32 in DeepSeek-V3's own checkpoints.
    const bool bias = e.name.find("e_score_correction_bias") != std::string::npos;
    all.push_back({e.name, bias ? DType::kF32 : options.dtype, e.shape});
    total += all.back().nbytes();
  }
  const int shards = static_cast<int>(std::min<int64_t>(options.shards, all.size()));
  int64_t done = 0;
  json weight_map = json::object();
  for (int s = 0; s < shards; ++s) {
    // Contiguous runs of tensors, in layer order, as HF shards are.
    const size_t begin = all.size() * s / shards;
    const size_t end = all.size() * (s + 1) / shards;
    std::vector<TensorSpec> specs(all.begin() + begin, all.begin() + end);
    char name[64];
    if (shards == 1) {
      std::snprintf(name, sizeof name, "model.safetensors");
    } else {
      std::snprintf(name, sizeof name, "model-%05d-of-%05d.safetensors", s + 1, shards);
    }
    for (const TensorSpec& t : specs) weight_map[t.name] = name;
    EPIC_RETURN_IF_ERROR(WriteSafetensors(
        out / name, specs,
        [&](size_t i, std::byte* bytes) {
          FillRandom(specs[i], options.seed, bytes);
          done += specs[i].nbytes();
          if (options.progress) options.progress(done, total);
        },
        {{"format", "pt"}}));
  }
  if (shards > 1) {
    json index = {{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}};
    std::ofstream f(out / "model.safetensors.index.json");
    f << index.dump(2) << "\n";
    if (!f) return DataLossError((out / "model.safetensors.index.json").string() + ": write failed");
  }
  return OkStatus();
}

}  // namespace epic
