// The MoE exchange of a step, shaped as DeepEP's: PlanDispatch (the layout step,
// dispatch.h) works out on the host what goes where; Dispatch moves each token's row
// once to every rank holding one of its experts and returns a handle (the received rows,
// grouped by local slot, and the way back); Combine consumes the handle, returning the
// experts' weighted outputs to their tokens. The rows live in a RowSpace: host memory
// moved by MPI, or a device's moved by NCCL. One step's plan, layouts and counts are the
// same in both; only the rows and the adds differ.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "common/scratch_buffer.h"
#include "common/status.h"
#include "parallel/communicator.h"
#include "parallel/dispatch.h"
#include "parallel/exchange_layout.h"

namespace epic::parallel {

// Where the exchanged rows live, and the one piece of work on them the exchange needs.
class RowSpace {
 public:
  virtual ~RowSpace() = default;

  // BYTES of this space's memory, kept under ID from call to call (grown, never shrunk;
  // contents not kept when it grows).
  virtual StatusOr<void*> Buffer(int id, int64_t bytes) = 0;
  // HOST's BYTES where this space's work and its communicator read them: HOST itself in
  // host memory, else a copy in Buffer(ID).
  virtual StatusOr<const void*> Stage(const void* host, int64_t bytes, int id) = 0;
  // SRC's BYTES readable on the host: SRC itself in host memory, else copied into HOST
  // once the work queued before has finished.
  virtual StatusOr<const void*> Fetch(const void* src, int64_t bytes, void* host) = 0;
  // For each token t < TOKENS, Y[t] += the rows SOURCE[t * sources + j] names, j in
  // order (-1: none), of the combine buffer: BACK's rows [0, RETURNED), then SELF's
  // [0, SELF_ROWS). SOURCE was staged. BACK has room for RETURNED + SELF_ROWS rows when RETURNED > 0.
  virtual Status AddRows(float* back, int64_t returned, const float* self, int64_t self_rows, int64_t width,
                         const int32_t* source, int64_t tokens, int64_t sources, float* y) = 0;
};

// Host memory: staging and fetching are free, the adds a plain loop.
class HostRowSpace final : public RowSpace {
 public:
  StatusOr<void*> Buffer(int id, int64_t bytes) override;
  StatusOr<const void*> Stage(const void* host, int64_t, int) override { return host; }
  StatusOr<const void*> Fetch(const void* src, int64_t, void*) override { return src; }
  Status AddRows(float* back, int64_t returned, const float* self, int64_t self_rows, int64_t width,
                 const int32_t* source, int64_t tokens, int64_t sources, float* y) override;

 private:
  std::vector<ScratchBuffer> buffers_;  // in huge pages from 2 MiB
};

// What Dispatch delivered, and what Combine needs to send it back.
struct MoeHandle {
  const DispatchPlan* plan = nullptr;
  std::vector<int64_t> rows_from;   // [rank] rows received from each
  int64_t received = 0;             // rows received in all
  const float* rows = nullptr;      // [received, hidden] in the row space
  std::span<const RouteEntry> routes;  // [received, top_k], readable on the host
  ExpertLayout layout;              // the received rows grouped by local slot
  CombineLayout back;               // the way back
  ExchangeStats stats;              // the dispatch's bytes and time
};

class MoeExchange {
 public:
  // COMM moves SPACE's rows (nullptr for a one-rank job, whose rows never move).
  MoeExchange(Communicator* comm, RowSpace* space, int rank);

  // Sends every planned row of X [plan.num_tokens, HIDDEN] with its routes; the handle
  // groups what arrived by this rank's slots. Valid until the next Dispatch.
  StatusOr<const MoeHandle*> Dispatch(const DispatchPlan& plan, const float* x, int64_t hidden);

  // Returns OUTPUT [received rows, HIDDEN] (each row the weighted sum of its local
  // experts' outputs) to the senders and adds each returned row into Y
  // [plan.num_tokens, HIDDEN] at the token it came from, in rank order.
  Status Combine(const MoeHandle& handle, const float* output, int64_t hidden, float* y, ExchangeStats* stats);

 private:
  Communicator* comm_;
  RowSpace* space_;
  int rank_;
  MoeHandle handle_;
  std::vector<RouteEntry> routes_;  // the routes' host copy, when the rows live on a device
};

}  // namespace epic::parallel
