// ExpertPlacement: for every MoE layer, which logical expert each rank's physical
// slots hold. A logical expert may have several replicas (hot experts, redundant
// slots); each (token, expert) pair is served by exactly one of them, chosen
// deterministically. Placement is not math: any valid placement gives the same
// outputs.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "common/status.h"
#include "placement/placement_table.h"

namespace epic::parallel {

struct ExpertSlot {
  int32_t rank = 0;
  int32_t slot = 0;  // index into that rank's slot list for the layer
};

class ExpertPlacement {
 public:
  // [layer][rank] -> the logical expert held by each of the rank's slots. A layer
  // whose ranks hold no slots is not an MoE layer.
  using Table = placement::PlacementTable;

  // Validates TABLE: ids in [0, num_experts), every expert of an MoE layer held at
  // least once, no expert twice on one rank; INVALID_ARGUMENT naming layer, rank and
  // expert otherwise.
  static StatusOr<ExpertPlacement> Create(Table table, int64_t num_experts);

  // The default (placement::ContiguousPlacement) on each layer in MOE_LAYERS.
  static ExpertPlacement Contiguous(int64_t num_layers, const std::vector<bool>& moe_layers,
                                    int64_t num_experts, int num_ranks, int redundant_per_rank = 0);

  int64_t num_layers() const { return static_cast<int64_t>(table_.size()); }
  int num_ranks() const { return num_ranks_; }
  int64_t num_experts() const { return num_experts_; }
  bool is_moe_layer(int64_t layer) const { return !replicas_[layer].empty(); }
  const std::vector<int32_t>& slots(int64_t layer, int rank) const { return table_[layer][rank]; }
  std::span<const ExpertSlot> replicas(int64_t layer, int64_t expert) const {
    return replicas_[layer][expert];
  }
  const Table& table() const { return table_; }

  // The replica that serves TOKEN's choice of EXPERT: one on the token's own rank
  // when there is one (no transfer), else replica TOKEN % count.
  ExpertSlot Route(int64_t layer, int64_t expert, int source_rank, int64_t token) const;

 private:
  ExpertPlacement() = default;
  Table table_;
  int num_ranks_ = 0;
  int64_t num_experts_ = 0;
  std::vector<std::vector<std::vector<ExpertSlot>>> replicas_;  // [layer][expert]
};

}  // namespace epic::parallel
