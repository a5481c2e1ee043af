#include "coordinator/cache_footprint.h"

#include <algorithm>
#include <string>

namespace epic::coordinator {

v1::CacheFootprint CacheFootprintOf(const v1::ModelSummary& m, int64_t bytes_per_value, int64_t budget_tokens,
                                    int ranks, const std::string& attention) {
  v1::CacheFootprint f;
  f.set_ranks(ranks);
  f.set_attention(attention);
  const int64_t layers = m.num_hidden_layers();
  const int64_t latent = m.kv_lora_rank() + m.qk_rope_head_dim();
  const int64_t per_head = m.qk_nope_head_dim() + m.qk_rope_head_dim() + m.v_head_dim();
  const int64_t heads = m.num_attention_heads();
  f.set_bytes_per_value(bytes_per_value);
  f.set_budget_bytes(budget_tokens * layers * latent * bytes_per_value);
  const int64_t gqa = heads >= 16 ? 8 : std::max<int64_t>(1, heads / 2);
  struct Form {
    std::string name;
    int64_t kv_heads;
    int64_t values;
  };
  const Form forms[] = {{"MLA latent", 0, latent},
                        {"MHA", heads, heads * per_head},
                        {"GQA (" + std::to_string(gqa) + " KV heads)", gqa, gqa * per_head},
                        {"MQA", 1, per_head}};
  for (const Form& form : forms) {
    v1::AttentionCacheCost* c = f.add_forms();
    c->set_attention(form.name);
    c->set_kv_heads(form.kv_heads);
    c->set_values_per_token_per_layer(form.values);
    c->set_bytes_per_token_per_layer(form.values * bytes_per_value);
    const int64_t per_token = form.values * bytes_per_value * layers;
    c->set_tokens_in_budget(per_token > 0 ? f.budget_bytes() / per_token : 0);
    c->set_cluster_tokens_tp(c->tokens_in_budget());
    c->set_cluster_tokens_dp(c->tokens_in_budget() * ranks);
    c->set_fraction_of_mha(heads * per_head > 0 ? static_cast<double>(form.values) / static_cast<double>(heads * per_head)
                                                : 0.0);
  }
  return f;
}

nlohmann::json CacheReport(const v1::CacheFootprint& f, int64_t block_size, int64_t blocks_per_rank,
                           int64_t blocks_in_use, int64_t blocks_total) {
  nlohmann::json forms = nlohmann::json::array();
  for (const v1::AttentionCacheCost& c : f.forms()) {
    forms.push_back({{"attention", c.attention()},
                     {"kv_heads", c.kv_heads()},
                     {"bytes_per_token_per_layer", c.bytes_per_token_per_layer()},
                     {"fraction_of_mha", c.fraction_of_mha()},
                     {"tokens_per_rank", c.tokens_in_budget()},
                     {"cluster_tokens_tp", c.cluster_tokens_tp()},
                     {"cluster_tokens_dp", c.cluster_tokens_dp()}});
  }
  return {{"attention", f.attention()},     {"ranks", f.ranks()},
          {"block_size", block_size},       {"blocks_per_rank", blocks_per_rank},
          {"blocks_in_use", blocks_in_use}, {"blocks_total", blocks_total},
          {"bytes_per_value", f.bytes_per_value()}, {"budget_bytes_per_rank", f.budget_bytes()},
          {"forms", std::move(forms)}};
}

}  // namespace epic::coordinator
