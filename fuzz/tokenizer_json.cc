// tokenizer.json, then a NUL byte, then tokenizer_config.json (optional), from the input,
// loaded as the coordinator loads a checkpoint's tokenizer; what loads must encode and
// decode a fixed text, and its chat template (if any) must parse or be refused.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "fuzz/fuzz_support.h"
#include "text/chat_template.h"
#include "text/detokenizer.h"
#include "text/tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  const size_t nul = input.find('\0');
  const std::string_view tokenizer_json = input.substr(0, nul);
  const std::string_view config_json = nul == std::string_view::npos ? std::string_view() : input.substr(nul + 1);
  auto tokenizer = epic::text::Tokenizer::FromJson(tokenizer_json, config_json);
  if (!tokenizer.ok()) return 0;
  const epic::text::Tokenizer& t = *tokenizer;

  const std::string text = "Hello, world! 你好 \t\n  12345 <｜begin▁of▁sentence｜>x" + t.bos_token() + t.eos_token();
  for (const bool parse_special : {true, false}) {
    auto ids = t.Encode(text, /*add_special_tokens=*/true, parse_special);
    if (!ids.ok()) continue;
    for (const int32_t id : *ids) {
      EPIC_FUZZ_CHECK(id >= 0 && id < t.size());
      (void)t.IdToToken(id);
      (void)t.IsSpecial(id);
    }
    const std::string decoded = t.Decode(*ids);
    epic::text::StreamDecoder stream(t);
    std::string streamed;
    for (const int32_t id : *ids) streamed += stream.Add(id);
    streamed += stream.Finish();
    EPIC_FUZZ_CHECK(streamed == decoded);
  }
  (void)t.Pieces(text);
  for (int32_t id = -1; id < 300 && id <= t.size(); ++id) {
    const std::string token = t.IdToToken(id);
    (void)t.TokenBytes(id, true);
    if (!token.empty()) (void)t.TokenToId(token);
  }
  (void)t.bos_id();
  (void)t.eos_id();
  if (!t.chat_template().empty()) (void)epic::text::ChatTemplate::Parse(t.chat_template());
  return 0;
}
