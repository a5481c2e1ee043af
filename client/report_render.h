// Load reports (schema "epic.load_report/1", docs/load_balance.md) rendered for people:
// a terminal table, or one self-contained HTML page with inline SVG charts. The report
// comes from a server or a file, so it is checked field by field before any of it is
// used; a document that does not follow the schema is an INVALID_ARGUMENT naming the
// first field at fault, never a crash.
#pragma once

#include <string>

#include <nlohmann/json.hpp>

#include "common/status.h"

namespace epic::coordinator {

// OK when REPORT has every field of epic.load_report/1 with the right type, and its
// per-layer lists agree with "ranks" and "experts".
Status ValidateLoadReport(const nlohmann::json& report);

// Fixed-width text: the overall numbers, one row per layer (current and planned
// imbalance, the hottest experts), one row per rank (load summed over layers,
// all-to-all traffic when measured), then past rebalances.
StatusOr<std::string> RenderText(const nlohmann::json& report);

// One HTML document, nothing loaded from elsewhere: the overall numbers, a layers x
// experts heatmap of expert tokens, per-rank load before and after the plan, and
// imbalance over the window's history with rebalances marked.
StatusOr<std::string> RenderHtml(const nlohmann::json& report);

}  // namespace epic::coordinator
