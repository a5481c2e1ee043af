// MoE dispatch and combine over a Communicator, in two phases as DeepEP does:
// PlanDispatch works out, from the local tokens' top-k choices and the placement,
// what goes where (per-rank counts, send order, and how to undo it); Dispatch and
// Combine move the data. Each token's hidden state crosses to a rank once, however
// many of its experts live there, and comes back once, already weighted and summed.
#pragma once

#include <cstdint>
#include <vector>

#include "common/status.h"
#include "parallel/communicator.h"
#include "parallel/expert_placement.h"

namespace epic::parallel {

// One routed choice riding with a sent row: the slot on the receiving rank and the
// gate weight. slot -1 pads a row's top_k entries.
struct RouteEntry {
  int32_t slot = -1;
  float weight = 0.0f;
};

struct DispatchPlan {
  int num_ranks = 0;
  int64_t num_tokens = 0;
  int64_t top_k = 0;
  std::vector<int64_t> send_rows;    // [rank] rows sent to each rank
  std::vector<int32_t> send_token;   // [rows] local token of each row, grouped by rank
  std::vector<RouteEntry> send_route;  // [rows, top_k]
  // Routed choices per local slot of every rank, for statistics: [rank][slot].
  std::vector<std::vector<int64_t>> slot_tokens;
};

// TOKENS local tokens chose IDS/WEIGHTS [tokens, top_k] on LAYER. FIRST_TOKEN is this
// rank's first token's index in the step, for the deterministic choice of replicas.
DispatchPlan PlanDispatch(const ExpertPlacement& placement, int64_t layer, int rank,
                          const int32_t* ids, const float* weights, int64_t tokens, int64_t top_k,
                          int64_t first_token);

// Bytes and time of one all-to-all exchange, for the load reports.
struct ExchangeStats {
  int64_t bytes_sent = 0;
  int64_t bytes_received = 0;
  double seconds = 0.0;

  void Add(const ExchangeStats& other) {
    bytes_sent += other.bytes_sent;
    bytes_received += other.bytes_received;
    seconds += other.seconds;
  }
};

// What a rank received: rows of hidden states and their routes, in source-rank order.
struct ReceivedTokens {
  std::vector<int64_t> rows_from;  // [rank] rows received from each rank
  std::vector<float> hidden;       // [rows, hidden_size]
  std::vector<RouteEntry> route;   // [rows, top_k]
  int64_t rows() const;
};

// The exchange on host rows kept in a ReceivedTokens, for tests and tools; the model
// keeps its rows in its backend's memory through MoeExchange (moe_exchange.h), which
// these call. Sends every planned row of X [tokens, hidden_size] with its routes.
Status Dispatch(Communicator& comm, const DispatchPlan& plan, const float* x, int64_t hidden_size,
                ReceivedTokens* received, ExchangeStats* stats = nullptr);

// The received rows grouped by local slot: rows of slot s are row[offsets[s] ..
// offsets[s+1]) with their gate weights, ready for one grouped product per expert.
struct SlotBatches {
  std::vector<int64_t> offsets;  // [slots + 1]
  std::vector<int32_t> row;      // received row index
  std::vector<float> weight;
};
SlotBatches GroupBySlot(const ReceivedTokens& received, int64_t top_k, int64_t num_slots);

// Returns OUTPUT [received rows, hidden_size] (each row the weighted sum of its local
// experts' outputs) to the senders, and adds each returned row into Y [tokens,
// hidden_size] at the token it came from.
Status Combine(Communicator& comm, const DispatchPlan& plan, ReceivedTokens& received,
               const float* output, int64_t hidden_size, float* y, ExchangeStats* stats = nullptr);

}  // namespace epic::parallel
