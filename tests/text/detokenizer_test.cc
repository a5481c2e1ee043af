// Streaming detokenization and stop strings: deltas never split a character and add up
// to the whole decode; the lossy reading of bytes agrees with Python's
// decode("utf-8", "replace"); stop strings end the text where they begin.
#include "text/detokenizer.h"

#include <fstream>
#include <random>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "tests/testing/temp_dir.h"
#include "text/tokenizer_writer.h"
#include "text/utf8.h"

namespace epic::text {
namespace {

Tokenizer Bundled() {
  auto files = MakeByteLevelTokenizer(1024, 0, 1);
  EXPECT_TRUE(files.ok());
  return std::move(Tokenizer::FromJson(files->tokenizer.dump(), files->config.dump())).value();
}

TEST(StreamDecoderTest, DeltasAreWholeCharactersAndAddUpToTheDecode) {
  const Tokenizer t = Bundled();
  std::mt19937 rng(3);
  for (int round = 0; round < 500; ++round) {
    // Random ids (most tokens are parts of characters in this small vocabulary), some unknown.
    std::vector<int32_t> ids;
    const int n = static_cast<int>(rng() % 40);
    for (int i = 0; i < n; ++i) ids.push_back(static_cast<int32_t>(rng() % 1100));
    for (const bool skip : {false, true}) {
      StreamDecoder stream(t, skip);
      std::string joined;
      for (const int32_t id : ids) {
        const std::string delta = stream.Add(id);
        ASSERT_TRUE(IsValidUtf8(delta));
        joined += delta;
      }
      const std::string tail = stream.Finish();
      ASSERT_TRUE(IsValidUtf8(tail));
      joined += tail;
      ASSERT_EQ(joined, t.Decode(ids, skip)) << "round " << round;
    }
  }
}

TEST(StreamDecoderTest, AMultiByteCharacterWaitsForItsLastByte) {
  auto files = MakeByteLevelTokenizer(256, 0, 1);  // no merges: one id per byte
  const Tokenizer t = std::move(Tokenizer::FromJson(files->tokenizer.dump(), files->config.dump())).value();
  const std::vector<int32_t> ids = *t.Encode("a你😀", false);
  ASSERT_EQ(ids.size(), 8u);
  StreamDecoder stream(t);
  std::vector<std::string> deltas;
  for (const int32_t id : ids) deltas.push_back(stream.Add(id));
  EXPECT_EQ(deltas, (std::vector<std::string>{"a", "", "", "你", "", "", "", "😀"}));
  EXPECT_EQ(stream.Finish(), "");
  // A character that never completes becomes U+FFFD at the end, as the whole decode has it.
  StreamDecoder cut(t);
  EXPECT_EQ(cut.Add(ids[1]), "");
  EXPECT_EQ(cut.Add(ids[2]), "");
  EXPECT_EQ(cut.Finish(), "\xEF\xBF\xBD");
  EXPECT_EQ(t.Decode(std::vector<int32_t>{ids[1], ids[2]}), "\xEF\xBF\xBD");
}

TEST(Utf8Test, LossyReadingMatchesPython) {
  if (std::string(EPIC_PYTHON).empty()) GTEST_SKIP() << "no /usr/bin/python3 to compare with";
  std::mt19937 rng(11);
  std::vector<std::string> inputs = {"", "plain", "\xff", "\xC3", "\xE4\xBD", "\xF0\x9F\x98", "\xED\xA0\x80",
                                     "\xC0\xAF", "\xE0\x80\x80", "\xF4\x90\x80\x80", "a\x80\x80" "b",
                                     "\xF0\x9F\x98\x80\xF0\x9F"};
  const std::string pieces[] = {"a", "\xC3", "\xA9", "\xE4", "\xBD", "\xA0", "\xF0", "\x9F", "\x98", "\x80",
                                "\xff", "\xED", "\xA0", "\xC0", "\xF4", "\x8F", "\xBF", "z"};
  for (int i = 0; i < 300; ++i) {
    std::string s;
    const int n = static_cast<int>(rng() % 12);
    for (int k = 0; k < n; ++k) s += pieces[rng() % std::size(pieces)];
    inputs.push_back(s);
  }
  testing::TempDir dir("utf8-peer");
  {
    std::ofstream in(dir / "bytes.txt");
    for (const std::string& s : inputs) {
      for (const char c : s) in << static_cast<int>(static_cast<uint8_t>(c)) << ' ';
      in << "\n";
    }
  }
  const std::string script =
      "import sys, json\n"
      "for line in open(sys.argv[1]):\n"
      "    b = bytes(int(x) for x in line.split())\n"
      "    print(json.dumps(b.decode('utf-8', 'replace')))\n";
  {
    std::ofstream py(dir / "lossy.py");
    py << script;
  }
  const std::string command = std::string(EPIC_PYTHON) + " " + (dir / "lossy.py").string() + " " +
                              (dir / "bytes.txt").string() + " > " + (dir / "text.jsonl").string();
  ASSERT_EQ(std::system(command.c_str()), 0);
  std::ifstream out(dir / "text.jsonl");
  std::string line;
  for (const std::string& s : inputs) {
    ASSERT_TRUE(std::getline(out, line));
    std::string mine;
    AppendLossyUtf8(s, &mine);
    EXPECT_EQ(mine, nlohmann::json::parse(line).get<std::string>()) << nlohmann::json(line).dump();
  }
}

// What the stop strings leave, computed plainly on the whole text: generation stops at
// the stop string that is complete first (at one end, the longest), and the text ends
// where it begins.
std::string Expected(const std::string& text, const std::vector<std::string>& stops) {
  size_t best_end = std::string::npos, best_start = 0;
  for (const std::string& s : stops) {
    const size_t at = s.empty() ? std::string::npos : text.find(s);
    if (at == std::string::npos) continue;
    const size_t end = at + s.size();
    if (end < best_end || (end == best_end && at < best_start)) {
      best_end = end;
      best_start = at;
    }
  }
  return best_end == std::string::npos ? text : text.substr(0, best_start);
}

TEST(StopStringsTest, TextEndsWhereTheFirstCompleteStopStringBegins) {
  StopStrings stop({"\n\n", "END"});
  EXPECT_EQ(stop.Add("Hello E"), "Hello ");  // "E" may begin "END"
  EXPECT_EQ(stop.Add("N"), "");
  EXPECT_EQ(stop.Add("X and"), "ENX and");
  EXPECT_EQ(stop.Add(" more\n"), " more");
  EXPECT_FALSE(stop.stopped());
  EXPECT_EQ(stop.Add("\nlost"), "");
  EXPECT_TRUE(stop.stopped());
  EXPECT_EQ(stop.matched(), "\n\n");
  EXPECT_EQ(stop.Add("after"), "");
  EXPECT_EQ(stop.Finish(), "");

  StopStrings none({});
  EXPECT_EQ(none.Add("anything"), "anything");
  StopStrings held({"abc"});
  EXPECT_EQ(held.Add("xab"), "x");
  EXPECT_EQ(held.Finish(), "ab");  // no stop came: what was held is text
  // A stop string split across many deltas, inside multi-byte text.
  StopStrings cjk({"。结束"});
  std::string out;
  for (const std::string d : {"你好", "。", "结", "束", "还有"}) out += cjk.Add(d);
  EXPECT_EQ(out, "你好");
  EXPECT_TRUE(cjk.stopped());
}

TEST(StopStringsTest, RandomDeltasGiveTheSameTextAsTheWholeString) {
  std::mt19937 rng(5);
  const std::string alphabet = "ab\n";
  for (int round = 0; round < 2000; ++round) {
    std::string text;
    for (int i = rng() % 30; i > 0; --i) text += alphabet[rng() % alphabet.size()];
    std::vector<std::string> stops;
    for (int i = rng() % 3; i >= 0; --i) {
      std::string s;
      for (int k = 1 + rng() % 3; k > 0; --k) s += alphabet[rng() % alphabet.size()];
      stops.push_back(s);
    }
    StopStrings stop(stops);
    std::string out;
    for (size_t i = 0; i < text.size();) {
      const size_t n = std::min<size_t>(text.size() - i, rng() % 4);
      out += stop.Add(text.substr(i, n));
      i += n;
    }
    out += stop.Finish();
    const std::string expected = Expected(text, stops);
    ASSERT_EQ(out, expected) << round;
    ASSERT_EQ(stop.stopped(), expected.size() < text.size()) << round;
  }
}

}  // namespace
}  // namespace epic::text
