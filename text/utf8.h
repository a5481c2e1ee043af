// UTF-8 as text handling needs it: validation, and the lossy reading of bytes that
// Hugging Face's decode and Python's decode("utf-8", "replace") share (each maximal
// invalid subpart becomes one U+FFFD), written once so that streaming and whole decodes
// agree by construction.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

namespace epic::text {

inline constexpr std::string_view kReplacementChar = "\xEF\xBF\xBD";  // U+FFFD

// The length of the well-formed UTF-8 sequence at the start of S (1-4), 0 when S starts
// with an invalid one, or -N when S holds only the first N bytes of a sequence that
// more bytes could still complete.
int Utf8SequenceLength(std::string_view s);

// Appends code point CP to OUT as UTF-8. REQUIRES: CP is a Unicode scalar value.
inline void AppendUtf8(std::string& out, char32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

// Whether S is well-formed UTF-8; when not, *BAD_OFFSET is where it goes wrong.
bool IsValidUtf8(std::string_view s, size_t* bad_offset = nullptr);

// Appends BYTES to OUT as text, each maximal invalid subpart replaced by U+FFFD. With
// HOLD_INCOMPLETE, an incomplete sequence at the end is not consumed: the return value
// is how many bytes were (the rest waits for more). Without it everything is consumed.
size_t AppendLossyUtf8(std::string_view bytes, std::string* out, bool hold_incomplete = false);

}  // namespace epic::text
