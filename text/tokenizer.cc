#include "text/tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <array>
#include <filesystem>
#include <queue>
#include <unordered_map>

#include <nlohmann/json.hpp>

#include "common/text_file.h"
#include "text/utf8.h"

namespace epic::text {
namespace {

using nlohmann::json;

// GPT-2's byte-to-code-point map: printable Latin-1 bytes stand for themselves, the
// other 68 take code points from 256 up, in byte order.
struct ByteAlphabet {
  std::array<std::string, 256> chars;
  std::unordered_map<std::string, uint8_t> bytes;
  ByteAlphabet() {
    int next = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
      const int cp = printable ? b : next++;
      std::string& s = chars[b];
      if (cp < 0x80) {
        s.push_back(static_cast<char>(cp));
      } else {
        s.push_back(static_cast<char>(0xC0 | (cp >> 6)));
        s.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
      }
      bytes[s] = static_cast<uint8_t>(b);
    }
  }
};
const ByteAlphabet& Alphabet() {
  static const ByteAlphabet alphabet;
  return alphabet;
}

// The pattern HF's ByteLevel pre-tokenizer splits with when use_regex is true.
constexpr std::string_view kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

struct Pcre2CodeDeleter {
  void operator()(pcre2_code* code) const { pcre2_code_free(code); }
};
using Pcre2Code = std::unique_ptr<pcre2_code, Pcre2CodeDeleter>;
struct Pcre2MatchDeleter {
  void operator()(pcre2_match_data* data) const { pcre2_match_data_free(data); }
};
using Pcre2Match = std::unique_ptr<pcre2_match_data, Pcre2MatchDeleter>;

StatusOr<Pcre2Code> CompileRegex(std::string_view pattern, bool literal, const std::string& where) {
  int error = 0;
  PCRE2_SIZE offset = 0;
  const uint32_t options = PCRE2_UTF | PCRE2_UCP | (literal ? PCRE2_LITERAL : 0);
  pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(), options,
                                   &error, &offset, nullptr);
  if (!code) {
    PCRE2_UCHAR message[256];
    pcre2_get_error_message(error, message, sizeof(message));
    return InvalidArgumentError(where + ": the regex does not compile at offset " + std::to_string(offset) + ": " +
                                reinterpret_cast<const char*>(message));
  }
  // JIT is a speed-up only: where the platform lacks it, the interpreter gives the same matches.
  pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);
  return Pcre2Code(code);
}

// One step of the pre-tokenizer chain.
struct PreTokenStep {
  enum Kind { kSplit, kDigits } kind = kSplit;
  std::shared_ptr<pcre2_code> regex;  // kSplit
  bool individual_digits = false;     // kDigits
};

// A trie over added-token contents for leftmost-longest matching.
class TokenTrie {
 public:
  void Insert(std::string_view s, int32_t index) {
    int node = 0;
    for (const char c : s) {
      const auto b = static_cast<uint8_t>(c);
      int next = nodes_[node].next[b];
      if (next == 0) {
        next = static_cast<int>(nodes_.size());
        nodes_[node].next[b] = next;
        nodes_.emplace_back();
      }
      node = next;
    }
    nodes_[node].id = index;
    first_byte_[static_cast<uint8_t>(s[0])] = true;
  }
  bool empty() const { return nodes_.size() == 1; }
  bool MayStartWith(uint8_t b) const { return first_byte_[b]; }
  // The longest token at the start of S: its index and length, or index -1.
  std::pair<int32_t, size_t> LongestAt(std::string_view s) const {
    int node = 0;
    std::pair<int32_t, size_t> best{-1, 0};
    for (size_t i = 0; i < s.size(); ++i) {
      node = nodes_[node].next[static_cast<uint8_t>(s[i])];
      if (node == 0) break;
      if (nodes_[node].id >= 0) best = {nodes_[node].id, i + 1};
    }
    return best;
  }

 private:
  struct Node {
    std::array<int, 256> next{};
    int32_t id = -1;
  };
  std::vector<Node> nodes_{1};
  std::array<bool, 256> first_byte_{};
};

struct AddedToken {
  std::string content;
  bool special = false, lstrip = false, rstrip = false, single_word = false, normalized = false;
};

// A piece of the input on its way to the model: a range of the text, or an added token.
struct Piece {
  std::string_view text;
  int32_t added_id = -1;
};

uint32_t DecodeCodePoint(std::string_view s, size_t* len) {
  const auto b0 = static_cast<uint8_t>(s[0]);
  if (b0 < 0x80) { *len = 1; return b0; }
  if (b0 < 0xE0) { *len = 2; return ((b0 & 0x1F) << 6) | (s[1] & 0x3F); }
  if (b0 < 0xF0) { *len = 3; return ((b0 & 0x0F) << 12) | ((s[1] & 0x3F) << 6) | (s[2] & 0x3F); }
  *len = 4;
  return ((b0 & 0x07) << 18) | ((s[1] & 0x3F) << 12) | ((s[2] & 0x3F) << 6) | (s[3] & 0x3F);
}

// Word characters and whitespace as the added-token flags see them, through PCRE2's
// Unicode properties (no tables of our own).
class CharClasses {
 public:
  CharClasses() {
    word_ = CompileRegex(R"(^[\p{L}\p{N}_])", false, "word class").value();
    space_ = CompileRegex(R"(^\s)", false, "space class").value();
  }
  bool IsWord(std::string_view c) const { return Matches(word_.get(), c); }
  bool IsSpace(std::string_view c) const { return Matches(space_.get(), c); }

 private:
  static bool Matches(pcre2_code* code, std::string_view c) {
    Pcre2Match data(pcre2_match_data_create(1, nullptr));
    return pcre2_match(code, reinterpret_cast<PCRE2_SPTR>(c.data()), c.size(), 0, PCRE2_NO_UTF_CHECK, data.get(),
                       nullptr) >= 0;
  }
  Pcre2Code word_, space_;
};
const CharClasses& Classes() {
  static const CharClasses classes;
  return classes;
}

size_t LastCharStart(std::string_view s) {
  size_t i = s.size() - 1;
  while (i > 0 && (static_cast<uint8_t>(s[i]) & 0xC0) == 0x80) --i;
  return i;
}

}  // namespace

const std::string& ByteLevelChar(uint8_t b) { return Alphabet().chars[b]; }

struct Tokenizer::Impl {
  std::unordered_map<std::string, int32_t> vocab;  // model vocabulary and added tokens
  std::vector<std::string> id_to_token;
  std::vector<std::string> token_bytes;  // what each id decodes to
  std::vector<uint8_t> special;
  std::unordered_map<uint64_t, std::pair<int32_t, int32_t>> merges;  // (left, right) -> (rank, merged)
  std::array<int32_t, 256> byte_ids;                                  // -1: the byte has no token
  bool ignore_merges = false;

  std::vector<AddedToken> added;  // by position in added_tokens
  std::vector<int32_t> added_ids;
  TokenTrie raw_trie;         // special or not normalized: matched first, on the raw text
  TokenTrie normalized_trie;  // the rest, matched in what the first pass left

  std::vector<PreTokenStep> steps;
  bool byte_level_prefix_space = false;

  std::vector<int32_t> prefix_ids, suffix_ids;  // the post-processor's special tokens

  std::string bos_token, eos_token, chat_template;
  std::optional<int32_t> bos_id, eos_id;


  void SplitAdded(std::string_view text, const TokenTrie& trie, bool parse_special, std::vector<Piece>* out) const;
  // TEXT (checked to be UTF-8) split at every added token, both passes.
  StatusOr<std::vector<Piece>> SplitAllAdded(std::string_view text, bool parse_special = true) const;
  Status PreTokenize(std::string_view text, std::vector<std::string_view>* out) const;
  Status Bpe(std::string_view word, bool prefix_space, std::vector<int32_t>* out) const;
};

namespace {

const json* Find(const json& object, const char* key) {
  if (!object.is_object()) return nullptr;
  const auto it = object.find(key);
  return it == object.end() || it->is_null() ? nullptr : &*it;
}

Status Unsupported(const std::string& path, const std::string& what) {
  return InvalidArgumentError("tokenizer.json " + path + ": " + what);
}

// A token given as a string or as an AddedToken object {"content": ...}.
std::string TokenContent(const json& value) {
  if (value.is_string()) return value.get<std::string>();
  if (const json* content = Find(value, "content"); content && content->is_string()) {
    return content->get<std::string>();
  }
  return "";
}

Status ParseNormalizer(const json& node, const std::string& path) {
  if (node.is_null()) return OkStatus();
  const json* type = Find(node, "type");
  if (type && *type == "Sequence") {
    const json* list = Find(node, "normalizers");
    if (!list || !list->is_array()) return Unsupported(path + ".normalizers", "missing");
    for (size_t i = 0; i < list->size(); ++i) {
      EPIC_RETURN_IF_ERROR(ParseNormalizer((*list)[i], path + ".normalizers[" + std::to_string(i) + "]"));
    }
    return OkStatus();
  }
  return Unsupported(path, "normalizer " + (type ? type->dump() : node.dump()) +
                               " is not supported (null or an empty Sequence are)");
}

Status ParsePreTokenizer(const json& node, const std::string& path, Tokenizer::Impl* impl, bool* byte_level) {
  if (node.is_null()) return OkStatus();
  if (*byte_level) return Unsupported(path, "a step after ByteLevel is not supported");
  const json* type = Find(node, "type");
  if (!type || !type->is_string()) return Unsupported(path + ".type", "missing");
  if (*type == "Sequence") {
    const json* list = Find(node, "pretokenizers");
    if (!list || !list->is_array()) return Unsupported(path + ".pretokenizers", "missing");
    for (size_t i = 0; i < list->size(); ++i) {
      EPIC_RETURN_IF_ERROR(
          ParsePreTokenizer((*list)[i], path + ".pretokenizers[" + std::to_string(i) + "]", impl, byte_level));
    }
    return OkStatus();
  }
  if (*type == "Split") {
    const json* behavior = Find(node, "behavior");
    if (!behavior || *behavior != "Isolated") {
      return Unsupported(path + ".behavior", (behavior ? behavior->dump() : std::string("null")) +
                                                 " is not supported (only \"Isolated\")");
    }
    if (const json* invert = Find(node, "invert"); invert && *invert != false) {
      return Unsupported(path + ".invert", "true is not supported");
    }
    const json* pattern = Find(node, "pattern");
    const json* regex = pattern ? Find(*pattern, "Regex") : nullptr;
    const json* literal = pattern ? Find(*pattern, "String") : nullptr;
    if (!(regex && regex->is_string()) && !(literal && literal->is_string())) {
      return Unsupported(path + ".pattern", "want {\"Regex\": ...} or {\"String\": ...}");
    }
    const std::string where = "tokenizer.json " + path + ".pattern";
    EPIC_ASSIGN_OR_RETURN(Pcre2Code code, CompileRegex(regex ? regex->get<std::string>() : literal->get<std::string>(),
                                                       regex == nullptr, where));
    PreTokenStep step;
    step.regex = std::shared_ptr<pcre2_code>(code.release(), pcre2_code_free);
    impl->steps.push_back(std::move(step));
    return OkStatus();
  }
  if (*type == "Digits") {
    PreTokenStep step;
    step.kind = PreTokenStep::kDigits;
    const json* individual = Find(node, "individual_digits");
    step.individual_digits = individual && *individual == true;
    EPIC_ASSIGN_OR_RETURN(Pcre2Code code, CompileRegex(step.individual_digits ? R"(\p{N})" : R"(\p{N}+)", false,
                                                       "tokenizer.json " + path));
    step.regex = std::shared_ptr<pcre2_code>(code.release(), pcre2_code_free);
    impl->steps.push_back(std::move(step));
    return OkStatus();
  }
  if (*type == "ByteLevel") {
    const json* prefix = Find(node, "add_prefix_space");
    impl->byte_level_prefix_space = prefix && *prefix == true;
    const json* use_regex = Find(node, "use_regex");
    if (!use_regex || *use_regex == true) {
      EPIC_ASSIGN_OR_RETURN(Pcre2Code code, CompileRegex(kGpt2Pattern, false, "tokenizer.json " + path));
      PreTokenStep step;
      step.regex = std::shared_ptr<pcre2_code>(code.release(), pcre2_code_free);
      impl->steps.push_back(std::move(step));
    }
    *byte_level = true;
    return OkStatus();
  }
  return Unsupported(path + ".type", type->dump() + " is not supported (Sequence, Split, Digits, ByteLevel are)");
}

Status ParseDecoder(const json& node, const std::string& path) {
  const json* type = Find(node, "type");
  if (type && *type == "ByteLevel") return OkStatus();
  if (type && *type == "Sequence") {
    const json* list = Find(node, "decoders");
    if (list && list->is_array() && list->size() == 1) return ParseDecoder((*list)[0], path + ".decoders[0]");
  }
  return Unsupported(path, (type ? type->dump() : std::string("null")) + " is not supported (only ByteLevel)");
}

// The post-processor's tokens around a single sequence.
Status ParsePostProcessor(const json& node, const std::string& path, const Tokenizer::Impl& impl,
                          std::vector<int32_t>* prefix, std::vector<int32_t>* suffix) {
  if (node.is_null()) return OkStatus();
  const json* type = Find(node, "type");
  if (type && *type == "ByteLevel") return OkStatus();  // offsets only
  if (type && *type == "Sequence") {
    const json* list = Find(node, "processors");
    if (!list || !list->is_array()) return Unsupported(path + ".processors", "missing");
    for (size_t i = 0; i < list->size(); ++i) {
      EPIC_RETURN_IF_ERROR(
          ParsePostProcessor((*list)[i], path + ".processors[" + std::to_string(i) + "]", impl, prefix, suffix));
    }
    return OkStatus();
  }
  if (type && *type == "TemplateProcessing") {
    const json* single = Find(node, "single");
    if (!single || !single->is_array()) return Unsupported(path + ".single", "missing");
    bool seen_sequence = false;
    for (size_t i = 0; i < single->size(); ++i) {
      const json& item = (*single)[i];
      const std::string item_path = path + ".single[" + std::to_string(i) + "]";
      if (Find(item, "Sequence")) {
        seen_sequence = true;
        continue;
      }
      const json* special = Find(item, "SpecialToken");
      const json* id = special ? Find(*special, "id") : nullptr;
      if (!id || !id->is_string()) return Unsupported(item_path, "want Sequence or SpecialToken");
      const auto it = impl.vocab.find(id->get<std::string>());
      if (it == impl.vocab.end()) return Unsupported(item_path, "token " + id->dump() + " is not in the vocabulary");
      (seen_sequence ? suffix : prefix)->push_back(it->second);
    }
    return OkStatus();
  }
  return Unsupported(path, (type ? type->dump() : std::string("null")) +
                               " is not supported (TemplateProcessing, ByteLevel, Sequence are)");
}

Status ParseModel(const json& model, Tokenizer::Impl* impl) {
  const json* type = Find(model, "type");
  if (!type || *type != "BPE") {
    return Unsupported("model.type", (type ? type->dump() : std::string("null")) + " is not supported (only BPE)");
  }
  if (const json* v = Find(model, "dropout"); v && *v != 0) return Unsupported("model.dropout", "is not supported");
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    if (const json* v = Find(model, key); v && *v != "") return Unsupported(std::string("model.") + key, "is not supported");
  }
  if (const json* v = Find(model, "byte_fallback"); v && *v == true) {
    return Unsupported("model.byte_fallback", "true is not supported (byte-level BPE needs no fallback)");
  }
  if (const json* v = Find(model, "ignore_merges")) impl->ignore_merges = *v == true;
  const json* vocab = Find(model, "vocab");
  if (!vocab || !vocab->is_object()) return Unsupported("model.vocab", "missing or not an object");
  for (const auto& [token, id] : vocab->items()) {
    if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() >= (1 << 30)) {
      return Unsupported("model.vocab[" + json(token).dump() + "]", "id " + id.dump() + " is not a valid id");
    }
    impl->vocab[token] = id.get<int32_t>();
  }
  for (int b = 0; b < 256; ++b) {
    const auto it = impl->vocab.find(ByteLevelChar(static_cast<uint8_t>(b)));
    impl->byte_ids[b] = it == impl->vocab.end() ? -1 : it->second;
  }
  const json* merges = Find(model, "merges");
  if (!merges || !merges->is_array()) return Unsupported("model.merges", "missing or not an array");
  for (size_t rank = 0; rank < merges->size(); ++rank) {
    const json& merge = (*merges)[rank];
    const std::string path = "model.merges[" + std::to_string(rank) + "]";
    std::string left, right;
    if (merge.is_string()) {
      const std::string s = merge.get<std::string>();
      const size_t space = s.find(' ');
      if (space == std::string::npos || s.find(' ', space + 1) != std::string::npos) {
        return Unsupported(path, json(s).dump() + " is not two tokens separated by one space");
      }
      left = s.substr(0, space);
      right = s.substr(space + 1);
    } else if (merge.is_array() && merge.size() == 2 && merge[0].is_string() && merge[1].is_string()) {
      left = merge[0].get<std::string>();
      right = merge[1].get<std::string>();
    } else {
      return Unsupported(path, "want \"a b\" or [\"a\", \"b\"]");
    }
    const auto l = impl->vocab.find(left), r = impl->vocab.find(right), m = impl->vocab.find(left + right);
    if (l == impl->vocab.end() || r == impl->vocab.end() || m == impl->vocab.end()) {
      return Unsupported(path, "a token of " + merge.dump() + " or their merge is not in the vocabulary");
    }
    const uint64_t key = (static_cast<uint64_t>(l->second) << 32) | static_cast<uint32_t>(r->second);
    impl->merges.emplace(key, std::pair<int32_t, int32_t>{static_cast<int32_t>(rank), m->second});
  }
  return OkStatus();
}

}  // namespace

void Tokenizer::Impl::SplitAdded(std::string_view text, const TokenTrie& trie, bool parse_special,
                                 std::vector<Piece>* out) const {
  if (trie.empty()) {
    if (!text.empty()) out->push_back({text, -1});
    return;
  }
  const CharClasses& classes = Classes();
  size_t done = 0;  // text before this is in OUT
  size_t i = 0;
  while (i < text.size()) {
    if (!trie.MayStartWith(static_cast<uint8_t>(text[i]))) {
      ++i;
      continue;
    }
    const auto [index, length] = trie.LongestAt(text.substr(i));
    if (index < 0) {
      ++i;
      continue;
    }
    const AddedToken& token = added[index];
    size_t start = i, stop = i + length;
    i = stop;  // the next match starts after this one, taken or not (leftmost-longest, non-overlapping)
    if (token.special && !parse_special) continue;
    if (token.single_word) {
      const bool word_before = start > 0 && classes.IsWord(text.substr(LastCharStart(text.substr(0, start))));
      const bool word_after = stop < text.size() && classes.IsWord(text.substr(stop, 4));
      if (word_before || word_after) continue;
    }
    if (token.lstrip) {
      while (start > done) {
        const size_t c = LastCharStart(text.substr(0, start));
        if (!classes.IsSpace(text.substr(c, start - c))) break;
        start = c;
      }
    }
    if (token.rstrip) {
      while (stop < text.size()) {
        size_t len = 0;
        DecodeCodePoint(text.substr(stop), &len);
        if (!classes.IsSpace(text.substr(stop, len))) break;
        stop += len;
      }
      i = stop;
    }
    if (start > done) out->push_back({text.substr(done, start - done), -1});
    out->push_back({text.substr(start, stop - start), added_ids[index]});
    done = stop;
  }
  if (done < text.size()) out->push_back({text.substr(done), -1});
}

Status Tokenizer::Impl::PreTokenize(std::string_view text, std::vector<std::string_view>* out) const {
  out->assign(1, text);
  std::vector<std::string_view> next;
  Pcre2Match data;
  for (const PreTokenStep& step : steps) {
    data.reset(pcre2_match_data_create_from_pattern(step.regex.get(), nullptr));
    next.clear();
    for (const std::string_view piece : *out) {
      const auto* subject = reinterpret_cast<PCRE2_SPTR>(piece.data());
      size_t prev = 0, offset = 0;
      while (offset <= piece.size()) {
        const int rc = pcre2_match(step.regex.get(), subject, piece.size(), offset, PCRE2_NO_UTF_CHECK, data.get(),
                                   nullptr);
        if (rc == PCRE2_ERROR_NOMATCH) break;
        if (rc < 0) return InternalError("pre-tokenizer regex failed with PCRE2 error " + std::to_string(rc));
        const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(data.get());
        const size_t start = ovector[0], end = ovector[1];
        if (end == start) {  // an empty match splits nothing; step over one character
          if (start >= piece.size()) break;
          size_t len = 0;
          DecodeCodePoint(piece.substr(start), &len);
          offset = start + len;
          continue;
        }
        if (start > prev) next.push_back(piece.substr(prev, start - prev));
        next.push_back(piece.substr(start, end - start));
        prev = offset = end;
      }
      if (prev < piece.size()) next.push_back(piece.substr(prev));
    }
    out->swap(next);
  }
  return OkStatus();
}

Status Tokenizer::Impl::Bpe(std::string_view word, bool prefix_space, std::vector<int32_t>* out) const {
  struct Symbol {
    int32_t id;
    int prev, next;
  };
  std::vector<Symbol> symbols;
  symbols.reserve(word.size() + 1);
  std::string mapped;  // the word in the byte alphabet, for ignore_merges
  auto add_byte = [&](uint8_t b) -> Status {
    if (byte_ids[b] < 0) {
      char hex[8];
      snprintf(hex, sizeof(hex), "0x%02X", b);
      return InvalidArgumentError(std::string("byte ") + hex + " has no token in this vocabulary");
    }
    const int n = static_cast<int>(symbols.size());
    symbols.push_back({byte_ids[b], n - 1, n + 1});
    if (ignore_merges) mapped += ByteLevelChar(b);
    return OkStatus();
  };
  if (prefix_space) EPIC_RETURN_IF_ERROR(add_byte(' '));
  for (const char c : word) EPIC_RETURN_IF_ERROR(add_byte(static_cast<uint8_t>(c)));
  if (symbols.empty()) return OkStatus();
  symbols.back().next = -1;
  if (ignore_merges) {
    if (const auto it = vocab.find(mapped); it != vocab.end()) {
      out->push_back(it->second);
      return OkStatus();
    }
  }
  // Lowest rank first, leftmost among equals: a heap of candidate pairs, each checked
  // against the symbols when it comes out (merges since may have changed them).
  struct Candidate {
    int32_t rank;
    int pos;
    int32_t left, right;
    bool operator>(const Candidate& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<>> heap;
  auto push = [&](int pos) {
    if (pos < 0 || symbols[pos].next < 0) return;
    const int32_t l = symbols[pos].id, r = symbols[symbols[pos].next].id;
    const auto it = merges.find((static_cast<uint64_t>(l) << 32) | static_cast<uint32_t>(r));
    if (it != merges.end()) heap.push({it->second.first, pos, l, r});
  };
  for (int i = 0; i + 1 < static_cast<int>(symbols.size()); ++i) push(i);
  while (!heap.empty()) {
    const Candidate c = heap.top();
    heap.pop();
    Symbol& left = symbols[c.pos];
    if (left.id != c.left || left.next < 0 || symbols[left.next].id != c.right) continue;
    left.id = merges.at((static_cast<uint64_t>(c.left) << 32) | static_cast<uint32_t>(c.right)).second;
    const int gone = left.next;
    left.next = symbols[gone].next;
    if (left.next >= 0) symbols[left.next].prev = c.pos;
    symbols[gone].id = -1;
    push(left.prev);
    push(c.pos);
  }
  for (int i = 0; i >= 0; i = symbols[i].next) out->push_back(symbols[i].id);
  return OkStatus();
}

StatusOr<Tokenizer> Tokenizer::Load(const std::string& dir) {
  const std::filesystem::path root(dir);
  if (!std::filesystem::exists(root / "tokenizer.json")) {
    return NotFoundError(dir + ": no tokenizer.json (want a checkpoint directory or one holding tokenizer.json)");
  }
  EPIC_ASSIGN_OR_RETURN(std::string tokenizer_json, ReadTextFile((root / "tokenizer.json").string()));
  std::string config_json;
  if (std::filesystem::exists(root / "tokenizer_config.json")) {
    EPIC_ASSIGN_OR_RETURN(config_json, ReadTextFile((root / "tokenizer_config.json").string()));
  }
  auto tokenizer = FromJson(tokenizer_json, config_json);
  if (!tokenizer.ok()) {
    return Status(tokenizer.status().code(), (root / "tokenizer.json").string() + ": " + tokenizer.status().message());
  }
  return tokenizer;
}

StatusOr<Tokenizer> Tokenizer::FromJson(std::string_view tokenizer_json, std::string_view config_json) {
  // A field of the wrong JSON type surfaces as nlohmann's exception: a clear error too.
  try {
    return FromJsonChecked(tokenizer_json, config_json);
  } catch (const json::exception& e) {
    return InvalidArgumentError(std::string("tokenizer files: a field has the wrong type: ") + e.what());
  }
}

StatusOr<Tokenizer> Tokenizer::FromJsonChecked(std::string_view tokenizer_json, std::string_view config_json) {
  const json root = json::parse(tokenizer_json, nullptr, false);
  if (root.is_discarded() || !root.is_object()) return InvalidArgumentError("tokenizer.json is not a JSON object");
  json config = json::object();
  if (!config_json.empty()) {
    config = json::parse(config_json, nullptr, false);
    if (config.is_discarded() || !config.is_object()) {
      return InvalidArgumentError("tokenizer_config.json is not a JSON object");
    }
  }
  auto impl = std::make_shared<Impl>();
  const json* model = Find(root, "model");
  if (!model) return Unsupported("model", "missing");
  EPIC_RETURN_IF_ERROR(ParseModel(*model, impl.get()));

  if (const json* added = Find(root, "added_tokens")) {
    if (!added->is_array()) return Unsupported("added_tokens", "not an array");
    for (size_t i = 0; i < added->size(); ++i) {
      const json& t = (*added)[i];
      const std::string path = "added_tokens[" + std::to_string(i) + "]";
      const json* id = Find(t, "id");
      const json* content = Find(t, "content");
      if (!id || !id->is_number_integer() || id->get<int64_t>() < 0 || id->get<int64_t>() >= (1 << 30)) {
        return Unsupported(path + ".id", "missing or not a valid id");
      }
      if (!content || !content->is_string() || content->get<std::string>().empty()) {
        return Unsupported(path + ".content", "missing or empty");
      }
      AddedToken token;
      token.content = content->get<std::string>();
      if (!IsValidUtf8(token.content)) return Unsupported(path + ".content", "not valid UTF-8");
      auto flag = [&](const char* key, bool fallback) {
        const json* v = Find(t, key);
        return v && v->is_boolean() ? v->get<bool>() : fallback;
      };
      token.special = flag("special", false);
      token.lstrip = flag("lstrip", false);
      token.rstrip = flag("rstrip", false);
      token.single_word = flag("single_word", false);
      token.normalized = flag("normalized", !token.special);
      const int32_t token_id = id->get<int32_t>();
      impl->vocab[token.content] = token_id;
      impl->added_ids.push_back(token_id);
      impl->added.push_back(token);
    }
    // Tries hold the last token given for an id, as HF keeps one added token per id.
    for (size_t i = 0; i < impl->added.size(); ++i) {
      const AddedToken& token = impl->added[i];
      (token.special || !token.normalized ? impl->raw_trie : impl->normalized_trie)
          .Insert(token.content, static_cast<int32_t>(i));
    }
  }

  EPIC_RETURN_IF_ERROR(ParseNormalizer(root.value("normalizer", json()), "normalizer"));
  bool byte_level = false;
  EPIC_RETURN_IF_ERROR(ParsePreTokenizer(root.value("pre_tokenizer", json()), "pre_tokenizer", impl.get(), &byte_level));
  if (!byte_level) return Unsupported("pre_tokenizer", "has no ByteLevel step: only byte-level BPE is supported");
  EPIC_RETURN_IF_ERROR(ParseDecoder(root.value("decoder", json()), "decoder"));

  // Ids to token strings and to the bytes they decode to (ByteLevel decoder: a token all
  // of whose characters are in the byte alphabet maps through it, any other token is
  // its own UTF-8).
  int32_t size = 0;
  for (const auto& [token, id] : impl->vocab) size = std::max(size, id + 1);
  impl->id_to_token.resize(size);
  impl->token_bytes.resize(size);
  impl->special.assign(size, 0);
  for (const auto& [token, id] : impl->vocab) impl->id_to_token[id] = token;
  for (size_t i = 0; i < impl->added.size(); ++i) {
    impl->id_to_token[impl->added_ids[i]] = impl->added[i].content;
    impl->special[impl->added_ids[i]] = impl->added[i].special;
  }
  const auto& alphabet = Alphabet().bytes;
  for (int32_t id = 0; id < size; ++id) {
    const std::string& token = impl->id_to_token[id];
    std::string bytes;
    bool all_mapped = true;
    for (size_t i = 0; i < token.size() && all_mapped;) {
      const int n = std::max(1, Utf8SequenceLength(std::string_view(token).substr(i)));
      const auto it = alphabet.find(token.substr(i, n));
      if (it == alphabet.end()) {
        all_mapped = false;
      } else {
        bytes.push_back(static_cast<char>(it->second));
      }
      i += n;
    }
    impl->token_bytes[id] = all_mapped ? bytes : token;
  }

  // The special tokens of tokenizer_config.json. LlamaTokenizerFast (DeepSeek's class)
  // rebuilds the post-processor from add_bos_token/add_eos_token; others keep the file's.
  impl->bos_token = TokenContent(config.value("bos_token", json()));
  impl->eos_token = TokenContent(config.value("eos_token", json()));
  for (auto [name, token, id] : {std::tuple{"bos_token", &impl->bos_token, &impl->bos_id},
                                 std::tuple{"eos_token", &impl->eos_token, &impl->eos_id}}) {
    if (token->empty()) continue;
    const auto it = impl->vocab.find(*token);
    if (it == impl->vocab.end()) {
      return InvalidArgumentError(std::string("tokenizer_config.json ") + name + ": " + json(*token).dump() +
                                  " is not in the vocabulary");
    }
    *id = it->second;
  }
  const std::string tokenizer_class = config.value("tokenizer_class", std::string());
  if (tokenizer_class == "LlamaTokenizerFast" || tokenizer_class == "LlamaTokenizer") {
    const bool add_bos = config.value("add_bos_token", true), add_eos = config.value("add_eos_token", false);
    if (add_bos && !impl->bos_id) return InvalidArgumentError("tokenizer_config.json: add_bos_token without bos_token");
    if (add_eos && !impl->eos_id) return InvalidArgumentError("tokenizer_config.json: add_eos_token without eos_token");
    if (add_bos) impl->prefix_ids.push_back(*impl->bos_id);
    if (add_eos) impl->suffix_ids.push_back(*impl->eos_id);
  } else {
    EPIC_RETURN_IF_ERROR(ParsePostProcessor(root.value("post_processor", json()), "post_processor", *impl,
                                            &impl->prefix_ids, &impl->suffix_ids));
  }

  if (const json* tmpl = Find(config, "chat_template")) {
    if (tmpl->is_string()) {
      impl->chat_template = tmpl->get<std::string>();
    } else if (tmpl->is_array()) {
      for (const json& named : *tmpl) {
        if (named.value("name", std::string()) == "default") impl->chat_template = named.value("template", std::string());
      }
      if (impl->chat_template.empty()) {
        return InvalidArgumentError("tokenizer_config.json chat_template: a list without a \"default\" template");
      }
    } else {
      return InvalidArgumentError("tokenizer_config.json chat_template: want a string or a list of named templates");
    }
  }
  return Tokenizer(std::move(impl));
}

StatusOr<std::vector<Piece>> Tokenizer::Impl::SplitAllAdded(std::string_view text, bool parse_special) const {
  size_t bad = 0;
  if (!IsValidUtf8(text, &bad)) {
    return InvalidArgumentError("text is not valid UTF-8 (at byte " + std::to_string(bad) + ")");
  }
  std::vector<Piece> raw, pieces;
  SplitAdded(text, raw_trie, parse_special, &raw);
  for (const Piece& p : raw) {
    if (p.added_id >= 0) {
      pieces.push_back(p);
    } else {
      SplitAdded(p.text, normalized_trie, parse_special, &pieces);
    }
  }
  return pieces;
}

StatusOr<std::vector<std::string>> Tokenizer::Pieces(std::string_view text) const {
  EPIC_ASSIGN_OR_RETURN(const std::vector<Piece> pieces, impl_->SplitAllAdded(text));
  std::vector<std::string> out;
  std::vector<std::string_view> words;
  for (const Piece& p : pieces) {
    if (p.added_id >= 0) {
      out.emplace_back(p.text);
      continue;
    }
    EPIC_RETURN_IF_ERROR(impl_->PreTokenize(p.text, &words));
    for (const std::string_view word : words) {
      const bool prefix = impl_->byte_level_prefix_space && !word.starts_with(' ');
      std::string piece(prefix ? " " : "");
      piece += word;
      out.push_back(std::move(piece));
    }
  }
  return out;
}

StatusOr<std::vector<int32_t>> Tokenizer::Encode(std::string_view text, bool add_special_tokens,
                                                 bool parse_special) const {
  const Impl& impl = *impl_;
  EPIC_ASSIGN_OR_RETURN(const std::vector<Piece> pieces, impl.SplitAllAdded(text, parse_special));
  std::vector<int32_t> ids;
  if (add_special_tokens) ids = impl.prefix_ids;
  std::vector<std::string_view> words;
  for (const Piece& p : pieces) {
    if (p.added_id >= 0) {
      ids.push_back(p.added_id);
      continue;
    }
    EPIC_RETURN_IF_ERROR(impl.PreTokenize(p.text, &words));
    for (const std::string_view word : words) {
      const bool prefix = impl.byte_level_prefix_space && !word.starts_with(' ');
      EPIC_RETURN_IF_ERROR(impl.Bpe(word, prefix, &ids));
    }
  }
  if (add_special_tokens) ids.insert(ids.end(), impl.suffix_ids.begin(), impl.suffix_ids.end());
  return ids;
}

std::string_view Tokenizer::TokenBytes(int32_t id, bool skip_special_tokens) const {
  if (id < 0 || id >= size()) return {};
  if (skip_special_tokens && impl_->special[id]) return {};
  return impl_->token_bytes[id];
}

std::string Tokenizer::Decode(std::span<const int32_t> ids, bool skip_special_tokens) const {
  std::string bytes;
  for (const int32_t id : ids) bytes += TokenBytes(id, skip_special_tokens);
  std::string text;
  AppendLossyUtf8(bytes, &text);
  return text;
}

std::string Tokenizer::IdToToken(int32_t id) const {
  return id >= 0 && id < size() ? impl_->id_to_token[id] : std::string();
}
std::optional<int32_t> Tokenizer::TokenToId(std::string_view token) const {
  const auto it = impl_->vocab.find(std::string(token));
  if (it == impl_->vocab.end()) return std::nullopt;
  return it->second;
}
bool Tokenizer::IsSpecial(int32_t id) const { return id >= 0 && id < size() && impl_->special[id]; }
int32_t Tokenizer::size() const { return static_cast<int32_t>(impl_->id_to_token.size()); }
const std::string& Tokenizer::bos_token() const { return impl_->bos_token; }
const std::string& Tokenizer::eos_token() const { return impl_->eos_token; }
std::optional<int32_t> Tokenizer::bos_id() const { return impl_->bos_id; }
std::optional<int32_t> Tokenizer::eos_id() const { return impl_->eos_id; }
const std::string& Tokenizer::chat_template() const { return impl_->chat_template; }

}  // namespace epic::text
