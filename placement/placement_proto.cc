#include "placement/placement_proto.h"

#include <string>

namespace epic::placement {

void PlacementToProto(const PlacementTable& table, LayerPlacements* out) {
  for (size_t l = 0; l < table.size(); ++l) {
    bool moe = false;
    for (const auto& slots : table[l]) moe = moe || !slots.empty();
    if (!moe) continue;
    v1::LayerPlacement* layer = out->Add();
    layer->set_layer(static_cast<int32_t>(l));
    for (const auto& slots : table[l]) layer->add_ranks()->mutable_experts()->Add(slots.begin(), slots.end());
  }
}

StatusOr<PlacementTable> PlacementFromProto(const LayerPlacements& layers, int64_t num_layers, int num_ranks) {
  PlacementTable table(static_cast<size_t>(num_layers), std::vector<std::vector<int32_t>>(static_cast<size_t>(num_ranks)));
  for (const v1::LayerPlacement& layer : layers) {
    if (layer.layer() < 0 || layer.layer() >= num_layers || layer.ranks_size() != num_ranks) {
      return InvalidArgumentError("placement of layer " + std::to_string(layer.layer()) + " does not fit " +
                                  std::to_string(num_layers) + " layers over " + std::to_string(num_ranks) + " ranks");
    }
    for (int r = 0; r < num_ranks; ++r) {
      table[static_cast<size_t>(layer.layer())][static_cast<size_t>(r)].assign(layer.ranks(r).experts().begin(),
                                                                               layer.ranks(r).experts().end());
    }
  }
  return table;
}

}  // namespace epic::placement
