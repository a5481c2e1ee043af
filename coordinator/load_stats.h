// The coordinator's expert statistics: what each step's MoE layers routed to each
// expert and ran on each rank, kept over a sliding window of steps and as an
// exponential moving average, with a per-step history of imbalance. Not thread-safe:
// the server guards it.
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <vector>

#include "coordinator/load_report.h"
#include "worker_link.pb.h"

namespace epic::coordinator {

struct LoadStatsOptions {
  int64_t window_steps = 1000;  // the window covers between this and 5% fewer steps
  double ema_alpha = 0.05;      // weight of the newest step
  int64_t history_steps = 2000;
};

class LoadStats {
 public:
  explicit LoadStats(const LoadStatsOptions& options = {});

  const LoadStatsOptions& options() const { return options_; }
  // A new worker job: MOE_LAYERS (their ids), EXPERTS per layer, RANKS. Forgets everything.
  void Reset(const std::vector<int32_t>& moe_layers, int64_t experts, int ranks);
  // Forgets the window (loads per rank measured under a placement no longer in use);
  // the moving average, history and rebalances stay.
  void ClearWindow();
  // One step's result: the step after the last one added.
  void Add(const v1::internal::StepResult& result);
  void AddRebalance(const RebalanceRecord& record) { rebalances_.push_back(record); }

  int64_t window_steps() const;
  // Steps added since Reset, and the tokens routed to each expert over them:
  // [moe layer][expert], the MoE layers being layers().
  int64_t steps() const { return steps_; }
  const std::vector<int32_t>& layers() const { return layers_; }
  const std::vector<std::vector<int64_t>>& totals() const { return totals_; }
  // Σ over layers of the busiest rank's tokens / Σ of the mean, over the window (1 when empty).
  double WindowImbalance() const;
  // Fills the statistics part of IN (layers, loads, ranks' loads, all-to-all, history, window).
  void Fill(ReportInput* in) const;

 private:
  using Clock = std::chrono::steady_clock;
  // The window is kept in 20 buckets, so that memory does not grow with its length.
  struct Bucket {
    int64_t steps = 0, first_step = 0, last_step = 0;
    Clock::time_point start, end;
    std::vector<std::vector<double>> expert;  // [moe layer][expert]
    std::vector<std::vector<double>> rank;    // [moe layer][rank]
    std::vector<AllToAllTotals> a2a;          // [rank]
  };
  Bucket EmptyBucket() const;

  LoadStatsOptions options_;
  int64_t bucket_steps_;
  std::vector<int32_t> layers_;
  int64_t steps_ = 0;
  std::vector<std::vector<int64_t>> totals_;  // [moe layer][expert], since Reset
  int64_t experts_ = 0;
  int ranks_ = 0;
  std::deque<Bucket> buckets_;
  std::vector<std::vector<double>> ema_;       // [moe layer][expert]
  std::vector<std::vector<double>> rank_ema_;  // [moe layer][rank]
  bool ema_started_ = false;
  std::deque<HistoryPoint> history_;
  std::vector<RebalanceRecord> rebalances_;
};

}  // namespace epic::coordinator
