#include "text/detokenizer.h"

#include <algorithm>

#include "text/utf8.h"

namespace epic::text {

std::string StreamDecoder::Add(int32_t id) {
  pending_ += tokenizer_.TokenBytes(id, skip_special_);
  std::string text;
  const size_t used = AppendLossyUtf8(pending_, &text, /*hold_incomplete=*/true);
  pending_.erase(0, used);
  return text;
}

std::string StreamDecoder::Finish() {
  std::string text;
  AppendLossyUtf8(pending_, &text);
  pending_.clear();
  return text;
}

StopStrings::StopStrings(std::vector<std::string> stops) : stops_(std::move(stops)) {
  std::erase_if(stops_, [](const std::string& s) { return s.empty(); });
}

std::string StopStrings::Add(std::string_view delta) {
  if (stopped_) return {};
  held_ += delta;
  // The stop string complete first wins (at one end, the longest): every match in HELD_
  // ends in this delta, since an earlier one would have been found before.
  size_t first = std::string::npos, first_end = std::string::npos;
  for (const std::string& stop : stops_) {
    const size_t at = held_.find(stop);
    if (at == std::string::npos) continue;
    if (at + stop.size() < first_end || (at + stop.size() == first_end && at < first)) {
      first = at;
      first_end = at + stop.size();
      matched_ = stop;
    }
  }
  if (first != std::string::npos) {
    stopped_ = true;
    std::string out = held_.substr(0, first);
    held_.clear();
    return out;
  }
  // Keep the longest end of the text that begins some stop string.
  size_t keep = 0;
  for (const std::string& stop : stops_) {
    for (size_t n = std::min(stop.size() - 1, held_.size()); n > keep; --n) {
      if (held_.compare(held_.size() - n, n, stop, 0, n) == 0) {
        keep = n;
        break;
      }
    }
  }
  std::string out = held_.substr(0, held_.size() - keep);
  held_.erase(0, held_.size() - keep);
  return out;
}

std::string StopStrings::Finish() {
  if (stopped_) return {};
  std::string out;
  out.swap(held_);
  return out;
}

}  // namespace epic::text
