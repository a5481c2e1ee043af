// Token id lists as the command lines take them: "5,17,300".
#pragma once

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/status.h"

namespace epic {

// "5,17,300" -> {5, 17, 300}. INVALID_ARGUMENT naming FLAG and the bad item.
inline StatusOr<std::vector<int32_t>> ParseTokenList(const std::string& flag, const std::string& text) {
  std::vector<int32_t> out;
  std::stringstream in(text);
  std::string item;
  while (std::getline(in, item, ',')) {
    try {
      size_t used = 0;
      const long long v = std::stoll(item, &used);
      if (used != item.size() || v < 0 || v > INT32_MAX) throw std::invalid_argument(item);
      out.push_back(static_cast<int32_t>(v));
    } catch (const std::exception&) {
      return InvalidArgumentError(flag + ": '" + item + "' is not a token id (want e.g. 5,17,300)");
    }
  }
  if (out.empty()) return InvalidArgumentError(flag + ": no token ids given");
  return out;
}

}  // namespace epic
