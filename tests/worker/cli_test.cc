// epic-mkmodel and epic-run as a user runs them: real processes, real files.
#include <sys/wait.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "tests/testing/temp_dir.h"
#include "worker/generate.h"
#include "worker/model.h"

namespace epic {
namespace {

struct Result {
  int exit_code = -1;
  std::string out;
  std::string err;
};

Result RunCommand(const std::string& command, const testing::TempDir& dir) {
  const std::string err_file = (dir / "stderr.txt").string();
  Result r;
  FILE* p = ::popen((command + " 2>" + err_file).c_str(), "r");
  if (p == nullptr) return r;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) r.out.append(buf, n);
  const int status = ::pclose(p);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  std::ifstream e(err_file);
  std::stringstream ss;
  ss << e.rdbuf();
  r.err = ss.str();
  return r;
}

const std::string kRun = EPIC_RUN_BINARY;
const std::string kMkmodel = EPIC_MKMODEL_BINARY;

class CliTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const Result r = RunCommand(kMkmodel + " --preset v2-160 --seed 5 --out " + model_.string(), dir_);
    ASSERT_EQ(r.exit_code, 0) << r.err;
  }
  testing::TempDir dir_{"cli"};
  std::filesystem::path model_ = dir_ / "model";
};

// The line epic-run prints for 6 greedy tokens after 5,17,300, computed by the library
// with MODEL.
std::string LibraryLine(Model& model) {
  GenerateOptions o;
  o.max_new_tokens = 6;
  o.stop_at_eos = false;
  auto want = Generate(model, std::vector<int32_t>{5, 17, 300}, o);
  EXPECT_TRUE(want.ok()) << want.status().ToString();
  std::string line;
  for (size_t i = 0; want.ok() && i < want->tokens.size(); ++i) {
    line += (i > 0 ? " " : "") + std::to_string(want->tokens[i]);
  }
  return line + "\n";
}

// The library's tokens, with the reports asked for on stderr (which change no token):
// --expert-counts, and --phase-times naming every phase with its milliseconds.
TEST_F(CliTest, GeneratesTheSameTokensAsTheLibrary) {
  const Result r = RunCommand(kRun + " --model " + model_.string() +
                           " --tokens 5,17,300 --max-new-tokens 6 --ignore-eos --expert-counts --phase-times",
                       dir_);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto model = Model::Load(model_);
  ASSERT_TRUE(model.ok());
  EXPECT_EQ(r.out, LibraryLine(**model));
  EXPECT_NE(r.err.find("expert tokens, layer 1:"), std::string::npos) << r.err;
  const size_t at = r.err.find("epic-run: rank 0 phase times (ms):");
  ASSERT_NE(at, std::string::npos) << r.err;
  const std::string line = r.err.substr(at, r.err.find('\n', at) - at);
  double total = 0;
  for (int i = 0; i < static_cast<int>(Phase::kCount); ++i) {
    const std::string name = PhaseName(static_cast<Phase>(i));
    const size_t p = line.find(" " + name + " ");
    ASSERT_NE(p, std::string::npos) << name << " in " << line;
    total += std::stod(line.substr(p + name.size() + 2));
  }
  EXPECT_GT(total, 0.0) << line;
}

// --precision fast runs the int8 products where the host has AVX2 (and says which ran),
// giving what the library gives at that precision; a precision it does not know is a
// usage error.
TEST_F(CliTest, FastPrecisionRunsAsTheLibraryDoesAndSaysSo) {
  const Result r = RunCommand(kRun + " --model " + model_.string() +
                                  " --tokens 5,17,300 --max-new-tokens 6 --ignore-eos --precision fast",
                              dir_);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto model = Model::Load(model_, {}, WeightResidency::kCopy, {}, ComputeDevice::kCpu, cpu::Precision::kFast);
  ASSERT_TRUE(model.ok());
  const bool fast = (*model)->precision() == cpu::Precision::kFast;
  EXPECT_NE(r.err.find(fast ? "products fast" : "products exact (this processor has no AVX2"),
            std::string::npos)
      << r.err;
  EXPECT_EQ(r.out, LibraryLine(**model));

  const Result bad = RunCommand(kRun + " --model " + model_.string() + " --tokens 5 --precision half", dir_);
  EXPECT_NE(bad.exit_code, 0);
  EXPECT_NE(bad.err.find("--precision"), std::string::npos) << bad.err;
}

TEST_F(CliTest, DumpsPromptLogitsAsNpy) {
  const std::string npy = (dir_ / "logits.npy").string();
  const Result r = RunCommand(kRun + " --model " + model_.string() + " --tokens 1,2,3,4 --dump-logits " + npy, dir_);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, "");  // no generation asked for
  std::ifstream f(npy, std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  ASSERT_GT(bytes.size(), 10u);
  EXPECT_EQ(bytes.substr(0, 6), "\x93NUMPY");
  uint16_t header_len;
  std::memcpy(&header_len, bytes.data() + 8, 2);
  EXPECT_EQ((10 + header_len) % 64, 0);
  const std::string header = bytes.substr(10, header_len);
  EXPECT_NE(header.find("'descr': '<f4'"), std::string::npos) << header;
  EXPECT_NE(header.find("'shape': (4, 1024)"), std::string::npos) << header;
  ASSERT_EQ(bytes.size(), 10u + header_len + 4u * 1024u * 4u);

  auto model = Model::Load(model_);
  ASSERT_TRUE(model.ok());
  GenerateOptions o;
  o.prompt_logits = true;
  auto want = Generate(**model, std::vector<int32_t>{1, 2, 3, 4}, o);
  ASSERT_TRUE(want.ok());
  std::vector<float> got(4 * 1024);
  std::memcpy(got.data(), bytes.data() + 10 + header_len, got.size() * 4);
  for (size_t i = 0; i < got.size(); ++i) ASSERT_NEAR(got[i], want->prompt_logits[i], 1e-5) << i;
}

TEST_F(CliTest, BadInputGetsAClearErrorAndNonZeroExit) {
  const std::string m = " --model " + model_.string();
  Result r = RunCommand(kRun + m + " --tokens 5,x,7", dir_);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("'x' is not a token id"), std::string::npos) << r.err;

  r = RunCommand(kRun + m + " --tokens 5,1024 --max-new-tokens 2", dir_);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("outside the vocabulary"), std::string::npos) << r.err;

  r = RunCommand(kRun + " --model " + (dir_ / "nowhere").string() + " --tokens 5", dir_);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("config.json"), std::string::npos) << r.err;

  r = RunCommand(kRun + m + " --tokens 5 --device cuda", dir_);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("cuda"), std::string::npos) << r.err;

  r = RunCommand(kRun + m + " --tokens 5 --top-p 0", dir_);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("top_p"), std::string::npos) << r.err;

  r = RunCommand(kMkmodel + " --preset huge --out " + (dir_ / "x").string(), dir_);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("unknown preset 'huge'"), std::string::npos) << r.err;

  r = RunCommand(kMkmodel + " --preset tiny --set n_group=5 --out " + (dir_ / "y").string(), dir_);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("n_group"), std::string::npos) << r.err;
}

TEST_F(CliTest, WritesLoadsThatEpicPlanReads) {
  const std::string loads = (dir_ / "loads.json").string();
  const Result r = RunCommand(kRun + " --model " + model_.string() +
                                  " --tokens 5,17,300,2 --max-new-tokens 3 --ignore-eos --loads-out " + loads,
                              dir_);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  std::ifstream f(loads);
  const nlohmann::json j = nlohmann::json::parse(f);
  // v2-160: layers 1 and 2 are MoE, 160 experts, top-6; 4 prompt tokens + 2 decode steps.
  EXPECT_EQ(j["layers"], nlohmann::json({1, 2}));
  ASSERT_EQ(j["loads"].size(), 2u);
  for (const auto& layer : j["loads"]) {
    ASSERT_EQ(layer.size(), 160u);
    int64_t sum = 0;
    for (const auto& v : layer) sum += v.get<int64_t>();
    EXPECT_EQ(sum, 6 * 6);
  }
  const std::string plan = (dir_ / "plan.json").string();
  const Result p = RunCommand(std::string(EPIC_BINARY) + " plan --loads " + loads +
                                  " --ranks 4 --slots-per-rank 42 --groups 8 --out " + plan,
                              dir_);
  EXPECT_EQ(p.exit_code, 0) << p.err;
}

TEST_F(CliTest, HelpNamesEveryFlag) {
  const Result r = RunCommand(kRun + " --help", dir_);
  EXPECT_EQ(r.exit_code, 0);
  for (const char* flag : {"--model", "--tokens", "--max-new-tokens", "--temperature", "--top-k", "--top-p",
                           "--seed", "--dump-logits", "--device", "--threads", "--expert-counts",
                           "--ignore-eos", "--block-size", "--mmap", "--exchange-stats", "--phase-times", "--loads-out",
                           "--prompt", "--tokenizer", "--precision", "--attention"}) {
    EXPECT_NE(r.out.find(flag), std::string::npos) << flag;
  }
}

// The checkpoint's tokenizer on its own: epic tokenize and detokenize, whole text and
// --jsonl, from the checkpoint and from a folder holding only the two tokenizer files.
TEST_F(CliTest, TokenizeAndDetokenizeRoundTripText) {
  const std::string epic = EPIC_BINARY;
  {
    std::ofstream in((dir_ / "text.txt").string());
    in << "Hello, world! 你好 😀 1234567\n  code: x = a[i];";
  }
  const Result ids = RunCommand(epic + " tokenize --tokenizer " + model_.string() + " < " +
                                    (dir_ / "text.txt").string(), dir_);
  ASSERT_EQ(ids.exit_code, 0) << ids.err;
  EXPECT_EQ(ids.out.rfind("0,", 0), 0u) << "the BOS token (id 0) comes first: " << ids.out;
  {
    std::ofstream out((dir_ / "ids.txt").string());
    out << ids.out;
  }
  const Result back = RunCommand(epic + " detokenize --no-special --tokenizer " + model_.string() + " < " +
                                     (dir_ / "ids.txt").string(), dir_);
  ASSERT_EQ(back.exit_code, 0) << back.err;
  EXPECT_EQ(back.out, "Hello, world! 你好 😀 1234567\n  code: x = a[i];\n");

  // A folder holding only the tokenizer files serves as well; --jsonl, line by line.
  std::filesystem::create_directories(dir_ / "tok");
  for (const char* f : {"tokenizer.json", "tokenizer_config.json"}) {
    std::filesystem::copy_file(model_ / f, dir_ / "tok" / f);
  }
  {
    std::ofstream in((dir_ / "lines.jsonl").string());
    in << "\"a\"\n\"<｜User｜>hi\"\n\"\"\n";
  }
  const Result lines = RunCommand(epic + " tokenize --jsonl --no-special --tokenizer " + (dir_ / "tok").string() +
                                      " < " + (dir_ / "lines.jsonl").string(), dir_);
  ASSERT_EQ(lines.exit_code, 0) << lines.err;
  std::istringstream rows(lines.out);
  std::string row;
  std::vector<nlohmann::json> parsed;
  while (std::getline(rows, row)) parsed.push_back(nlohmann::json::parse(row));
  ASSERT_EQ(parsed.size(), 3u);
  EXPECT_EQ(parsed[2], nlohmann::json::array());
  // --no-special: the special token written in the text is plain text, not its id.
  for (const auto& id : parsed[1]) EXPECT_GT(id.get<int>(), 6);
  {
    std::ofstream out((dir_ / "rows.jsonl").string());
    out << lines.out;
  }
  const Result texts = RunCommand(epic + " detokenize --jsonl --tokenizer " + (dir_ / "tok").string() + " < " +
                                      (dir_ / "rows.jsonl").string(), dir_);
  ASSERT_EQ(texts.exit_code, 0) << texts.err;
  EXPECT_EQ(texts.out, "\"a\"\n\"<｜User｜>hi\"\n\"\"\n");

  // Bad input: a clear error, exit 2.
  const Result bad = RunCommand("echo 5,abc | " + epic + " detokenize --tokenizer " + model_.string(), dir_);
  EXPECT_EQ(bad.exit_code, 2);
  EXPECT_NE(bad.err.find("'abc' is not a token id"), std::string::npos) << bad.err;
  const Result far = RunCommand("echo 99999 | " + epic + " detokenize --tokenizer " + model_.string(), dir_);
  EXPECT_EQ(far.exit_code, 2);
  EXPECT_NE(far.err.find("99999"), std::string::npos) << far.err;
  const Result missing = RunCommand("echo hi | " + epic + " tokenize --tokenizer " + dir_.path().string(), dir_);
  EXPECT_EQ(missing.exit_code, 2);
  EXPECT_NE(missing.err.find("tokenizer.json"), std::string::npos) << missing.err;
}

// epic-run --prompt takes text and prints the text of the ids --tokens would print.
TEST_F(CliTest, PromptTextGivesTheTextOfTheSameIds) {
  const std::string epic = EPIC_BINARY;
  const Result ids = RunCommand("printf 'The capital of France is' | " + epic + " tokenize --tokenizer " +
                                    model_.string(), dir_);
  ASSERT_EQ(ids.exit_code, 0) << ids.err;
  std::string prompt_ids = ids.out;
  prompt_ids.pop_back();  // the newline
  const Result by_ids = RunCommand(kRun + " --model " + model_.string() + " --tokens " + prompt_ids +
                                       " --max-new-tokens 12 --ignore-eos", dir_);
  ASSERT_EQ(by_ids.exit_code, 0) << by_ids.err;
  const Result by_text = RunCommand(kRun + " --model " + model_.string() +
                                        " --prompt 'The capital of France is' --max-new-tokens 12 --ignore-eos",
                                    dir_);
  ASSERT_EQ(by_text.exit_code, 0) << by_text.err;
  std::string spaced = by_ids.out;
  spaced.pop_back();
  for (char& c : spaced) c = c == ' ' ? ',' : c;
  {
    std::ofstream out((dir_ / "gen.txt").string());
    out << spaced;
  }
  const Result text = RunCommand(epic + " detokenize --no-special --tokenizer " + model_.string() + " < " +
                                     (dir_ / "gen.txt").string(), dir_);
  ASSERT_EQ(text.exit_code, 0) << text.err;
  EXPECT_EQ(by_text.out, text.out);
  const Result both = RunCommand(kRun + " --model " + model_.string() + " --prompt x --tokens 1", dir_);
  EXPECT_NE(both.exit_code, 0);
  const Result neither = RunCommand(kRun + " --model " + model_.string() + " --max-new-tokens 2", dir_);
  EXPECT_NE(neither.exit_code, 0);
  EXPECT_NE(neither.err.find("--tokens or --prompt"), std::string::npos) << neither.err;
}

}  // namespace
}  // namespace epic
