// Placement tables in the API's and the worker link's terms: a list of LayerPlacement,
// one per MoE layer with its layer id. The one conversion both sides of the link use.
#pragma once

#include <cstdint>

#include "common/status.h"
#include "epic.pb.h"
#include "placement/placement_table.h"

namespace epic::placement {

using LayerPlacements = google::protobuf::RepeatedPtrField<v1::LayerPlacement>;

// The MoE layers of TABLE (layers whose ranks hold slots), in order, into OUT.
void PlacementToProto(const PlacementTable& table, LayerPlacements* out);

// LAYERS as a table of NUM_LAYERS layers over NUM_RANKS ranks; layers not listed hold no
// slots. INVALID_ARGUMENT naming the layer when one does not fit.
StatusOr<PlacementTable> PlacementFromProto(const LayerPlacements& layers, int64_t num_layers, int num_ranks);

}  // namespace epic::placement
