#include "text/utf8.h"

#include <cstdint>

namespace epic::text {

int Utf8SequenceLength(std::string_view s) {
  if (s.empty()) return 0;
  const auto b0 = static_cast<uint8_t>(s[0]);
  if (b0 < 0x80) return 1;
  int need;
  // The allowed range of the second byte excludes overlong forms and surrogates
  // (Unicode Table 3-7); later bytes are always 80..BF.
  uint8_t lo = 0x80, hi = 0xBF;
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    need = 2;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    need = 3;
    if (b0 == 0xE0) lo = 0xA0;
    if (b0 == 0xED) hi = 0x9F;
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    need = 4;
    if (b0 == 0xF0) lo = 0x90;
    if (b0 == 0xF4) hi = 0x8F;
  } else {
    return 0;
  }
  for (int i = 1; i < need; ++i) {
    if (static_cast<size_t>(i) >= s.size()) return -i;
    const auto b = static_cast<uint8_t>(s[i]);
    if (i == 1 ? (b < lo || b > hi) : (b < 0x80 || b > 0xBF)) return 0;
  }
  return need;
}

bool IsValidUtf8(std::string_view s, size_t* bad_offset) {
  size_t i = 0;
  while (i < s.size()) {
    // ASCII runs dominate real text: skip them eight at a time.
    while (i + 8 <= s.size()) {
      uint64_t word;
      __builtin_memcpy(&word, s.data() + i, 8);
      if (word & 0x8080808080808080ull) break;
      i += 8;
    }
    if (i >= s.size()) break;
    const int n = Utf8SequenceLength(s.substr(i));
    if (n <= 0) {
      if (bad_offset) *bad_offset = i;
      return false;
    }
    i += n;
  }
  return true;
}

size_t AppendLossyUtf8(std::string_view bytes, std::string* out, bool hold_incomplete) {
  size_t i = 0;
  while (i < bytes.size()) {
    const std::string_view rest = bytes.substr(i);
    const int n = Utf8SequenceLength(rest);
    if (n > 0) {
      out->append(rest.data(), n);
      i += n;
    } else if (n < 0) {
      // The bytes run out inside a sequence: its valid prefix is one maximal subpart.
      if (hold_incomplete) return i;
      out->append(kReplacementChar);
      i += -n;
    } else {
      // Invalid: the maximal subpart is the lead byte plus the continuation bytes that
      // were still allowed before the one that failed.
      int take = 1;
      const auto b0 = static_cast<uint8_t>(rest[0]);
      if (b0 >= 0xC2 && b0 <= 0xF4) {
        for (size_t k = 1; k < rest.size() && k < 4; ++k) {
          if (Utf8SequenceLength(rest.substr(0, k + 1)) != -static_cast<int>(k + 1)) break;
          take = static_cast<int>(k) + 1;
        }
      }
      out->append(kReplacementChar);
      i += take;
    }
  }
  return i;
}

}  // namespace epic::text
