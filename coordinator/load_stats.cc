#include "coordinator/load_stats.h"

#include <algorithm>
#include <numeric>

namespace epic::coordinator {
namespace {

// More tokens than one step of any job routes to one expert.
constexpr int64_t kMaxStepTokens = int64_t{1} << 32;

}  // namespace

LoadStats::LoadStats(const LoadStatsOptions& options)
    : options_(options), bucket_steps_(std::max<int64_t>(1, options.window_steps / 20)) {}

void LoadStats::Reset(const std::vector<int32_t>& moe_layers, int64_t experts, int ranks) {
  layers_ = moe_layers;
  experts_ = experts;
  ranks_ = ranks;
  buckets_.clear();
  steps_ = 0;
  totals_.assign(layers_.size(), std::vector<int64_t>(static_cast<size_t>(experts), 0));
  ema_.assign(layers_.size(), std::vector<double>(static_cast<size_t>(experts), 0.0));
  rank_ema_.assign(layers_.size(), std::vector<double>(static_cast<size_t>(ranks), 0.0));
  ema_started_ = false;
  history_.clear();
  rebalances_.clear();
}

void LoadStats::ClearWindow() { buckets_.clear(); }

LoadStats::Bucket LoadStats::EmptyBucket() const {
  Bucket b;
  b.expert.assign(layers_.size(), std::vector<double>(static_cast<size_t>(experts_), 0.0));
  b.rank.assign(layers_.size(), std::vector<double>(static_cast<size_t>(ranks_), 0.0));
  b.a2a.assign(static_cast<size_t>(ranks_), {});
  return b;
}

void LoadStats::Add(const v1::internal::StepResult& result) {
  const int64_t step = ++steps_;
  if (layers_.empty()) return;
  if (buckets_.empty() || buckets_.back().steps >= bucket_steps_) {
    buckets_.push_back(EmptyBucket());
    buckets_.back().first_step = step;
    buckets_.back().start = Clock::now();
    const int64_t keep = (options_.window_steps + bucket_steps_ - 1) / bucket_steps_;
    while (static_cast<int64_t>(buckets_.size()) > keep) buckets_.pop_front();
  }
  Bucket& b = buckets_.back();
  ++b.steps;
  b.last_step = step;
  b.end = Clock::now();

  std::vector<std::vector<double>> step_tokens(layers_.size(), std::vector<double>(static_cast<size_t>(experts_), 0.0));
  for (const v1::LayerLoad& load : result.expert_tokens()) {
    const auto it = std::find(layers_.begin(), layers_.end(), load.layer());
    if (it == layers_.end()) continue;
    const size_t l = static_cast<size_t>(it - layers_.begin());
    for (int e = 0; e < load.expert_tokens_size() && e < experts_; ++e) {
      // One step's tokens: a count no step can hold (a broken worker's) is left out, so
      // that the totals since attach cannot overflow.
      if (load.expert_tokens(e) < 0 || load.expert_tokens(e) > kMaxStepTokens) continue;
      step_tokens[l][static_cast<size_t>(e)] = static_cast<double>(load.expert_tokens(e));
      totals_[l][static_cast<size_t>(e)] += load.expert_tokens(e);
      b.expert[l][static_cast<size_t>(e)] += step_tokens[l][static_cast<size_t>(e)];
    }
  }
  const double a = ema_started_ ? options_.ema_alpha : 1.0;
  for (size_t l = 0; l < layers_.size(); ++l) {
    for (size_t e = 0; e < ema_[l].size(); ++e) ema_[l][e] = (1 - a) * ema_[l][e] + a * step_tokens[l][e];
    for (int r = 0; r < ranks_; ++r) {
      const auto* tokens = r < result.ranks_size() ? &result.ranks(r).layer_tokens() : nullptr;
      const double v = tokens && static_cast<int>(l) < tokens->size() ? static_cast<double>((*tokens)[static_cast<int>(l)]) : 0.0;
      rank_ema_[l][static_cast<size_t>(r)] = (1 - a) * rank_ema_[l][static_cast<size_t>(r)] + a * v;
    }
  }
  ema_started_ = true;

  double sum_max = 0, sum_mean = 0;
  for (int r = 0; r < result.ranks_size() && r < ranks_; ++r) {
    const v1::internal::RankStepStats& s = result.ranks(r);
    for (int l = 0; l < s.layer_tokens_size() && static_cast<size_t>(l) < layers_.size(); ++l) {
      b.rank[static_cast<size_t>(l)][static_cast<size_t>(r)] += static_cast<double>(s.layer_tokens(l));
    }
    AllToAllTotals& t = b.a2a[static_cast<size_t>(r)];
    t.dispatch_bytes_sent += s.dispatch_bytes_sent();
    t.dispatch_bytes_received += s.dispatch_bytes_received();
    t.combine_bytes_sent += s.combine_bytes_sent();
    t.combine_bytes_received += s.combine_bytes_received();
    t.dispatch_seconds += s.dispatch_seconds();
    t.combine_seconds += s.combine_seconds();
  }
  if (result.ranks_size() == ranks_) {
    for (size_t l = 0; l < layers_.size(); ++l) {
      double max = 0, sum = 0;
      for (int r = 0; r < ranks_; ++r) {
        const auto& tokens = result.ranks(r).layer_tokens();
        const double v = l < static_cast<size_t>(tokens.size()) ? static_cast<double>(tokens[static_cast<int>(l)]) : 0.0;
        max = std::max(max, v);
        sum += v;
      }
      sum_max += max;
      sum_mean += sum / ranks_;
    }
    if (sum_mean > 0) {
      history_.push_back({step, sum_max / sum_mean});
      while (static_cast<int64_t>(history_.size()) > options_.history_steps) history_.pop_front();
    }
  }
}

int64_t LoadStats::window_steps() const {
  int64_t n = 0;
  for (const Bucket& b : buckets_) n += b.steps;
  return n;
}

void LoadStats::Fill(ReportInput* in) const {
  in->layers = layers_;
  in->num_ranks = ranks_;
  Bucket total = EmptyBucket();
  for (const Bucket& b : buckets_) {
    for (size_t l = 0; l < layers_.size(); ++l) {
      for (size_t e = 0; e < total.expert[l].size(); ++e) total.expert[l][e] += b.expert[l][e];
      for (size_t r = 0; r < total.rank[l].size(); ++r) total.rank[l][r] += b.rank[l][r];
    }
    for (size_t r = 0; r < total.a2a.size(); ++r) {
      AllToAllTotals& t = total.a2a[r];
      const AllToAllTotals& x = b.a2a[r];
      t.dispatch_bytes_sent += x.dispatch_bytes_sent;
      t.dispatch_bytes_received += x.dispatch_bytes_received;
      t.combine_bytes_sent += x.combine_bytes_sent;
      t.combine_bytes_received += x.combine_bytes_received;
      t.dispatch_seconds += x.dispatch_seconds;
      t.combine_seconds += x.combine_seconds;
    }
  }
  in->expert_tokens = total.expert;
  in->rank_tokens = total.rank;
  in->all_to_all = total.a2a;
  in->expert_ema = ema_;
  in->rank_ema = rank_ema_;
  in->history.assign(history_.begin(), history_.end());
  in->rebalances = rebalances_;
  in->window_steps = window_steps();
  in->first_step = buckets_.empty() ? 0 : buckets_.front().first_step;
  in->last_step = buckets_.empty() ? 0 : buckets_.back().last_step;
  in->window_seconds =
      buckets_.empty() ? 0.0 : std::chrono::duration<double>(buckets_.back().end - buckets_.front().start).count();
  in->ema_alpha = options_.ema_alpha;
}

double LoadStats::WindowImbalance() const {
  ReportInput in;
  Fill(&in);
  double sum_max = 0, sum_mean = 0;
  for (const auto& ranks : in.rank_tokens) {
    if (ranks.empty()) continue;
    sum_max += *std::max_element(ranks.begin(), ranks.end());
    sum_mean += std::accumulate(ranks.begin(), ranks.end(), 0.0) / static_cast<double>(ranks.size());
  }
  return sum_mean > 0 ? sum_max / sum_mean : 1.0;
}

}  // namespace epic::coordinator
