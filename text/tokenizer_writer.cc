#include "text/tokenizer_writer.h"

#include <fstream>
#include <map>
#include <set>

#include "text/chat_template.h"
#include "text/tokenizer.h"

namespace epic::text {
namespace {

using nlohmann::json;

// The corpus the merges are learnt from: enough English, Chinese and code that common
// words, characters and operators become single tokens.
constexpr std::string_view kCorpus = R"(The model reads the prompt and writes the answer one token at a time.
Experts are spread over the workers, and every token is sent to the experts it chose.
What is the capital of France? The capital of France is Paris.
Please write a short story about a robot who learns to paint.
Hello! How are you today? I am fine, thank you. Let me think about this step by step.
In the beginning there was the prompt, and the prompt was long, and the cache held it.
numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 2024 3.14159 42 -7 1e-5
你好！今天天气很好。我们一起去公园散步吧。
深度学习模型需要大量的数据和计算资源。
请用中文回答这个问题：什么是混合专家模型？
混合专家模型把每个词元发送给少数几个专家，从而降低计算量。
def forward(self, x):
    return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

for (int i = 0; i < n; ++i) {
  sum += a[i] * b[i];
}
if (status.ok()) { return value; } else { return error; }
{"role": "user", "content": "Hello, world!"}
SELECT name, count(*) FROM experts WHERE load > 0.5 GROUP BY name;
)";

// Splits the corpus into words the way byte-level tokenizers do: a space or a newline
// starts a new word, and so does a change between ASCII and other characters.
std::vector<std::string> CorpusWords() {
  std::vector<std::string> words;
  std::string word;
  auto flush = [&] {
    if (!word.empty()) words.push_back(word);
    word.clear();
  };
  bool ascii = true;
  for (const char c : kCorpus) {
    const bool is_ascii = static_cast<unsigned char>(c) < 0x80;
    const bool is_continuation = (static_cast<unsigned char>(c) & 0xC0) == 0x80;
    if (c == ' ' || c == '\n' || (!is_continuation && is_ascii != ascii)) flush();
    if (!is_continuation) ascii = is_ascii;
    word.push_back(c);
  }
  flush();
  return words;
}

bool OccursInUtf8(int b) { return !(b == 0xC0 || b == 0xC1 || b >= 0xF5); }

}  // namespace

StatusOr<TokenizerFiles> MakeByteLevelTokenizer(int64_t vocab_size, int64_t bos_id, int64_t eos_id) {
  const std::vector<std::string> specials = {"<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>",
                                             "<｜▁pad▁｜>",               "<｜User｜>",
                                             "<｜Assistant｜>",           "<think>",
                                             "</think>"};
  constexpr int kUtf8Bytes = 243;
  if (vocab_size < static_cast<int64_t>(specials.size()) + kUtf8Bytes) {
    return InvalidArgumentError("vocab_size " + std::to_string(vocab_size) + " cannot hold a byte-level tokenizer (at least " +
                                std::to_string(specials.size() + kUtf8Bytes) + ")");
  }
  if (bos_id < 0 || bos_id >= vocab_size || eos_id < 0 || eos_id >= vocab_size || bos_id == eos_id) {
    return InvalidArgumentError("bos_token_id and eos_token_id must be distinct ids below vocab_size");
  }
  std::vector<std::string> tokens(vocab_size);
  std::vector<bool> taken(vocab_size, false);
  tokens[bos_id] = specials[0];
  tokens[eos_id] = specials[1];
  taken[bos_id] = taken[eos_id] = true;
  // The other specials follow the later of BOS and EOS (DeepSeek keeps them together),
  // wrapping to the lowest free ids.
  int64_t next = std::max(bos_id, eos_id) + 1;
  std::vector<int64_t> special_ids = {bos_id, eos_id};
  for (size_t i = 2; i < specials.size(); ++i) {
    while (taken[next % vocab_size]) ++next;
    const int64_t id = next % vocab_size;
    tokens[id] = specials[i];
    taken[id] = true;
    special_ids.push_back(id);
  }
  int64_t free_id = 0;
  auto has_free = [&] {
    while (free_id < vocab_size && taken[free_id]) ++free_id;
    return free_id < vocab_size;
  };
  auto place = [&](const std::string& token) -> bool {
    if (!has_free()) return false;
    tokens[free_id] = token;
    taken[free_id] = true;
    return true;
  };
  std::set<std::string> known;
  for (int pass = 0; pass < 2; ++pass) {
    for (int b = 0; b < 256; ++b) {
      if (OccursInUtf8(b) == (pass == 0) && place(ByteLevelChar(static_cast<uint8_t>(b)))) {
        known.insert(ByteLevelChar(static_cast<uint8_t>(b)));
      }
    }
  }

  // Merges: the most frequent adjacent pair in the corpus (ties: the smaller pair), again
  // and again; then pairs of the earliest tokens, so that every id is a token.
  std::map<std::vector<std::string>, int> words;
  for (const std::string& word : CorpusWords()) {
    std::vector<std::string> symbols;
    for (const char c : word) symbols.push_back(ByteLevelChar(static_cast<uint8_t>(c)));
    ++words[symbols];
  }
  json merges = json::array();
  std::vector<std::string> learnt;
  while (has_free()) {
    std::map<std::pair<std::string, std::string>, int> pairs;
    for (const auto& [symbols, count] : words) {
      for (size_t i = 0; i + 1 < symbols.size(); ++i) pairs[{symbols[i], symbols[i + 1]}] += count;
    }
    const std::pair<std::string, std::string>* best = nullptr;
    int best_count = 1;
    for (const auto& [pair, count] : pairs) {
      if (count > best_count && !known.count(pair.first + pair.second)) {
        best = &pair;
        best_count = count;
      }
    }
    if (!best) break;
    const auto [left, right] = *best;
    merges.push_back(left + " " + right);
    known.insert(left + right);
    learnt.push_back(left + right);
    place(left + right);
    std::map<std::vector<std::string>, int> merged;
    for (const auto& [symbols, count] : words) {
      std::vector<std::string> out;
      for (size_t i = 0; i < symbols.size(); ++i) {
        if (i + 1 < symbols.size() && symbols[i] == left && symbols[i + 1] == right) {
          out.push_back(left + right);
          ++i;
        } else {
          out.push_back(symbols[i]);
        }
      }
      merged[out] += count;
    }
    words = std::move(merged);
  }
  // Filler: printable ASCII byte tokens and the learnt tokens joined pairwise, then the
  // joined ones joined again, until every id is a token.
  std::vector<std::string> parts;
  for (int b = '!'; b <= '~'; ++b) parts.push_back(ByteLevelChar(static_cast<uint8_t>(b)));
  parts.insert(parts.end(), learnt.begin(), learnt.end());
  for (bool progress = true; progress && has_free();) {
    progress = false;
    const size_t n = parts.size();
    for (size_t i = 0; i < n && has_free(); ++i) {
      for (size_t j = 0; j < n && has_free(); ++j) {
        const std::string merged = parts[i] + parts[j];
        if (known.count(merged)) continue;
        known.insert(merged);
        merges.push_back(parts[i] + " " + parts[j]);
        place(merged);
        parts.push_back(merged);
        progress = true;
      }
    }
  }
  if (has_free()) return InternalError("could not fill the vocabulary");

  json vocab = json::object();
  json added = json::array();
  std::set<int64_t> special_set(special_ids.begin(), special_ids.end());
  for (int64_t id = 0; id < vocab_size; ++id) {
    if (!special_set.count(id)) vocab[tokens[id]] = id;
  }
  for (const int64_t id : special_ids) {
    // <think> and </think> are ordinary added tokens in DeepSeek's R1 files: kept in
    // decoded text, matched in prompts.
    const bool special = tokens[id] != "<think>" && tokens[id] != "</think>";
    added.push_back({{"id", id},          {"content", tokens[id]}, {"single_word", false}, {"lstrip", false},
                     {"rstrip", false},   {"normalized", !special}, {"special", special}});
  }
  std::sort(added.begin(), added.end(), [](const json& a, const json& b) { return a["id"] < b["id"]; });

  // Pre-tokenization in DeepSeek's manner: digits in threes, CJK runs apart, then words
  // with their leading space, punctuation runs, newlines and spaces.
  auto split = [](const std::string& regex) {
    return json{{"type", "Split"}, {"pattern", {{"Regex", regex}}}, {"behavior", "Isolated"}, {"invert", false}};
  };
  json pre_tokenizer = {
      {"type", "Sequence"},
      {"pretokenizers",
       {split(R"(\p{N}{1,3})"), split("[一-龥぀-ゟ゠-ヿ]+"),
        split(R"([^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)"),
        {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", false}}}}};

  TokenizerFiles files;
  files.tokenizer = {
      {"version", "1.0"},
      {"truncation", nullptr},
      {"padding", nullptr},
      {"added_tokens", added},
      {"normalizer", {{"type", "Sequence"}, {"normalizers", json::array()}}},
      {"pre_tokenizer", pre_tokenizer},
      {"post_processor",
       {{"type", "TemplateProcessing"},
        {"single", {{{"SpecialToken", {{"id", specials[0]}, {"type_id", 0}}}}, {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}}},
        {"pair", json::array()},
        {"special_tokens", {{specials[0], {{"id", specials[0]}, {"ids", {bos_id}}, {"tokens", {specials[0]}}}}}}}},
      {"decoder", {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true}, {"use_regex", true}}},
      {"model",
       {{"type", "BPE"},
        {"dropout", nullptr},
        {"unk_token", nullptr},
        {"continuing_subword_prefix", nullptr},
        {"end_of_word_suffix", nullptr},
        {"fuse_unk", false},
        {"byte_fallback", false},
        {"vocab", vocab},
        {"merges", merges}}}};
  files.config = {{"tokenizer_class", "LlamaTokenizerFast"},
                  {"add_bos_token", true},
                  {"add_eos_token", false},
                  {"bos_token", {{"__type", "AddedToken"}, {"content", specials[0]}, {"lstrip", false},
                                 {"normalized", true}, {"rstrip", false}, {"single_word", false}}},
                  {"eos_token", {{"__type", "AddedToken"}, {"content", specials[1]}, {"lstrip", false},
                                 {"normalized", true}, {"rstrip", false}, {"single_word", false}}},
                  {"pad_token", specials[2]},
                  {"legacy", true},
                  {"model_max_length", 16384},
                  {"clean_up_tokenization_spaces", false},
                  {"chat_template", std::string(DefaultDeepSeekChatTemplate())}};
  return files;
}

Status WriteTokenizerFiles(const TokenizerFiles& files, const std::filesystem::path& dir) {
  for (const auto& [name, content] : {std::pair{"tokenizer.json", &files.tokenizer},
                                      std::pair{"tokenizer_config.json", &files.config}}) {
    std::ofstream out(dir / name);
    out << content->dump(2) << "\n";
    if (!out) return InternalError((dir / name).string() + ": cannot write it");
  }
  return OkStatus();
}

}  // namespace epic::text
