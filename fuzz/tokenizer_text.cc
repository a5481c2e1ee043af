// Text through the small tokenizer as the coordinator serves it: a prompt encoded and
// decoded back, and ids streamed to text deltas and cut at stop strings.
// Input: one flag byte (bit 0: add special tokens, bit 1: parse special tokens, bit 2: skip
// special tokens when decoding), then the text, then up to four stop strings, each after a
// 0xFF byte (a byte UTF-8 never holds). The text read as 16-bit numbers, mapped onto [-64, 576), is decoded too.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "fuzz/fuzz_support.h"
#include "text/detokenizer.h"
#include "text/tokenizer.h"

namespace {

using epic::text::Tokenizer;

// IDS decoded in one go and streamed one id at a time must agree; then the stream is cut
// at STOPS and checked against where the first stop string to complete begins.
void CheckStream(const Tokenizer& t, const std::vector<int32_t>& ids, bool skip_special,
                 const std::vector<std::string>& stops) {
  const std::string decoded = t.Decode(ids, skip_special);
  epic::text::StreamDecoder stream(t, skip_special);
  epic::text::StopStrings cut(stops);
  std::string streamed, shown;
  for (const int32_t id : ids) {
    const std::string delta = stream.Add(id);
    streamed += delta;
    shown += cut.Add(delta);
  }
  const std::string tail = stream.Finish();
  streamed += tail;
  shown += cut.Add(tail);
  shown += cut.Finish();
  EPIC_FUZZ_CHECK(streamed == decoded);

  // The stop string that completes first (at one end, the one that begins first).
  size_t begin = std::string::npos, end = std::string::npos;
  for (const std::string& s : stops) {
    const size_t at = decoded.find(s);
    if (s.empty() || at == std::string::npos) continue;
    if (at + s.size() < end || (at + s.size() == end && at < begin)) {
      begin = at;
      end = at + s.size();
    }
  }
  EPIC_FUZZ_CHECK(cut.stopped() == (begin != std::string::npos));
  EPIC_FUZZ_CHECK(shown == decoded.substr(0, begin));
  if (cut.stopped()) EPIC_FUZZ_CHECK(decoded.compare(begin, end - begin, cut.matched()) == 0);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const bool add_special = data[0] & 1, parse_special = data[0] & 2, skip_special = data[0] & 4;
  std::vector<std::string> parts(1);
  for (size_t i = 1; i < size; ++i) {
    if (data[i] == 0xFF) {
      if (parts.size() == 5) break;
      parts.emplace_back();
    } else {
      parts.back() += static_cast<char>(data[i]);
    }
  }
  const std::string& text = parts[0];
  const std::vector<std::string> stops(parts.begin() + 1, parts.end());
  const Tokenizer& t = epic::fuzz::SmallTokenizer();

  auto ids = t.Encode(text, add_special, parse_special);
  if (ids.ok()) {
    for (const int32_t id : *ids) EPIC_FUZZ_CHECK(id >= 0 && id < t.size());
    CheckStream(t, *ids, skip_special, stops);
    // Without the BOS the tokenizer adds, a prompt decodes to itself (no normalizer).
    auto plain = t.Encode(text, /*add_special_tokens=*/false, parse_special);
    EPIC_FUZZ_CHECK(plain.ok());
    EPIC_FUZZ_CHECK(t.Decode(*plain) == text);
    (void)t.Pieces(text);
  }
  // Ids a worker could send back, known or not.
  std::vector<int32_t> raw;
  for (size_t i = 0; i + 1 < text.size(); i += 2) {
    const int32_t v = static_cast<uint8_t>(text[i]) | static_cast<uint8_t>(text[i + 1]) << 8;
    raw.push_back(v % 640 - 64);  // mostly known ids, some negative or past the vocabulary
  }
  CheckStream(t, raw, skip_special, stops);
  return 0;
}
