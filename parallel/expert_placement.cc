#include "parallel/expert_placement.h"

#include <set>

namespace epic::parallel {

StatusOr<ExpertPlacement> ExpertPlacement::Create(Table table, int64_t num_experts) {
  ExpertPlacement p;
  p.num_experts_ = num_experts;
  p.num_ranks_ = table.empty() ? 0 : static_cast<int>(table[0].size());
  if (p.num_ranks_ == 0) return InvalidArgumentError("expert placement: no ranks");
  p.replicas_.resize(table.size());
  for (size_t l = 0; l < table.size(); ++l) {
    const std::string where = "expert placement: layer " + std::to_string(l);
    if (static_cast<int>(table[l].size()) != p.num_ranks_) {
      return InvalidArgumentError(where + " lists " + std::to_string(table[l].size()) +
                                  " ranks, layer 0 lists " + std::to_string(p.num_ranks_));
    }
    bool any = false;
    for (const auto& slots : table[l]) any = any || !slots.empty();
    if (!any) continue;  // not an MoE layer
    auto& replicas = p.replicas_[l];
    replicas.resize(static_cast<size_t>(num_experts));
    for (int r = 0; r < p.num_ranks_; ++r) {
      std::set<int32_t> seen;
      for (size_t s = 0; s < table[l][r].size(); ++s) {
        const int32_t e = table[l][r][s];
        if (e < 0 || e >= num_experts) {
          return InvalidArgumentError(where + ", rank " + std::to_string(r) + ": expert id " +
                                      std::to_string(e) + " is outside [0, " +
                                      std::to_string(num_experts) + ")");
        }
        if (!seen.insert(e).second) {
          return InvalidArgumentError(where + ", rank " + std::to_string(r) + " holds expert " +
                                      std::to_string(e) + " twice");
        }
        replicas[e].push_back({r, static_cast<int32_t>(s)});
      }
    }
    for (int64_t e = 0; e < num_experts; ++e) {
      if (replicas[e].empty()) {
        return InvalidArgumentError(where + ": expert " + std::to_string(e) + " is on no rank");
      }
    }
  }
  p.table_ = std::move(table);
  return p;
}

ExpertPlacement ExpertPlacement::Contiguous(int64_t num_layers, const std::vector<bool>& moe_layers,
                                            int64_t num_experts, int num_ranks, int redundant_per_rank) {
  Table table = placement::ContiguousPlacement(num_layers, num_experts, num_ranks, redundant_per_rank);
  for (int64_t l = 0; l < num_layers; ++l) {
    if (!moe_layers[l]) table[l].assign(static_cast<size_t>(num_ranks), {});
  }
  return *Create(std::move(table), num_experts);
}

ExpertSlot ExpertPlacement::Route(int64_t layer, int64_t expert, int source_rank, int64_t token) const {
  const std::vector<ExpertSlot>& r = replicas_[layer][expert];
  for (const ExpertSlot& s : r) {
    if (s.rank == source_rank) return s;
  }
  return r[static_cast<size_t>(token % static_cast<int64_t>(r.size()))];
}

}  // namespace epic::parallel
