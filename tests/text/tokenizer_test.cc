// The tokenizer: pinned pieces and encodings for hand-checked strings, every added-token
// flag, refusals naming the JSON path, round trips over random UTF-8, and the bundled
// tokenizer against an independent Python encoder (tests/text/bpe_peer.py).
#include "text/tokenizer.h"

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <random>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "tests/testing/temp_dir.h"
#include "text/tokenizer_writer.h"
#include "text/utf8.h"

namespace epic::text {
namespace {

using nlohmann::json;
using Strings = std::vector<std::string>;

Tokenizer Bundled(int64_t vocab = 1024, int64_t bos = 0, int64_t eos = 1) {
  auto files = MakeByteLevelTokenizer(vocab, bos, eos);
  EXPECT_TRUE(files.ok()) << files.status().ToString();
  auto tokenizer = Tokenizer::FromJson(files->tokenizer.dump(), files->config.dump());
  EXPECT_TRUE(tokenizer.ok()) << tokenizer.status().ToString();
  return std::move(tokenizer).value();
}

// A hand-made tokenizer: byte tokens at id = byte value, MERGES in rank order, ADDED tokens.
json HandMade(const Strings& merges, const json& added = json::array()) {
  json vocab = json::object();
  for (int b = 0; b < 256; ++b) vocab[ByteLevelChar(static_cast<uint8_t>(b))] = b;
  int next = 256;
  for (const std::string& m : merges) {
    const std::string merged = m.substr(0, m.find(' ')) + m.substr(m.find(' ') + 1);
    if (!vocab.contains(merged)) vocab[merged] = next++;
  }
  return {{"added_tokens", added},
          {"normalizer", nullptr},
          {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}}},
          {"post_processor", nullptr},
          {"decoder", {{"type", "ByteLevel"}}},
          {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", merges}}}};
}

Tokenizer Load(const json& tokenizer, const json& config = json()) {
  auto t = Tokenizer::FromJson(tokenizer.dump(), config.is_null() ? "" : config.dump());
  EXPECT_TRUE(t.ok()) << t.status().ToString();
  return std::move(t).value();
}

Strings TokenStrings(const Tokenizer& t, const std::string& text) {
  auto ids = t.Encode(text, false);
  EXPECT_TRUE(ids.ok()) << ids.status().ToString();
  Strings out;
  for (const int32_t id : *ids) out.push_back(t.IdToToken(id));
  return out;
}

// "Ġ" is how the byte alphabet shows a space, "Ċ" a newline.
const std::string kSp = ByteLevelChar(' ');

TEST(TokenizerTest, PiecesSplitDigitsInThreesCjkRunsAndWhitespaceAsDeepSeekDoes) {
  const Tokenizer t = Bundled();
  EXPECT_EQ(*t.Pieces("1234567"), (Strings{"123", "456", "7"}));
  EXPECT_EQ(*t.Pieces("pi is 3.14159"), (Strings{"pi", " is", " ", "3", ".", "141", "59"}));
  EXPECT_EQ(*t.Pieces("你好世界hello"), (Strings{"你好世界", "hello"}));
  EXPECT_EQ(*t.Pieces("日本語のテキスト"), (Strings{"日本語のテキスト"}));
  EXPECT_EQ(*t.Pieces("a   b"), (Strings{"a", "  ", " b"}));
  EXPECT_EQ(*t.Pieces("end.  \n\nnext"), (Strings{"end", ".", "  \n\n", "next"}));
  EXPECT_EQ(*t.Pieces("x(y)!\n"), (Strings{"x", "(", "y", ")!\n"}));
  EXPECT_EQ(*t.Pieces("if (a == b) {\n  return;\n}"),
            (Strings{"if", " (", "a", " ==", " b", ")", " {\n", " ", " return", ";\n", "}"}));
  EXPECT_EQ(*t.Pieces("emoji 😀👍 ok"), (Strings{"emoji", " 😀👍", " ok"}));
  EXPECT_EQ(*t.Pieces("café naïve"), (Strings{"café", " naïve"}));
  EXPECT_EQ(*t.Pieces("trailing  "), (Strings{"trailing", "  "}));
}

TEST(TokenizerTest, BpeMergesByRankLeftmostFirst) {
  // "b c" outranks "a b": abc -> a bc -> abc.
  const Tokenizer low_bc = Load(HandMade({"b c", "a b", "a bc"}));
  EXPECT_EQ(TokenStrings(low_bc, "abc"), (Strings{"abc"}));
  EXPECT_EQ(TokenStrings(low_bc, "ab"), (Strings{"ab"}));
  // "a b" first, and no "a bc": ab c, since "ab c" is no merge.
  const Tokenizer low_ab = Load(HandMade({"a b", "b c", "a bc"}));
  EXPECT_EQ(TokenStrings(low_ab, "abc"), (Strings{"ab", "c"}));
  // Equal pairs merge leftmost first: aaa -> aa a.
  const Tokenizer aa = Load(HandMade({"a a"}));
  EXPECT_EQ(TokenStrings(aa, "aaa"), (Strings{"aa", "a"}));
  EXPECT_EQ(TokenStrings(aa, "aaaa"), (Strings{"aa", "aa"}));
  // Spaces travel as Ġ; the GPT-2 pattern keeps one before a word.
  const Tokenizer words = Load(HandMade({kSp + " h", kSp + "h i"}));
  EXPECT_EQ(TokenStrings(words, "hi hi"), (Strings{"h", "i", kSp + "hi"}));
  // Merges as ["a", "b"] pairs read the same as "a b" strings.
  json pairs = HandMade({"b c", "a b", "a bc"});
  pairs["model"]["merges"] = json::array({json::array({"b", "c"}), json::array({"a", "b"}), json::array({"a", "bc"})});
  EXPECT_EQ(TokenStrings(Load(pairs), "abc"), (Strings{"abc"}));
}

TEST(TokenizerTest, IgnoreMergesTakesWholeWordsFromTheVocabulary) {
  json tok = HandMade({"a b"});
  tok["model"]["vocab"]["abc"] = 300;
  EXPECT_EQ(TokenStrings(Load(tok), "abc"), (Strings{"ab", "c"}));
  tok["model"]["ignore_merges"] = true;
  EXPECT_EQ(TokenStrings(Load(tok), "abc"), (Strings{"abc"}));
}

TEST(TokenizerTest, AddedTokensAreMatchedLongestFirstBeforePreTokenization) {
  const json added = {
      {{"id", 400}, {"content", "<|s|>"}, {"special", true}},
      {{"id", 401}, {"content", "<|s|>x"}, {"special", true}},
      {{"id", 402}, {"content", "[L]"}, {"special", true}, {"lstrip", true}},
      {{"id", 403}, {"content", "[R]"}, {"special", true}, {"rstrip", true}},
      {{"id", 404}, {"content", "word"}, {"special", false}, {"single_word", true}, {"normalized", false}},
      {{"id", 405}, {"content", "<n>"}, {"special", false}, {"normalized", true}},
  };
  const Tokenizer t = Load(HandMade({}, added));
  EXPECT_EQ(*t.Pieces("a<|s|>xb<|s|>c"), (Strings{"a", "<|s|>x", "b", "<|s|>", "c"}));
  EXPECT_EQ(*t.Pieces("a  [L] b"), (Strings{"a", "  [L]", " b"}));
  EXPECT_EQ(*t.Pieces("a [R]  b"), (Strings{"a", " ", "[R]  ", "b"}));
  EXPECT_EQ(*t.Pieces("a word b"), (Strings{"a", " ", "word", " b"}));
  EXPECT_EQ(*t.Pieces("swordfish"), (Strings{"swordfish"}));
  EXPECT_EQ(*t.Pieces("word_"), (Strings{"word", "_"}));
  EXPECT_EQ(*t.Pieces("x<n>y"), (Strings{"x", "<n>", "y"}));
  auto ids = t.Encode("a  [L] b[R] <|s|>x", false);
  ASSERT_TRUE(ids.ok());
  EXPECT_EQ(*ids, (std::vector<int32_t>{'a', 402, ' ', 'b', 403, 401}));
  // With special tokens not parsed, user text cannot forge them; other added tokens stay.
  auto plain = t.Encode("<|s|><n>", false, /*parse_special=*/false);
  ASSERT_TRUE(plain.ok());
  EXPECT_EQ(plain->back(), 405);
  EXPECT_EQ(std::count(plain->begin(), plain->end(), 400), 0);
  EXPECT_EQ(t.Decode(*plain), "<|s|><n>");
  EXPECT_TRUE(t.IsSpecial(400));
  EXPECT_FALSE(t.IsSpecial(404));
  // Special tokens are left out of a decode only when asked.
  EXPECT_EQ(t.Decode(std::vector<int32_t>{'a', 400, 405, 'b'}), "a<|s|><n>b");
  EXPECT_EQ(t.Decode(std::vector<int32_t>{'a', 400, 405, 'b'}, true), "a<n>b");
}

TEST(TokenizerTest, BundledTokenizerAddsBosAndKnowsDeepSeeksSpecialTokens) {
  const Tokenizer t = Bundled(1024, 0, 1);
  EXPECT_EQ(t.size(), 1024);
  EXPECT_EQ(t.bos_id(), 0);
  EXPECT_EQ(t.eos_id(), 1);
  EXPECT_EQ(t.bos_token(), "<｜begin▁of▁sentence｜>");
  EXPECT_FALSE(t.chat_template().empty());
  auto with = t.Encode("hello", true), without = t.Encode("hello", false);
  ASSERT_TRUE(with.ok() && without.ok());
  ASSERT_EQ(with->size(), without->size() + 1);
  EXPECT_EQ((*with)[0], 0);
  auto chat = t.Encode("<｜User｜>hi<｜Assistant｜>", false);
  ASSERT_TRUE(chat.ok());
  EXPECT_EQ(t.IdToToken(chat->front()), "<｜User｜>");
  EXPECT_EQ(t.IdToToken(chat->back()), "<｜Assistant｜>");
  // Every id decodes to something: the vocabulary is full.
  for (int32_t id = 0; id < t.size(); ++id) ASSERT_FALSE(t.IdToToken(id).empty()) << id;
  // Learnt merges make common words single tokens.
  EXPECT_EQ(t.Encode(" the", false)->size(), 1u);
  // The V2-Lite shape puts BOS and EOS at 100000 and 100001.
  const Tokenizer lite = Bundled(102400, 100000, 100001);
  EXPECT_EQ(lite.size(), 102400);
  EXPECT_EQ(lite.Encode("x", true)->front(), 100000);
  EXPECT_EQ(lite.eos_id(), 100001);
  // The smallest preset's 256 ids hold the specials and the bytes UTF-8 uses.
  const Tokenizer tiny = Bundled(256, 0, 1);
  const std::string text = "any text: 你好 😀 ÿ";
  EXPECT_EQ(tiny.Decode(*tiny.Encode(text, false)), text);
  EXPECT_FALSE(MakeByteLevelTokenizer(200, 0, 1).ok());
}

std::string RandomUtf8(std::mt19937& rng, size_t chars) {
  std::string s;
  for (size_t i = 0; i < chars; ++i) {
    uint32_t cp;
    switch (rng() % 4) {
      case 0: cp = 0x20 + rng() % 0x5F; break;
      case 1: cp = rng() % 0x800; break;
      case 2: cp = 0x800 + rng() % 0xF800; break;
      default: cp = 0x10000 + rng() % 0x100000; break;
    }
    if (cp >= 0xD800 && cp <= 0xDFFF) cp = 'x';
    AppendUtf8(s, cp);
  }
  return s;
}

TEST(TokenizerTest, RandomUtf8RoundTrips) {
  const Tokenizer t = Bundled();
  std::mt19937 rng(7);
  for (int i = 0; i < 300; ++i) {
    const std::string text = RandomUtf8(rng, rng() % 60);
    auto ids = t.Encode(text, false);
    ASSERT_TRUE(ids.ok()) << ids.status().ToString();
    ASSERT_EQ(t.Decode(*ids), text) << "case " << i;
  }
}

TEST(TokenizerTest, InvalidUtf8IsRefusedWithItsOffset) {
  const Tokenizer t = Bundled();
  for (const std::string& bad : {std::string("ok\xff"), std::string("ab\xC3"), std::string("\xED\xA0\x80"),
                                std::string("\xC0\xAF")}) {
    auto ids = t.Encode(bad);
    ASSERT_FALSE(ids.ok());
    EXPECT_EQ(ids.status().code(), StatusCode::kInvalidArgument);
    EXPECT_NE(ids.status().message().find("UTF-8"), std::string::npos);
  }
  EXPECT_NE(t.Encode("ok\xff").status().message().find("byte 2"), std::string::npos);
}

TEST(TokenizerTest, WhatCannotBeHonouredIsRefusedNamingTheJsonPath) {
  struct Case {
    std::string path;
    json value;
    std::string expect;
  };
  const std::vector<Case> cases = {
      {"/normalizer", {{"type", "NFKC"}}, "normalizer"},
      {"/pre_tokenizer", {{"type", "Split"}, {"pattern", {{"Regex", "a"}}}, {"behavior", "Removed"}},
       "pre_tokenizer.behavior"},
      {"/pre_tokenizer", {{"type", "Sequence"}, {"pretokenizers", {{{"type", "Split"}, {"pattern", {{"Regex", "(("}}},
                                                                   {"behavior", "Isolated"}}}}},
       "pre_tokenizer.pretokenizers[0].pattern"},
      {"/pre_tokenizer", {{"type", "Whitespace"}}, "pre_tokenizer.type"},
      {"/pre_tokenizer", nullptr, "no ByteLevel"},
      {"/model/type", "WordPiece", "model.type"},
      {"/model/byte_fallback", true, "model.byte_fallback"},
      {"/model/merges", {"a b c"}, "model.merges[0]"},
      {"/model/merges", {"q zz"}, "model.merges[0]"},
      {"/decoder", {{"type", "Metaspace"}}, "decoder"},
      {"/post_processor", {{"type", "BertProcessing"}}, "post_processor"},
      {"/added_tokens", {{{"id", 5}, {"content", ""}}}, "added_tokens[0].content"},
  };
  for (const Case& c : cases) {
    json tok = HandMade({});
    tok[json::json_pointer(c.path)] = c.value;
    auto t = Tokenizer::FromJson(tok.dump(), "");
    ASSERT_FALSE(t.ok()) << c.path;
    EXPECT_NE(t.status().message().find(c.expect), std::string::npos) << t.status().message();
  }
  auto not_json = Tokenizer::FromJson("{", "");
  EXPECT_FALSE(not_json.ok());
  auto missing = Tokenizer::Load("/nonexistent-dir");
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.status().message().find("tokenizer.json"), std::string::npos);
  auto bad_bos = Tokenizer::FromJson(HandMade({}).dump(), R"({"bos_token": "<nope>"})");
  ASSERT_FALSE(bad_bos.ok());
  EXPECT_NE(bad_bos.status().message().find("bos_token"), std::string::npos);
}

// Whatever bytes arrive, Encode answers with ids or INVALID_ARGUMENT, and damaged
// tokenizer files give errors, never a crash.
TEST(TokenizerTest, RandomBytesAndDamagedFilesNeverCrash) {
  const Tokenizer t = Bundled();
  std::mt19937 rng(13);
  for (int i = 0; i < 2000; ++i) {
    std::string bytes(rng() % 40, '\0');
    for (char& c : bytes) c = static_cast<char>(rng());
    auto ids = t.Encode(bytes);
    if (!ids.ok()) {
      ASSERT_EQ(ids.status().code(), StatusCode::kInvalidArgument);
    } else {
      ASSERT_EQ(t.Decode(*ids, true), bytes);
    }
  }
  const std::string good = HandMade({"a b"}).dump();
  const json config = {{"tokenizer_class", "LlamaTokenizerFast"}, {"add_bos_token", "yes"}, {"bos_token", 7}};
  EXPECT_FALSE(Tokenizer::FromJson(good, config.dump()).ok());
  for (int i = 0; i < 500; ++i) {
    std::string damaged = good;
    for (int k = 1 + rng() % 4; k > 0; --k) damaged[rng() % damaged.size()] = "{}[]\":,0a "[rng() % 11];
    (void)Tokenizer::FromJson(damaged, "");
    json typed = HandMade({"a b"});
    const char* fields[] = {"/model/vocab", "/model/merges", "/added_tokens", "/pre_tokenizer", "/decoder",
                            "/normalizer", "/post_processor", "/model/ignore_merges"};
    const json values[] = {1, "x", json::array({1, 2}), json::object(), nullptr, true, json::array({json::object()})};
    typed[json::json_pointer(fields[rng() % std::size(fields)])] = values[rng() % std::size(values)];
    (void)Tokenizer::FromJson(typed.dump(), "");
  }
}

// Mixed text as users send it: words, numbers, CJK, emoji, code, whitespace runs and
// DeepSeek's special tokens in the middle of things.
std::string RandomMixed(std::mt19937& rng) {
  static const Strings parts = {
      "the",  " model", "Hello",  ",",    " world", "!",  " ",    "  ",  "\n",   "\n\n", "\t",   "12345",
      "3.14", "007",    "你好",   "世界", "模型",   "。", "，",   "😀",  "👍🏽",   "é",    "naïve", "(x)",
      "{a:1}", "==",    "->",     "'s",   "don't",  "\r\n", "　",  "ÿ",   "ß",    "Ωmega", "<｜User｜>",
      "<｜Assistant｜>", "<think>", "</think>", "<｜end▁of▁sentence｜>", "日本", "テスト", "def f():",
      "    return", "x_1", "\u00a0", "Ünïcödé", "—", "…"};
  std::string s;
  const int n = static_cast<int>(rng() % 20);
  for (int i = 0; i < n; ++i) s += parts[rng() % parts.size()];
  return s;
}

TEST(TokenizerTest, BundledTokenizerMatchesAnIndependentPythonEncoder) {
  if (std::string(EPIC_PYTHON).empty()) GTEST_SKIP() << "no /usr/bin/python3 (with python3-regex) to compare with";
  testing::TempDir dir("tokenizer-peer");
  for (const auto& [vocab, bos, eos] : {std::tuple{1024, 0, 1}, std::tuple{512, 0, 1}, std::tuple{256, 0, 1}}) {
    auto files = MakeByteLevelTokenizer(vocab, bos, eos);
    ASSERT_TRUE(files.ok());
    ASSERT_TRUE(WriteTokenizerFiles(*files, dir.path()).ok());
    auto t = Tokenizer::Load(dir.path().string());
    ASSERT_TRUE(t.ok()) << t.status().ToString();
    std::mt19937 rng(vocab);
    Strings texts = {"", "Hello, world!", "1234567 你好世界 😀", "  leading and trailing  ", "a\n\n\nb"};
    for (int i = 0; i < 400; ++i) texts.push_back(RandomMixed(rng));
    {
      std::ofstream in(dir / "texts.jsonl");
      for (size_t i = 0; i < texts.size(); ++i) {
        in << json{{"text", texts[i]}, {"add_special_tokens", i % 2 == 0}}.dump() << "\n";
      }
    }
    const std::string command = std::string(EPIC_PYTHON) + " " + EPIC_SOURCE_DIR + "/tests/text/bpe_peer.py " +
                                dir.path().string() + " < " + (dir / "texts.jsonl").string() + " > " +
                                (dir / "ids.jsonl").string();
    ASSERT_EQ(std::system(command.c_str()), 0) << command;
    std::ifstream out(dir / "ids.jsonl");
    std::string line;
    size_t i = 0;
    for (; std::getline(out, line); ++i) {
      ASSERT_LT(i, texts.size());
      const auto expected = json::parse(line).get<std::vector<int32_t>>();
      auto ids = t->Encode(texts[i], i % 2 == 0);
      ASSERT_TRUE(ids.ok());
      ASSERT_EQ(*ids, expected) << "vocab " << vocab << " text " << json(texts[i]).dump();
    }
    EXPECT_EQ(i, texts.size());
  }
}

}  // namespace
}  // namespace epic::text
