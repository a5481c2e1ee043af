#include "worker/step_stats.h"

namespace epic {

std::vector<std::vector<int64_t>> JobStepStats::ExpertTokens(const parallel::ExpertPlacement& placement,
                                                             int64_t num_experts) const {
  std::vector<std::vector<int64_t>> out(moe_layers.size(), std::vector<int64_t>(static_cast<size_t>(num_experts), 0));
  for (size_t r = 0; r < slot_tokens.size(); ++r) {
    for (size_t i = 0; i < moe_layers.size(); ++i) {
      const auto& held = placement.slots(moe_layers[i], static_cast<int>(r));
      for (size_t s = 0; s < held.size() && s < slot_tokens[r][i].size(); ++s) {
        out[i][static_cast<size_t>(held[s])] += slot_tokens[r][i][s];
      }
    }
  }
  return out;
}

StatusOr<JobStepStats> GatherStepStats(Model& model, const ExpertCounts& counts) {
  const parallel::ExpertPlacement& placement = model.placement();
  const int ranks = model.comm().size();
  JobStepStats out;
  for (int64_t l = 0; l < placement.num_layers(); ++l) {
    if (placement.is_moe_layer(l)) out.moe_layers.push_back(l);
  }
  // Per rank, as doubles: per MoE layer its slots' tokens, then 6 exchange figures.
  auto values_of = [&](int r) {
    size_t n = 6 * out.moe_layers.size();
    for (int64_t l : out.moe_layers) n += placement.slots(l, r).size();
    return n;
  };
  std::vector<double> mine;
  const parallel::ExchangeStats none;
  for (int64_t l : out.moe_layers) {
    const size_t layer = static_cast<size_t>(l);
    const std::vector<int64_t>* ran = layer < counts.slot_tokens.size() ? &counts.slot_tokens[layer] : nullptr;
    for (size_t s = 0; s < placement.slots(l, model.comm().rank()).size(); ++s) {
      mine.push_back(ran && s < ran->size() ? static_cast<double>((*ran)[s]) : 0.0);
    }
    const parallel::ExchangeStats& d = layer < counts.dispatch.size() ? counts.dispatch[layer] : none;
    const parallel::ExchangeStats& c = layer < counts.combine.size() ? counts.combine[layer] : none;
    mine.insert(mine.end(), {static_cast<double>(d.bytes_sent), static_cast<double>(d.bytes_received), d.seconds,
                             static_cast<double>(c.bytes_sent), static_cast<double>(c.bytes_received), c.seconds});
  }
  std::vector<int64_t> bytes(static_cast<size_t>(ranks));
  std::vector<size_t> first(static_cast<size_t>(ranks) + 1, 0);
  for (int r = 0; r < ranks; ++r) {
    bytes[r] = static_cast<int64_t>(values_of(r) * sizeof(double));
    first[r + 1] = first[r] + values_of(r);
  }
  std::vector<double> all(first.back());
  if (ranks > 1) {
    EPIC_RETURN_IF_ERROR(model.comm().AllGather(mine.data(), all.data(), bytes));
  } else {
    all = mine;
  }
  out.slot_tokens.resize(static_cast<size_t>(ranks));
  out.dispatch.resize(static_cast<size_t>(ranks));
  out.combine.resize(static_cast<size_t>(ranks));
  for (int r = 0; r < ranks; ++r) {
    const double* v = all.data() + first[r];
    for (int64_t l : out.moe_layers) {
      std::vector<int64_t> slots;
      for (size_t s = 0; s < placement.slots(l, r).size(); ++s) slots.push_back(static_cast<int64_t>(*v++));
      out.slot_tokens[r].push_back(std::move(slots));
      out.dispatch[r].push_back({static_cast<int64_t>(v[0]), static_cast<int64_t>(v[1]), v[2]});
      out.combine[r].push_back({static_cast<int64_t>(v[3]), static_cast<int64_t>(v[4]), v[5]});
      v += 6;
    }
  }
  return out;
}

}  // namespace epic
