// A checkpoint's tokenizer: Hugging Face `tokenizers` JSON (tokenizer.json) as DeepSeek
// publishes it, with tokenizer_config.json beside it. Byte-level BPE; added tokens matched
// in the raw text before pre-tokenization; Split pre-tokenizers through PCRE2 (UTF + UCP,
// JIT). Whatever the file asks for that this class cannot honour is refused at load with
// the JSON path named, never encoded differently.
//
// Thread-safe after Load: Encode and Decode are const and may run concurrently.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"

namespace epic::text {

// The byte-level alphabet (GPT-2's): each byte is shown as a printable code point, so a
// vocabulary string never holds spaces or control characters. Returns the UTF-8 of byte B.
const std::string& ByteLevelChar(uint8_t b);

class Tokenizer {
 public:
  // Reads DIR/tokenizer.json and, when present, DIR/tokenizer_config.json.
  static StatusOr<Tokenizer> Load(const std::string& dir);
  // The same from the files' texts (CONFIG_JSON may be empty: no tokenizer_config.json).
  static StatusOr<Tokenizer> FromJson(std::string_view tokenizer_json, std::string_view config_json);

  // TEXT (valid UTF-8, else INVALID_ARGUMENT) to ids. ADD_SPECIAL_TOKENS adds what the
  // post-processor adds (DeepSeek: the BOS token), as HF's encode(add_special_tokens=...).
  // Added tokens in TEXT are recognised; with PARSE_SPECIAL false the special ones are
  // encoded as plain text (HF's split_special_tokens), so user text cannot forge them.
  StatusOr<std::vector<int32_t>> Encode(std::string_view text, bool add_special_tokens = true,
                                        bool parse_special = true) const;

  // The pieces the model sees for TEXT: added tokens (whole) and the pre-tokenizer's
  // words, before BPE (HF's pre_tokenize_str, after the added-token split).
  StatusOr<std::vector<std::string>> Pieces(std::string_view text) const;

  // Ids to text, as HF's decode: ids it does not know are skipped; with
  // SKIP_SPECIAL_TOKENS special added tokens are left out; invalid UTF-8 becomes U+FFFD.
  std::string Decode(std::span<const int32_t> ids, bool skip_special_tokens = false) const;
  // The bytes id contributes to a decode (empty for an unknown id, or a skipped special).
  // Decode is the lossy UTF-8 reading of these bytes concatenated.
  std::string_view TokenBytes(int32_t id, bool skip_special_tokens = false) const;

  // The token string of ID as the vocabulary spells it ("" when unknown), and back.
  std::string IdToToken(int32_t id) const;
  std::optional<int32_t> TokenToId(std::string_view token) const;
  bool IsSpecial(int32_t id) const;

  // One past the largest id the tokenizer knows.
  int32_t size() const;
  // From tokenizer_config.json (bos_token, eos_token, chat_template); empty when absent.
  const std::string& bos_token() const;
  const std::string& eos_token() const;
  std::optional<int32_t> bos_id() const;
  std::optional<int32_t> eos_id() const;
  const std::string& chat_template() const;

  struct Impl;

 private:
  explicit Tokenizer(std::shared_ptr<const Impl> impl) : impl_(std::move(impl)) {}
  static StatusOr<Tokenizer> FromJsonChecked(std::string_view tokenizer_json, std::string_view config_json);
  std::shared_ptr<const Impl> impl_;
};

}  // namespace epic::text
