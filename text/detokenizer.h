// Text as a generation streams: ids become text deltas that never split a UTF-8
// character, and stop strings end the text where they begin, as OpenAI's `stop` does.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "text/tokenizer.h"

namespace epic::text {

// Turns a stream of ids into text deltas. The concatenation of every Add and the final
// Finish equals tokenizer.Decode(all ids): bytes that may still complete a character wait
// for the next id; Finish replaces what never completed.
class StreamDecoder {
 public:
  // TOKENIZER must outlive the decoder.
  explicit StreamDecoder(const Tokenizer& tokenizer, bool skip_special_tokens = false)
      : tokenizer_(tokenizer), skip_special_(skip_special_tokens) {}
  // The text that id completes (often empty inside a multi-byte character).
  std::string Add(int32_t id);
  std::string Finish();

 private:
  const Tokenizer& tokenizer_;
  bool skip_special_;
  std::string pending_;  // bytes of an incomplete character
};

// Holds text back while it may still be the start of a stop string. Add returns the text
// that is safe to show; once a stop string is complete, the text before it is returned,
// the rest (and everything after) is dropped, and stopped() turns true. Of stop strings
// complete at once, the one that ends first wins, as when generation stops at it.
class StopStrings {
 public:
  explicit StopStrings(std::vector<std::string> stops);
  std::string Add(std::string_view delta);
  // The end of the stream: what was held back, when no stop string came.
  std::string Finish();
  bool stopped() const { return stopped_; }
  // The stop string that matched (empty while none has).
  const std::string& matched() const { return matched_; }

 private:
  std::vector<std::string> stops_;
  std::string held_;
  bool stopped_ = false;
  std::string matched_;
};

}  // namespace epic::text
