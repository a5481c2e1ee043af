#include "parallel/moe_exchange.h"

#include <algorithm>
#include <chrono>

namespace epic::parallel {
namespace {

using Clock = std::chrono::steady_clock;

// The exchange's buffers in its row space.
enum : int { kReceived, kRoutesOut, kRoutesIn, kBack, kSource };

int64_t Sum(std::span<const int64_t> v) {
  int64_t s = 0;
  for (int64_t x : v) s += x;
  return s;
}

double Since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

}  // namespace

StatusOr<void*> HostRowSpace::Buffer(int id, int64_t bytes) {
  if (id < 0 || bytes < 0) return InvalidArgumentError("host row buffer " + std::to_string(id));
  if (static_cast<size_t>(id) >= buffers_.size()) buffers_.resize(static_cast<size_t>(id) + 1);
  return buffers_[static_cast<size_t>(id)].Get(std::max<int64_t>(bytes, 1));
}

Status HostRowSpace::AddRows(float* back, int64_t returned, const float* self, int64_t, int64_t width,
                             const int32_t* source, int64_t tokens, int64_t sources, float* y) {
  for (int64_t t = 0; t < tokens; ++t) {
    float* dst = y + t * width;
    for (int64_t j = 0; j < sources; ++j) {
      const int32_t i = source[t * sources + j];
      if (i < 0) continue;
      const float* src = i < returned ? back + i * width : self + (i - returned) * width;
      for (int64_t c = 0; c < width; ++c) dst[c] += src[c];
    }
  }
  return OkStatus();
}

MoeExchange::MoeExchange(Communicator* comm, RowSpace* space, int rank) : comm_(comm), space_(space), rank_(rank) {}

StatusOr<const MoeHandle*> MoeExchange::Dispatch(const DispatchPlan& plan, const float* x, int64_t hidden) {
  const auto start = Clock::now();
  MoeHandle& h = handle_;
  h.plan = &plan;
  const int64_t k = plan.top_k;
  const int64_t row_bytes = hidden * static_cast<int64_t>(sizeof(float));
  const int64_t route_bytes = k * static_cast<int64_t>(sizeof(RouteEntry));
  const int64_t sent = static_cast<int64_t>(plan.send_token.size());
  h.rows_from.assign(static_cast<size_t>(plan.num_ranks), 0);
  // One rank sends every token to itself, in order: the rows stay where they are.
  bool in_place = plan.num_ranks == 1 && sent == plan.num_tokens;
  for (int64_t i = 0; in_place && i < sent; ++i) in_place = plan.send_token[i] == i;
  if (in_place) {
    h.rows_from[0] = sent;
    h.rows = x;
    h.routes = plan.send_route;
  } else {
    if (comm_ == nullptr) return InternalError("MoE exchange: rows to move and no communicator");
    EPIC_RETURN_IF_ERROR(comm_->ExchangeCounts(plan.send_rows, h.rows_from));
    const int64_t received = Sum(h.rows_from);
    EPIC_ASSIGN_OR_RETURN(void* rows, space_->Buffer(kReceived, received * row_bytes));
    EPIC_ASSIGN_OR_RETURN(void* routes_in, space_->Buffer(kRoutesIn, received * route_bytes));
    EPIC_ASSIGN_OR_RETURN(const void* routes_out, space_->Stage(plan.send_route.data(), sent * route_bytes, kRoutesOut));
    // Rows go straight from X (no packed copy), each with its routes in the same exchange.
    EPIC_RETURN_IF_ERROR(comm_->AllToAllRowsWithTail(x, row_bytes, plan.send_token, plan.send_rows, rows,
                                                     h.rows_from, routes_out, route_bytes, routes_in));
    routes_.resize(static_cast<size_t>(received * k));
    EPIC_ASSIGN_OR_RETURN(const void* routes, space_->Fetch(routes_in, received * route_bytes, routes_.data()));
    h.rows = static_cast<const float*>(rows);
    h.routes = {static_cast<const RouteEntry*>(routes), static_cast<size_t>(received * k)};
  }
  h.received = Sum(h.rows_from);
  h.stats = {sent * (row_bytes + route_bytes), h.received * (row_bytes + route_bytes), Since(start)};
  h.layout = MakeExpertLayout(h.routes, h.received, k, static_cast<int64_t>(plan.slot_tokens[rank_].size()));
  h.back = MakeCombineLayout(plan, h.rows_from, rank_);
  return &handle_;
}

Status MoeExchange::Combine(const MoeHandle& h, const float* output, int64_t hidden, float* y,
                            ExchangeStats* stats) {
  const auto start = Clock::now();
  const CombineLayout& back = h.back;
  const int64_t row_bytes = hidden * static_cast<int64_t>(sizeof(float));
  // The reverse exchange: what was received goes back, what was sent returns. Rows a
  // rank served for itself skip it and are added straight from OUTPUT.
  const int64_t landing_rows = back.returned > 0 ? back.returned + back.self_rows : 0;
  EPIC_ASSIGN_OR_RETURN(void* landing, space_->Buffer(kBack, landing_rows * row_bytes));
  if (back.returned > 0 || !back.send_index.empty()) {
    if (comm_ == nullptr) return InternalError("MoE exchange: rows to move and no communicator");
    EPIC_RETURN_IF_ERROR(
        comm_->AllToAllRows(output, row_bytes, back.send_index, back.send_rows, landing, back.recv_rows));
  }
  const int64_t tokens = h.plan->num_tokens;
  EPIC_ASSIGN_OR_RETURN(const void* source, space_->Stage(back.token_source.data(),
                                                          tokens * back.sources * static_cast<int64_t>(sizeof(int32_t)),
                                                          kSource));
  EPIC_RETURN_IF_ERROR(space_->AddRows(static_cast<float*>(landing), back.returned, output + back.self_first * hidden,
                                       back.self_rows, hidden, static_cast<const int32_t*>(source), tokens,
                                       back.sources, y));
  if (stats != nullptr) {
    stats->Add({static_cast<int64_t>(back.send_index.size()) * row_bytes, back.returned * row_bytes, Since(start)});
  }
  return OkStatus();
}

}  // namespace epic::parallel
