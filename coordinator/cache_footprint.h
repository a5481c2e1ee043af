// What MLA's latent cache saves for the model being served, as `epic info` shows it.
#pragma once

#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

#include "epic.pb.h"

namespace epic::coordinator {

// MODEL's cache per token and layer under MLA's latent form, MHA, GQA (8 key/value heads,
// or half the heads of a model with fewer than 16) and MQA, with keys as wide as the
// model's (qk_nope + qk_rope) and values v_head_dim; at BYTES_PER_VALUE, and in the bytes
// of a latent cache of BUDGET_TOKENS tokens over every layer on each of RANKS ranks,
// whose job runs ATTENTION ("tp" or "dp").
v1::CacheFootprint CacheFootprintOf(const v1::ModelSummary& model, int64_t bytes_per_value, int64_t budget_tokens,
                                    int ranks, const std::string& attention);

// The load report's "cache" section: FOOTPRINT, the budget of BLOCKS_PER_RANK blocks of
// BLOCK_SIZE tokens, and how many of the BLOCKS_TOTAL (over every cache) are in use now.
nlohmann::json CacheReport(const v1::CacheFootprint& footprint, int64_t block_size, int64_t blocks_per_rank,
                           int64_t blocks_in_use, int64_t blocks_total);

}  // namespace epic::coordinator
