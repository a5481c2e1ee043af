#include "client/report_render.h"

#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <iterator>
#include <limits>
#include <map>
#include <vector>

namespace epic::coordinator {

namespace {

using nlohmann::json;

// The report, checked and copied out of the JSON, so that rendering cannot meet a
// missing field or a wrong type.
struct SideView {
  std::vector<double> rank_load;
  double imbalance = 1, balancedness = 1;
};

struct HotView {
  int64_t expert = 0;
  double tokens = 0, share = 0;
};

struct LayerView {
  int64_t layer = 0;
  std::vector<double> expert_tokens;
  SideView current, planned;
  std::vector<HotView> hottest;
};

struct AllToAllView {
  int64_t rank = 0;
  double dispatch_sent = 0, dispatch_received = 0, combine_sent = 0, combine_received = 0;
  double dispatch_seconds = 0, combine_seconds = 0;
};

struct HistoryView {
  int64_t step = 0;
  double imbalance = 1;
};

struct RebalanceView {
  int64_t step = 0, experts_moved = 0, bytes_loaded = 0;
  double seconds = 0, imbalance_before = 1, imbalance_after = 1;
};

struct CacheFormView {
  std::string attention;
  int64_t kv_heads = 0, bytes_per_token_per_layer = 0, tokens_per_rank = 0, cluster_tokens_tp = 0,
          cluster_tokens_dp = 0;
  double fraction_of_mha = 1;
};

// The latent cache of the job the report is from (absent offline).
struct CacheView {
  bool present = false;
  std::string attention;
  int64_t ranks = 1, block_size = 0, blocks_per_rank = 0, blocks_in_use = 0, blocks_total = 0;
  int64_t bytes_per_value = 0, budget_bytes_per_rank = 0;
  std::vector<CacheFormView> forms;
};

struct ReportView {
  std::string model_type;
  int64_t ranks = 1, experts = 0, slots_current = 0, slots_planned = 0;
  int64_t window_steps = 0, first_step = 0, last_step = 0;
  double window_seconds = 0, ema_alpha = 0;
  bool measured = false;
  std::vector<LayerView> layers;
  double tokens = 0;
  SideView current, planned;  // overall: no rank_load
  int64_t experts_moved = 0;
  std::vector<AllToAllView> all_to_all;
  std::vector<HistoryView> history;
  std::vector<RebalanceView> rebalances;
  CacheView cache;
};

std::string Format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
std::string Format(const char* fmt, ...) {
  char small[256];
  va_list args;
  va_start(args, fmt);
  const int n = std::vsnprintf(small, sizeof(small), fmt, args);
  va_end(args);
  if (n < 0) return {};
  if (static_cast<size_t>(n) < sizeof(small)) return std::string(small, static_cast<size_t>(n));
  std::string out(static_cast<size_t>(n) + 1, '\0');
  va_start(args, fmt);
  std::vsnprintf(out.data(), out.size(), fmt, args);
  va_end(args);
  out.resize(static_cast<size_t>(n));
  return out;
}

// --- Checking the document ------------------------------------------------------

Status Problem(const std::string& path, const std::string& what) {
  return InvalidArgumentError("load report: " + (path.empty() ? std::string("the document") : path) + ": " + what);
}

std::string Got(const json& j) { return std::string("got ") + j.type_name(); }
std::string At(const std::string& path, const char* key) { return path.empty() ? key : path + "." + key; }
std::string At(const std::string& path, size_t i) { return path + "[" + std::to_string(i) + "]"; }

Status Member(const json& obj, const std::string& path, const char* key, const json** out) {
  if (!obj.is_object()) return Problem(path, "expected an object, " + Got(obj));
  const auto it = obj.find(key);
  if (it == obj.end()) return Problem(At(path, key), "missing");
  *out = &*it;
  return OkStatus();
}

Status AsNumber(const json& v, const std::string& path, double* out) {
  if (!v.is_number()) return Problem(path, "expected a number, " + Got(v));
  *out = v.get<double>();
  // In-memory documents can hold NaN or infinity, which JSON text cannot.
  if (!std::isfinite(*out)) return Problem(path, "not a finite number");
  return OkStatus();
}

Status AsInteger(const json& v, const std::string& path, int64_t* out) {
  if (!v.is_number_integer()) return Problem(path, "expected an integer, " + Got(v));
  if (v.is_number_unsigned() && v.get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
    return Problem(path, "out of range");
  }
  *out = v.get<int64_t>();
  return OkStatus();
}

Status Number(const json& obj, const std::string& path, const char* key, double* out) {
  const json* v = nullptr;
  EPIC_RETURN_IF_ERROR(Member(obj, path, key, &v));
  return AsNumber(*v, At(path, key), out);
}

Status Integer(const json& obj, const std::string& path, const char* key, int64_t* out) {
  const json* v = nullptr;
  EPIC_RETURN_IF_ERROR(Member(obj, path, key, &v));
  return AsInteger(*v, At(path, key), out);
}

Status Array(const json& obj, const std::string& path, const char* key, const json** out) {
  EPIC_RETURN_IF_ERROR(Member(obj, path, key, out));
  if (!(*out)->is_array()) return Problem(At(path, key), "expected a list, " + Got(**out));
  return OkStatus();
}

Status Numbers(const json& obj, const std::string& path, const char* key, std::vector<double>* out) {
  const json* list = nullptr;
  EPIC_RETURN_IF_ERROR(Array(obj, path, key, &list));
  out->clear();
  out->reserve(list->size());
  for (size_t i = 0; i < list->size(); ++i) {
    double v = 0;
    EPIC_RETURN_IF_ERROR(AsNumber((*list)[i], At(At(path, key), i), &v));
    out->push_back(v);
  }
  return OkStatus();
}

Status Balance(const json& obj, const std::string& path, SideView* side) {
  EPIC_RETURN_IF_ERROR(Number(obj, path, "imbalance", &side->imbalance));
  return Number(obj, path, "balancedness", &side->balancedness);
}

// A layer's "current" or "planned": placement [rank][experts], rank_load [rank].
Status LayerSide(const json& layer, const std::string& layer_path, const char* key, const ReportView& r,
                 SideView* side) {
  const json* obj = nullptr;
  EPIC_RETURN_IF_ERROR(Member(layer, layer_path, key, &obj));
  const std::string path = At(layer_path, key);
  const json* placement = nullptr;
  EPIC_RETURN_IF_ERROR(Array(*obj, path, "placement", &placement));
  if (static_cast<int64_t>(placement->size()) != r.ranks) {
    return Problem(At(path, "placement"), Format("%zu ranks, not %lld", placement->size(),
                                                 static_cast<long long>(r.ranks)));
  }
  for (size_t rank = 0; rank < placement->size(); ++rank) {
    const json& slots = (*placement)[rank];
    const std::string slots_path = At(At(path, "placement"), rank);
    if (!slots.is_array()) return Problem(slots_path, "expected a list of experts, " + Got(slots));
    for (size_t s = 0; s < slots.size(); ++s) {
      int64_t e = 0;
      EPIC_RETURN_IF_ERROR(AsInteger(slots[s], At(slots_path, s), &e));
      if (e < 0 || e >= r.experts) {
        return Problem(At(slots_path, s), Format("expert %lld of %lld", static_cast<long long>(e),
                                                 static_cast<long long>(r.experts)));
      }
    }
  }
  EPIC_RETURN_IF_ERROR(Numbers(*obj, path, "rank_load", &side->rank_load));
  if (static_cast<int64_t>(side->rank_load.size()) != r.ranks) {
    return Problem(At(path, "rank_load"), Format("%zu ranks, not %lld", side->rank_load.size(),
                                                 static_cast<long long>(r.ranks)));
  }
  if (obj->is_object() && obj->contains("rank_load_ema")) {  // measured only
    std::vector<double> ema;
    EPIC_RETURN_IF_ERROR(Numbers(*obj, path, "rank_load_ema", &ema));
    if (static_cast<int64_t>(ema.size()) != r.ranks) {
      return Problem(At(path, "rank_load_ema"), Format("%zu ranks, not %lld", ema.size(),
                                                       static_cast<long long>(r.ranks)));
    }
  }
  return Balance(*obj, path, side);
}

Status ParseLayer(const json& j, const std::string& path, const ReportView& r, LayerView* layer) {
  EPIC_RETURN_IF_ERROR(Integer(j, path, "layer", &layer->layer));
  EPIC_RETURN_IF_ERROR(Numbers(j, path, "expert_tokens", &layer->expert_tokens));
  if (static_cast<int64_t>(layer->expert_tokens.size()) != r.experts) {
    return Problem(At(path, "expert_tokens"), Format("%zu experts, not %lld", layer->expert_tokens.size(),
                                                     static_cast<long long>(r.experts)));
  }
  if (j.is_object() && j.contains("expert_ema")) {  // absent offline
    std::vector<double> ema;
    EPIC_RETURN_IF_ERROR(Numbers(j, path, "expert_ema", &ema));
    if (static_cast<int64_t>(ema.size()) != r.experts) {
      return Problem(At(path, "expert_ema"), Format("%zu experts, not %lld", ema.size(),
                                                    static_cast<long long>(r.experts)));
    }
  }
  EPIC_RETURN_IF_ERROR(LayerSide(j, path, "current", r, &layer->current));
  EPIC_RETURN_IF_ERROR(LayerSide(j, path, "planned", r, &layer->planned));
  const json* hottest = nullptr;
  EPIC_RETURN_IF_ERROR(Array(j, path, "hottest", &hottest));
  for (size_t i = 0; i < hottest->size(); ++i) {
    const std::string hot_path = At(At(path, "hottest"), i);
    HotView hot;
    EPIC_RETURN_IF_ERROR(Integer((*hottest)[i], hot_path, "expert", &hot.expert));
    if (hot.expert < 0 || hot.expert >= r.experts) {
      return Problem(At(hot_path, "expert"), Format("expert %lld of %lld", static_cast<long long>(hot.expert),
                                                    static_cast<long long>(r.experts)));
    }
    EPIC_RETURN_IF_ERROR(Number((*hottest)[i], hot_path, "tokens", &hot.tokens));
    EPIC_RETURN_IF_ERROR(Number((*hottest)[i], hot_path, "share", &hot.share));
    layer->hottest.push_back(hot);
  }
  // Shown hottest first whatever order the producer used.
  std::stable_sort(layer->hottest.begin(), layer->hottest.end(),
                   [](const HotView& a, const HotView& b) { return a.tokens > b.tokens; });
  return OkStatus();
}

Status String(const json& obj, const std::string& path, const char* key, std::string* out) {
  const json* v = nullptr;
  EPIC_RETURN_IF_ERROR(Member(obj, path, key, &v));
  if (!v->is_string()) return Problem(At(path, key), "expected a string, " + Got(*v));
  *out = v->get<std::string>();
  return OkStatus();
}

Status ParseCache(const json& c, CacheView* cache) {
  if (!c.is_object()) return Problem("cache", "expected an object, " + Got(c));
  EPIC_RETURN_IF_ERROR(String(c, "cache", "attention", &cache->attention));
  EPIC_RETURN_IF_ERROR(Integer(c, "cache", "ranks", &cache->ranks));
  EPIC_RETURN_IF_ERROR(Integer(c, "cache", "block_size", &cache->block_size));
  EPIC_RETURN_IF_ERROR(Integer(c, "cache", "blocks_per_rank", &cache->blocks_per_rank));
  EPIC_RETURN_IF_ERROR(Integer(c, "cache", "blocks_in_use", &cache->blocks_in_use));
  EPIC_RETURN_IF_ERROR(Integer(c, "cache", "blocks_total", &cache->blocks_total));
  EPIC_RETURN_IF_ERROR(Integer(c, "cache", "bytes_per_value", &cache->bytes_per_value));
  EPIC_RETURN_IF_ERROR(Integer(c, "cache", "budget_bytes_per_rank", &cache->budget_bytes_per_rank));
  const json* forms = nullptr;
  EPIC_RETURN_IF_ERROR(Array(c, "cache", "forms", &forms));
  for (size_t i = 0; i < forms->size(); ++i) {
    const json& f = (*forms)[i];
    const std::string path = At("cache.forms", i);
    CacheFormView v;
    EPIC_RETURN_IF_ERROR(String(f, path, "attention", &v.attention));
    EPIC_RETURN_IF_ERROR(Integer(f, path, "kv_heads", &v.kv_heads));
    EPIC_RETURN_IF_ERROR(Integer(f, path, "bytes_per_token_per_layer", &v.bytes_per_token_per_layer));
    EPIC_RETURN_IF_ERROR(Number(f, path, "fraction_of_mha", &v.fraction_of_mha));
    EPIC_RETURN_IF_ERROR(Integer(f, path, "tokens_per_rank", &v.tokens_per_rank));
    EPIC_RETURN_IF_ERROR(Integer(f, path, "cluster_tokens_tp", &v.cluster_tokens_tp));
    EPIC_RETURN_IF_ERROR(Integer(f, path, "cluster_tokens_dp", &v.cluster_tokens_dp));
    cache->forms.push_back(std::move(v));
  }
  cache->present = true;
  return OkStatus();
}

Status ParseReport(const json& j, ReportView* r) {
  const json* schema = nullptr;
  EPIC_RETURN_IF_ERROR(Member(j, "", "schema", &schema));
  if (!schema->is_string() || schema->get<std::string>() != "epic.load_report/1") {
    return Problem("schema", "expected \"epic.load_report/1\", got " + schema->dump());
  }
  EPIC_RETURN_IF_ERROR(String(j, "", "model_type", &r->model_type));
  EPIC_RETURN_IF_ERROR(Integer(j, "", "ranks", &r->ranks));
  if (r->ranks < 1) return Problem("ranks", "must be >= 1");
  EPIC_RETURN_IF_ERROR(Integer(j, "", "experts", &r->experts));
  if (r->experts < 0) return Problem("experts", "must be >= 0");

  const json* slots = nullptr;
  EPIC_RETURN_IF_ERROR(Member(j, "", "slots_per_rank", &slots));
  EPIC_RETURN_IF_ERROR(Integer(*slots, "slots_per_rank", "current", &r->slots_current));
  EPIC_RETURN_IF_ERROR(Integer(*slots, "slots_per_rank", "planned", &r->slots_planned));

  const json* window = nullptr;
  EPIC_RETURN_IF_ERROR(Member(j, "", "window", &window));
  EPIC_RETURN_IF_ERROR(Integer(*window, "window", "steps", &r->window_steps));
  EPIC_RETURN_IF_ERROR(Integer(*window, "window", "first_step", &r->first_step));
  EPIC_RETURN_IF_ERROR(Integer(*window, "window", "last_step", &r->last_step));
  EPIC_RETURN_IF_ERROR(Number(*window, "window", "seconds", &r->window_seconds));
  EPIC_RETURN_IF_ERROR(Number(*window, "window", "ema_alpha", &r->ema_alpha));
  const json* measured = nullptr;
  EPIC_RETURN_IF_ERROR(Member(*window, "window", "measured", &measured));
  if (!measured->is_boolean()) return Problem("window.measured", "expected true or false, " + Got(*measured));
  r->measured = measured->get<bool>();

  const json* layers = nullptr;
  EPIC_RETURN_IF_ERROR(Array(j, "", "layers", &layers));
  for (size_t l = 0; l < layers->size(); ++l) {
    LayerView layer;
    EPIC_RETURN_IF_ERROR(ParseLayer((*layers)[l], At("layers", l), *r, &layer));
    r->layers.push_back(std::move(layer));
  }

  const json* overall = nullptr;
  EPIC_RETURN_IF_ERROR(Member(j, "", "overall", &overall));
  EPIC_RETURN_IF_ERROR(Number(*overall, "overall", "tokens", &r->tokens));
  const json* side = nullptr;
  EPIC_RETURN_IF_ERROR(Member(*overall, "overall", "current", &side));
  EPIC_RETURN_IF_ERROR(Balance(*side, "overall.current", &r->current));
  EPIC_RETURN_IF_ERROR(Member(*overall, "overall", "planned", &side));
  EPIC_RETURN_IF_ERROR(Balance(*side, "overall.planned", &r->planned));
  EPIC_RETURN_IF_ERROR(Integer(*overall, "overall", "experts_moved", &r->experts_moved));

  const json* a2a = nullptr;
  EPIC_RETURN_IF_ERROR(Array(j, "", "all_to_all", &a2a));
  for (size_t i = 0; i < a2a->size(); ++i) {
    const json& t = (*a2a)[i];
    const std::string path = At("all_to_all", i);
    AllToAllView v;
    EPIC_RETURN_IF_ERROR(Integer(t, path, "rank", &v.rank));
    if (v.rank < 0 || v.rank >= r->ranks) {
      return Problem(At(path, "rank"), Format("rank %lld of %lld", static_cast<long long>(v.rank),
                                              static_cast<long long>(r->ranks)));
    }
    EPIC_RETURN_IF_ERROR(Number(t, path, "dispatch_bytes_sent", &v.dispatch_sent));
    EPIC_RETURN_IF_ERROR(Number(t, path, "dispatch_bytes_received", &v.dispatch_received));
    EPIC_RETURN_IF_ERROR(Number(t, path, "combine_bytes_sent", &v.combine_sent));
    EPIC_RETURN_IF_ERROR(Number(t, path, "combine_bytes_received", &v.combine_received));
    EPIC_RETURN_IF_ERROR(Number(t, path, "dispatch_seconds", &v.dispatch_seconds));
    EPIC_RETURN_IF_ERROR(Number(t, path, "combine_seconds", &v.combine_seconds));
    r->all_to_all.push_back(v);
  }

  const json* history = nullptr;
  EPIC_RETURN_IF_ERROR(Array(j, "", "history", &history));
  for (size_t i = 0; i < history->size(); ++i) {
    HistoryView h;
    EPIC_RETURN_IF_ERROR(Integer((*history)[i], At("history", i), "step", &h.step));
    EPIC_RETURN_IF_ERROR(Number((*history)[i], At("history", i), "imbalance", &h.imbalance));
    r->history.push_back(h);
  }

  const json* rebalances = nullptr;
  EPIC_RETURN_IF_ERROR(Array(j, "", "rebalances", &rebalances));
  for (size_t i = 0; i < rebalances->size(); ++i) {
    const json& b = (*rebalances)[i];
    const std::string path = At("rebalances", i);
    RebalanceView v;
    EPIC_RETURN_IF_ERROR(Integer(b, path, "step", &v.step));
    EPIC_RETURN_IF_ERROR(Integer(b, path, "experts_moved", &v.experts_moved));
    EPIC_RETURN_IF_ERROR(Integer(b, path, "bytes_loaded", &v.bytes_loaded));
    EPIC_RETURN_IF_ERROR(Number(b, path, "seconds", &v.seconds));
    EPIC_RETURN_IF_ERROR(Number(b, path, "imbalance_before", &v.imbalance_before));
    EPIC_RETURN_IF_ERROR(Number(b, path, "imbalance_after", &v.imbalance_after));
    r->rebalances.push_back(v);
  }

  if (j.contains("cache")) EPIC_RETURN_IF_ERROR(ParseCache(j["cache"], &r->cache));
  return OkStatus();
}

StatusOr<ReportView> Parse(const json& j) {
  ReportView r;
  // The checks above should leave nlohmann nothing to throw about; this is the net
  // under them, since the document comes from outside.
  try {
    EPIC_RETURN_IF_ERROR(ParseReport(j, &r));
  } catch (const json::exception& e) {
    return InvalidArgumentError(std::string("load report: malformed: ") + e.what());
  }
  return r;
}

// Per rank, the load summed over layers: [rank].
std::vector<double> RankTotals(const ReportView& r, SideView LayerView::*side) {
  std::vector<double> total(static_cast<size_t>(r.ranks), 0.0);
  for (const LayerView& layer : r.layers) {
    const std::vector<double>& load = (layer.*side).rank_load;
    for (size_t i = 0; i < load.size(); ++i) total[i] += load[i];
  }
  return total;
}

constexpr double kMiB = 1024.0 * 1024.0;

// --- Text -------------------------------------------------------------------------

// The model name as the terminal should show it: no control characters from the document.
std::string Printable(const std::string& s) {
  if (s.empty()) return "(model unknown)";
  std::string out = s;
  for (char& c : out) {
    if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) c = '?';
  }
  return out;
}

// One line on what the latent cache saves against MHA, for the checkpoint at hand.
std::string CacheSaving(const CacheView& c) {
  if (c.forms.empty()) return "";
  return Format("%s's cache is %.1f%% smaller than MHA's of the same heads for this model.",
                Printable(c.forms[0].attention).c_str(), 100.0 * (1.0 - c.forms[0].fraction_of_mha));
}

std::string CacheText(const CacheView& c) {
  std::string out = Format("latent cache: --attention %s, %lld ranks of %lld blocks of %lld tokens; %lld of %lld blocks "
                           "in use\n",
                           Printable(c.attention).c_str(), static_cast<long long>(c.ranks),
                           static_cast<long long>(c.blocks_per_rank), static_cast<long long>(c.block_size),
                           static_cast<long long>(c.blocks_in_use), static_cast<long long>(c.blocks_total));
  out += Format("%-22s %12s %7s %12s %12s %12s\n", "cache form", "B/token/lyr", "of MHA", "tokens/rank",
                "cluster tp", "cluster dp");
  for (const CacheFormView& f : c.forms) {
    out += Format("%-22s %12lld %6.1f%% %12lld %12lld %12lld\n", Printable(f.attention).c_str(),
                  static_cast<long long>(f.bytes_per_token_per_layer), 100.0 * f.fraction_of_mha,
                  static_cast<long long>(f.tokens_per_rank), static_cast<long long>(f.cluster_tokens_tp),
                  static_cast<long long>(f.cluster_tokens_dp));
  }
  return out + CacheSaving(c) + "\n";
}

std::string Text(const ReportView& r) {
  std::string out;
  out += Format("epic load report: %s, %lld ranks, %lld experts, %lld slots per rank now, %lld planned\n",
                Printable(r.model_type).c_str(), static_cast<long long>(r.ranks),
                static_cast<long long>(r.experts), static_cast<long long>(r.slots_current),
                static_cast<long long>(r.slots_planned));
  if (r.window_steps > 0) {
    out += Format("window: %lld steps (%lld to %lld, %.1f s); rank loads %s\n", static_cast<long long>(r.window_steps),
                  static_cast<long long>(r.first_step), static_cast<long long>(r.last_step), r.window_seconds,
                  r.measured ? "measured" : "predicted from the placement");
  } else {
    out += Format("window: none (built offline); rank loads %s\n",
                  r.measured ? "measured" : "predicted from the placement");
  }
  out += "\n";
  out += Format("%-22s %9s %9s\n", "overall", "current", "planned");
  out += Format("%-22s %9.3f %9.3f\n", "imbalance (max/mean)", r.current.imbalance, r.planned.imbalance);
  out += Format("%-22s %9.3f %9.3f\n", "balancedness", r.current.balancedness, r.planned.balancedness);
  out += Format("%-22s %9lld\n", "experts moved", static_cast<long long>(r.experts_moved));
  out += Format("%-22s %9.0f\n", "expert tokens", r.tokens);  // summed over layers

  out += "\n";
  if (r.layers.empty()) {
    out += "no MoE layers in this report\n";
  } else {
    out += Format("%6s %9s %9s  %s\n", "layer", "current", "planned",
                  "hottest experts: id, share of the layer's tokens");
    for (const LayerView& layer : r.layers) {
      std::string hot;
      for (size_t i = 0; i < std::min<size_t>(3, layer.hottest.size()); ++i) {
        const HotView& h = layer.hottest[i];
        hot += Format("  %5lld %5.1f%%", static_cast<long long>(h.expert), 100.0 * h.share);
      }
      out += Format("%6lld %9.3f %9.3f%s\n", static_cast<long long>(layer.layer), layer.current.imbalance,
                    layer.planned.imbalance, hot.c_str());
    }

    const std::vector<double> now = RankTotals(r, &LayerView::current);
    const std::vector<double> planned = RankTotals(r, &LayerView::planned);
    std::map<int64_t, const AllToAllView*> a2a;
    for (const AllToAllView& t : r.all_to_all) a2a[t.rank] = &t;
    out += "\n";
    out += Format("%6s %14s %14s", "rank", "load now", "load planned");
    if (!a2a.empty()) out += Format("  %12s %12s %11s %11s", "a2a MiB sent", "a2a MiB recv", "dispatch s", "combine s");
    out += "\n";
    for (size_t i = 0; i < now.size(); ++i) {
      out += Format("%6zu %14.0f %14.0f", i, now[i], planned[i]);
      const auto t = a2a.find(static_cast<int64_t>(i));
      if (t != a2a.end()) {
        out += Format("  %12.2f %12.2f %11.3f %11.3f", (t->second->dispatch_sent + t->second->combine_sent) / kMiB,
                      (t->second->dispatch_received + t->second->combine_received) / kMiB,
                      t->second->dispatch_seconds, t->second->combine_seconds);
      }
      out += "\n";
    }
  }

  if (r.cache.present) out += "\n" + CacheText(r.cache);

  if (!r.rebalances.empty()) {
    out += "\n";
    out += "past rebalances\n";
    out += Format("%10s %13s %12s %10s  %s\n", "step", "experts moved", "MiB loaded", "seconds",
                  "imbalance before -> after");
    for (const RebalanceView& b : r.rebalances) {
      out += Format("%10lld %13lld %12.1f %10.3f  %s\n", static_cast<long long>(b.step),
                    static_cast<long long>(b.experts_moved), static_cast<double>(b.bytes_loaded) / kMiB, b.seconds,
                    Format("%.3f -> %.3f", b.imbalance_before, b.imbalance_after).c_str());
    }
  }
  return out;
}

// --- HTML -------------------------------------------------------------------------

std::string Escape(const std::string& s) {
  std::string out;
  out.reserve(s.size());
  for (char c : s) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&quot;"; break;
      case '\'': out += "&#39;"; break;
      default: out += c;
    }
  }
  return out;
}

// A token count as an axis label: 0, 250, 20k, 1.5M.
std::string Compact(double v) {
  const double a = std::fabs(v);
  if (a >= 1e9) return Format("%.3gG", v / 1e9);
  if (a >= 1e6) return Format("%.3gM", v / 1e6);
  if (a >= 1e3) return Format("%.3gk", v / 1e3);
  return Format("%.3g", v);
}

// A round distance between axis ticks (1, 2 or 5 times a power of ten) giving about
// TICKS ticks over RANGE.
double TickStep(double range, int ticks) {
  if (!(range > 0)) return 1;
  const double raw = range / ticks;
  const double magnitude = std::pow(10.0, std::floor(std::log10(raw)));
  const double norm = raw / magnitude;
  return (norm <= 1 ? 1 : norm <= 2 ? 2 : norm <= 5 ? 5 : 10) * magnitude;
}

// Ticks of STEP over RANGE; 1 where the numbers are beyond drawing (sums that overflow).
int TickCount(double range, double step) {
  const double n = std::round(range / step);
  return std::isfinite(n) && n >= 1 && n <= 20 ? static_cast<int>(n) : 1;
}

// A sequential scale from pale (no tokens) to dark red (the hottest cell).
std::string HeatColor(double t) {
  struct Stop { double at, r, g, b; };
  static constexpr Stop kStops[] = {{0.0, 252, 250, 240}, {0.35, 250, 170, 70}, {0.7, 210, 40, 40}, {1.0, 90, 0, 40}};
  t = std::clamp(t, 0.0, 1.0);
  size_t i = 1;
  while (i + 1 < std::size(kStops) && t > kStops[i].at) ++i;
  const Stop& a = kStops[i - 1];
  const Stop& b = kStops[i];
  const double f = (t - a.at) / (b.at - a.at);
  return Format("#%02x%02x%02x", static_cast<int>(std::lround(a.r + f * (b.r - a.r))),
                static_cast<int>(std::lround(a.g + f * (b.g - a.g))),
                static_cast<int>(std::lround(a.b + f * (b.b - a.b))));
}

// Every how many items to label an axis so that labels do not overlap.
size_t LabelEvery(size_t items, double item_px, double label_px) {
  size_t every = 1;
  while (every < items && every * item_px < label_px) every *= 2;
  return every;
}

std::string Heatmap(const ReportView& r) {
  if (r.layers.empty() || r.experts == 0) return "<p class=\"note\">No MoE layers in this report.</p>\n";
  const size_t layers = r.layers.size();
  const size_t experts = static_cast<size_t>(r.experts);
  const double cell_w = std::clamp(960.0 / static_cast<double>(experts), 2.0, 16.0);
  const double cell_h = std::clamp(480.0 / static_cast<double>(layers), 3.0, 16.0);
  const double left = 56, top = 24, plot_w = cell_w * static_cast<double>(experts),
               plot_h = cell_h * static_cast<double>(layers);
  const double legend_x = left + plot_w + 24;
  const double width = legend_x + 90, height = top + plot_h + 44;
  double max_tokens = 0;
  for (const LayerView& layer : r.layers) {
    for (double v : layer.expert_tokens) max_tokens = std::max(max_tokens, v);
  }

  std::string s = Format("<svg class=\"chart\" id=\"heatmap\" width=\"%.0f\" height=\"%.0f\" "
                         "viewBox=\"0 0 %.0f %.0f\" role=\"img\" aria-label=\"expert tokens per layer\">\n",
                         width, std::max(height, top + 160.0), width, std::max(height, top + 160.0));
  for (size_t l = 0; l < layers; ++l) {
    const LayerView& layer = r.layers[l];
    const double y = top + cell_h * static_cast<double>(l);
    for (size_t e = 0; e < experts; ++e) {
      const double v = layer.expert_tokens[e];
      s += Format("<rect x=\"%.2f\" y=\"%.2f\" width=\"%.2f\" height=\"%.2f\" fill=\"%s\">"
                  "<title>layer %lld, expert %zu: %.0f tokens</title></rect>\n",
                  left + cell_w * static_cast<double>(e), y, cell_w, cell_h,
                  HeatColor(max_tokens > 0 ? v / max_tokens : 0).c_str(), static_cast<long long>(layer.layer), e, v);
    }
  }
  // Layer ids down the left, expert indices along the bottom.
  const size_t layer_every = LabelEvery(layers, cell_h, 11);
  for (size_t l = 0; l < layers; l += layer_every) {
    s += Format("<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"end\" dominant-baseline=\"middle\">%lld</text>\n",
                left - 4, top + cell_h * (static_cast<double>(l) + 0.5), static_cast<long long>(r.layers[l].layer));
  }
  const size_t expert_every = LabelEvery(experts, cell_w, 28);
  for (size_t e = 0; e < experts; e += expert_every) {
    const double x = left + cell_w * (static_cast<double>(e) + 0.5);
    s += Format("<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#444\"/>"
                "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">%zu</text>\n",
                x, top + plot_h, x, top + plot_h + 4, x, top + plot_h + 16, e);
  }
  s += Format("<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">expert</text>\n", left + plot_w / 2,
              top + plot_h + 36);
  s += Format("<text transform=\"translate(14 %.1f) rotate(-90)\" text-anchor=\"middle\">layer</text>\n",
              top + plot_h / 2);
  // Legend: the colour scale from 0 to the hottest cell's tokens.
  const double legend_h = 140;
  s += "<defs><linearGradient id=\"heat-scale\" x1=\"0\" y1=\"1\" x2=\"0\" y2=\"0\">";
  for (int i = 0; i <= 10; ++i) {
    s += Format("<stop offset=\"%.1f\" stop-color=\"%s\"/>", i / 10.0, HeatColor(i / 10.0).c_str());
  }
  s += "</linearGradient></defs>\n";
  s += Format("<rect x=\"%.1f\" y=\"%.1f\" width=\"14\" height=\"%.0f\" fill=\"url(#heat-scale)\" stroke=\"#444\"/>\n",
              legend_x, top, legend_h);
  s += Format("<text x=\"%.1f\" y=\"%.1f\">tokens</text>\n", legend_x, top - 10);
  s += Format("<text x=\"%.1f\" y=\"%.1f\" dominant-baseline=\"middle\">%s</text>\n", legend_x + 18, top,
              Compact(max_tokens).c_str());
  s += Format("<text x=\"%.1f\" y=\"%.1f\" dominant-baseline=\"middle\">0</text>\n", legend_x + 18,
              top + legend_h);
  s += "</svg>\n";
  return s;
}

std::string RankBars(const ReportView& r) {
  if (r.layers.empty()) return "<p class=\"note\">No MoE layers in this report.</p>\n";
  const std::vector<double> now = RankTotals(r, &LayerView::current);
  const std::vector<double> planned = RankTotals(r, &LayerView::planned);
  const size_t ranks = now.size();
  double max_load = 0, mean = 0;
  for (size_t i = 0; i < ranks; ++i) {
    max_load = std::max({max_load, now[i], planned[i]});
    mean += now[i] / static_cast<double>(ranks);
  }
  const double tick = TickStep(max_load, 4);
  const double y_max = max_load > 0 ? std::ceil(max_load * 1.02 / tick) * tick : 1;
  const int ticks = TickCount(y_max, tick);
  const double group_w = std::clamp(800.0 / static_cast<double>(ranks), 6.0, 64.0);
  const double bar_w = group_w * 0.4;
  const double left = 72, top = 24, plot_w = group_w * static_cast<double>(ranks), plot_h = 220;
  const double width = left + plot_w + 16, height = top + plot_h + 44;
  // Bars start at 0: a negative load (a producer's bug) draws as none.
  const auto y_of = [&](double v) { return top + plot_h - plot_h * std::max(v, 0.0) / y_max; };

  std::string s = Format("<svg class=\"chart\" id=\"rank-load\" width=\"%.0f\" height=\"%.0f\" "
                         "viewBox=\"0 0 %.0f %.0f\" role=\"img\" aria-label=\"load per rank\">\n",
                         std::max(width, 320.0), height, std::max(width, 320.0), height);
  for (int i = 0; i <= ticks; ++i) {
    const double v = y_max * i / ticks;
    s += Format("<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#ddd\"/>"
                "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"end\" dominant-baseline=\"middle\">%s</text>\n",
                left, y_of(v), left + plot_w, y_of(v), left - 4, y_of(v), Compact(v).c_str());
  }
  for (size_t i = 0; i < ranks; ++i) {
    const double x = left + group_w * static_cast<double>(i) + group_w * 0.1;
    s += Format("<rect x=\"%.2f\" y=\"%.2f\" width=\"%.2f\" height=\"%.2f\" fill=\"#c0504d\">"
                "<title>rank %zu now: %.0f</title></rect>\n",
                x, y_of(now[i]), bar_w, top + plot_h - y_of(now[i]), i, now[i]);
    s += Format("<rect x=\"%.2f\" y=\"%.2f\" width=\"%.2f\" height=\"%.2f\" fill=\"#4f81bd\">"
                "<title>rank %zu planned: %.0f</title></rect>\n",
                x + bar_w, y_of(planned[i]), bar_w, top + plot_h - y_of(planned[i]), i, planned[i]);
  }
  const size_t every = LabelEvery(ranks, group_w, 24);
  for (size_t i = 0; i < ranks; i += every) {
    s += Format("<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">%zu</text>\n",
                left + group_w * (static_cast<double>(i) + 0.5), top + plot_h + 16, i);
  }
  s += Format("<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#222\" stroke-dasharray=\"5 3\">"
              "<title>mean: %.0f</title></line>\n",
              left, y_of(mean), left + plot_w, y_of(mean), mean);
  s += Format("<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#222\"/>\n", left, top + plot_h,
              left + plot_w, top + plot_h);
  s += Format("<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">rank</text>\n", left + plot_w / 2,
              top + plot_h + 36);
  s += Format("<text transform=\"translate(14 %.1f) rotate(-90)\" text-anchor=\"middle\">tokens</text>\n",
              top + plot_h / 2);
  s += Format("<rect x=\"%.1f\" y=\"4\" width=\"10\" height=\"10\" fill=\"#c0504d\"/>"
              "<text x=\"%.1f\" y=\"13\">current</text>"
              "<rect x=\"%.1f\" y=\"4\" width=\"10\" height=\"10\" fill=\"#4f81bd\"/>"
              "<text x=\"%.1f\" y=\"13\">planned</text>"
              "<line x1=\"%.1f\" y1=\"9\" x2=\"%.1f\" y2=\"9\" stroke=\"#222\" stroke-dasharray=\"5 3\"/>"
              "<text x=\"%.1f\" y=\"13\">mean now</text>\n",
              left, left + 14, left + 80, left + 94, left + 160, left + 180, left + 184);
  s += "</svg>\n";
  return s;
}

std::string History(const ReportView& r) {
  if (r.history.empty()) {
    return "<p class=\"note\" id=\"history-empty\">No imbalance history in this report: it is built offline or "
           "the coordinator has not completed a step yet.</p>\n";
  }
  int64_t first = r.history.front().step, last = first;
  double lo = 1, hi = 1;  // 1 is perfect balance: always on the axis
  for (const HistoryView& h : r.history) {
    first = std::min(first, h.step);
    last = std::max(last, h.step);
    lo = std::min(lo, h.imbalance);
    hi = std::max(hi, h.imbalance);
  }
  const double span = static_cast<double>(last - first);
  const double tick = TickStep(std::max(hi - lo, 0.05), 4);
  lo = std::floor(lo / tick) * tick;
  hi = std::max(std::ceil(hi / tick) * tick, lo + tick);
  const int ticks = TickCount(hi - lo, tick);
  const int decimals = std::max(0, static_cast<int>(-std::floor(std::log10(tick))));
  const double left = 64, top = 24, plot_w = 800, plot_h = 220;
  const double width = left + plot_w + 16, height = top + plot_h + 44;
  const auto x_of = [&](int64_t step) {
    return left + (span > 0 ? plot_w * static_cast<double>(step - first) / span : plot_w / 2);
  };
  const auto y_of = [&](double v) { return top + plot_h - plot_h * (v - lo) / (hi - lo); };

  std::string s = Format("<svg class=\"chart\" id=\"history\" width=\"%.0f\" height=\"%.0f\" "
                         "viewBox=\"0 0 %.0f %.0f\" role=\"img\" aria-label=\"imbalance over time\">\n",
                         width, height, width, height);
  for (int i = 0; i <= ticks; ++i) {
    const double v = lo + tick * i;
    s += Format("<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#ddd\"/>"
                "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"end\" dominant-baseline=\"middle\">%.*f</text>\n",
                left, y_of(v), left + plot_w, y_of(v), left - 4, y_of(v), decimals, v);
  }
  const int step_ticks = static_cast<int>(std::min(4.0, span));
  for (int i = 0; i <= step_ticks; ++i) {
    const int64_t step = first + (step_ticks > 0 ? static_cast<int64_t>(std::llround(span * i / step_ticks)) : 0);
    s += Format("<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">%lld</text>\n", x_of(step), top + plot_h + 16,
                static_cast<long long>(step));
  }
  // Rebalances inside the history's span, as dashed verticals.
  for (const RebalanceView& b : r.rebalances) {
    if (b.step < first || b.step > last) continue;
    s += Format("<g class=\"rebalance\"><line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#2a7\" "
                "stroke-width=\"1.5\" stroke-dasharray=\"4 3\"/>"
                "<text x=\"%.1f\" y=\"%.1f\" fill=\"#2a7\">rebalance</text>"
                "<title>step %lld: %lld experts moved, %.3f -&gt; %.3f</title></g>\n",
                x_of(b.step), top, x_of(b.step), top + plot_h, x_of(b.step) + 3, top + 10,
                static_cast<long long>(b.step), static_cast<long long>(b.experts_moved), b.imbalance_before,
                b.imbalance_after);
  }
  if (r.history.size() == 1) {
    s += Format("<circle cx=\"%.1f\" cy=\"%.1f\" r=\"3\" fill=\"#c0504d\"/>\n", x_of(first),
                y_of(r.history.front().imbalance));
  } else {
    s += "<polyline fill=\"none\" stroke=\"#c0504d\" stroke-width=\"1.5\" points=\"";
    for (const HistoryView& h : r.history) s += Format("%.1f,%.1f ", x_of(h.step), y_of(h.imbalance));
    s += "\"/>\n";
  }
  s += Format("<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#222\"/>\n", left, top + plot_h,
              left + plot_w, top + plot_h);
  s += Format("<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">step</text>\n", left + plot_w / 2,
              top + plot_h + 36);
  s += Format("<text transform=\"translate(14 %.1f) rotate(-90)\" text-anchor=\"middle\">imbalance "
              "(max/mean)</text>\n",
              top + plot_h / 2);
  s += "</svg>\n";
  return s;
}

std::string Html(const ReportView& r) {
  const std::string model = Escape(r.model_type.empty() ? "(model unknown)" : r.model_type);
  std::string s;
  s += "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n";
  s += "<title>epic load report: " + model + "</title>\n";
  s += "<style>\n"
       "body { font-family: sans-serif; margin: 24px; color: #222; }\n"
       "h1 { font-size: 20px; } h2 { font-size: 16px; margin-top: 28px; }\n"
       "table { border-collapse: collapse; } th, td { padding: 2px 12px; text-align: right; }\n"
       "th:first-child, td:first-child { text-align: left; }\n"
       "tr:nth-child(even) td { background: #f4f4f4; }\n"
       ".note { color: #555; font-size: 13px; }\n"
       "svg.chart { font-size: 11px; display: block; }\n"
       "</style>\n</head>\n<body>\n";
  s += "<h1>epic load report: " + model + "</h1>\n";
  if (r.window_steps > 0) {
    s += Format("<p class=\"note\">%lld ranks, %lld experts. Window: %lld steps (%lld to %lld, %.1f s). "
                "Current rank loads are %s; planned ones are predicted.</p>\n",
                static_cast<long long>(r.ranks), static_cast<long long>(r.experts),
                static_cast<long long>(r.window_steps), static_cast<long long>(r.first_step),
                static_cast<long long>(r.last_step), r.window_seconds,
                r.measured ? "measured" : "predicted from the placement");
  } else {
    s += Format("<p class=\"note\">%lld ranks, %lld experts. Built offline from a loads file: rank loads are "
                "predicted from the placement.</p>\n",
                static_cast<long long>(r.ranks), static_cast<long long>(r.experts));
  }
  s += "<table id=\"overall\">\n<tr><th></th><th>current</th><th>planned</th></tr>\n";
  s += Format("<tr><td>imbalance (max/mean)</td><td>%.3f</td><td>%.3f</td></tr>\n", r.current.imbalance,
              r.planned.imbalance);
  s += Format("<tr><td>balancedness (mean/max)</td><td>%.3f</td><td>%.3f</td></tr>\n", r.current.balancedness,
              r.planned.balancedness);
  s += Format("<tr><td>slots per rank</td><td>%lld</td><td>%lld</td></tr>\n", static_cast<long long>(r.slots_current),
              static_cast<long long>(r.slots_planned));
  s += Format("<tr><td>experts moved</td><td></td><td>%lld</td></tr>\n", static_cast<long long>(r.experts_moved));
  s += Format("<tr><td>expert tokens</td><td>%.0f</td><td></td></tr>\n", r.tokens);
  s += "</table>\n";
  s += "<h2>Expert tokens, layers &times; experts</h2>\n" + Heatmap(r);
  s += "<h2>Load per rank, summed over layers: current and planned</h2>\n" + RankBars(r);
  s += "<h2>Imbalance over time</h2>\n" + History(r);
  if (r.cache.present) {
    const CacheView& c = r.cache;
    s += "<h2>Latent cache</h2>\n";
    s += Format("<p class=\"note\">--attention %s, %lld ranks of %lld blocks of %lld tokens; %lld of %lld blocks in "
                "use. %s</p>\n",
                Escape(c.attention).c_str(), static_cast<long long>(c.ranks), static_cast<long long>(c.blocks_per_rank),
                static_cast<long long>(c.block_size), static_cast<long long>(c.blocks_in_use),
                static_cast<long long>(c.blocks_total), Escape(CacheSaving(c)).c_str());
    s += "<table id=\"cache\">\n<tr><th>cache form</th><th>bytes per token and layer</th><th>of MHA</th>"
         "<th>tokens per rank</th><th>cluster, tp</th><th>cluster, dp</th></tr>\n";
    for (const CacheFormView& f : c.forms) {
      s += Format("<tr><td>%s</td><td>%lld</td><td>%.1f%%</td><td>%lld</td><td>%lld</td><td>%lld</td></tr>\n",
                  Escape(f.attention).c_str(), static_cast<long long>(f.bytes_per_token_per_layer),
                  100.0 * f.fraction_of_mha, static_cast<long long>(f.tokens_per_rank),
                  static_cast<long long>(f.cluster_tokens_tp), static_cast<long long>(f.cluster_tokens_dp));
    }
    s += "</table>\n";
  }
  s += "</body>\n</html>\n";
  return s;
}

}  // namespace

Status ValidateLoadReport(const json& report) {
  auto view = Parse(report);
  return view.ok() ? OkStatus() : view.status();
}

StatusOr<std::string> RenderText(const json& report) {
  EPIC_ASSIGN_OR_RETURN(const ReportView view, Parse(report));
  return Text(view);
}

StatusOr<std::string> RenderHtml(const json& report) {
  EPIC_ASSIGN_OR_RETURN(const ReportView view, Parse(report));
  return Html(view);
}

}  // namespace epic::coordinator
