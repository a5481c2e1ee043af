// Text serving end to end, as real processes: launch/cluster.sh on a checkpoint with its
// tokenizer, driven over the OpenAI-compatible HTTP API with curl and over gRPC with
// text; answers compared with epic-run on the same checkpoint, decoded.
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "epic.grpc.pb.h"
#include "tests/testing/cache_wait.h"
#include "tests/testing/process.h"

namespace epic {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using nlohmann::json;
using testing::Capture;
using testing::JsonPort;
using testing::Process;
using testing::ReadAll;

// Shell-quotes S for a single-quoted argument.
std::string Quote(const std::string& s) {
  std::string out = "'";
  for (const char c : s) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

struct HttpAnswer {
  int status = 0;
  std::string body;
  json Json() const { return json::parse(body, nullptr, false); }
};

// curl, as users call the API: the body and the status code.
HttpAnswer Curl(int port, const std::string& method, const std::string& path, const std::string& body = "",
                const std::string& token = "") {
  std::string command = "curl -sS -N -X " + method + " -w '\\n%{http_code}' -H 'Content-Type: application/json'";
  if (!token.empty()) command += " -H 'Authorization: Bearer " + token + "'";
  if (!body.empty()) command += " --data-binary " + Quote(body);
  command += " http://127.0.0.1:" + std::to_string(port) + path + " 2>&1";
  const std::string out = Capture(command);
  HttpAnswer a;
  const size_t nl = out.rfind('\n');
  if (nl == std::string::npos) return a;
  a.status = std::atoi(out.c_str() + nl + 1);
  a.body = out.substr(0, nl);
  return a;
}

// The `data:` payloads of a server-sent event stream, in order.
std::vector<std::string> SseData(const std::string& body) {
  std::vector<std::string> out;
  size_t at = 0;
  while ((at = body.find("data: ", at)) != std::string::npos) {
    const size_t end = body.find("\n\n", at);
    out.push_back(body.substr(at + 6, end - at - 6));
    at = end == std::string::npos ? body.size() : end + 2;
  }
  return out;
}

// POSTs BODY to PATH as a raw HTTP/1.1 request and reads until the first server-sent
// event has arrived; returns the socket (the stream goes on) and what was read in GOT.
int OpenStream(int port, const std::string& path, const std::string& body, std::string* got) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  // On failure GOT ends with what failed, for the test's message.
  auto failed = [&](const std::string& what, bool system_error = true) {
    *got += "\n[OpenStream: " + what + (system_error ? std::string(": ") + std::strerror(errno) : "") + "]";
    close(fd);
    return -1;
  };
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) return failed("connect");
  const std::string request = "POST " + path + " HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                              "Content-Length: " + std::to_string(body.size()) + "\r\n\r\n" + body;
  if (write(fd, request.data(), request.size()) != static_cast<ssize_t>(request.size())) return failed("write");
  char buf[4096];
  while (got->find("data: ") == std::string::npos) {
    const ssize_t n = read(fd, buf, sizeof buf);
    if (n <= 0) return n == 0 ? failed("the server closed the connection before the first event", false) : failed("read");
    got->append(buf, static_cast<size_t>(n));
  }
  return fd;
}

constexpr int kCacheBlocks = 64;
constexpr int kBlockSize = 16;

class TextServingTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new fs::path(testing::DirWithModel("text-serving", EPIC_MKMODEL_BINARY, "v2-160", 5));
    ASSERT_FALSE(dir_->empty()) << "epic-mkmodel failed";
    const fs::path ready = *dir_ / "ready.json";
    cluster_ = new Process(
        {EPIC_CLUSTER_SCRIPT, "--model", (*dir_ / "model").string(), "--np", "2", "--port", "0", "--http-port", "0",
         "--metrics-port", "0", "--listen-host", "127.0.0.1", "--threads", "1", "--no-build", "--ready-file",
         ready.string(), "--", "--cache-blocks", std::to_string(kCacheBlocks), "--block-size",
         std::to_string(kBlockSize), "--max-waiting", "2", "--max-running", "16", "--max-step-tokens", "64",
         "--served-model-name", "epic-test"},
        *dir_ / "cluster.log", {"EPIC_BUILD_DIR=" + std::string(EPIC_BUILD_DIR)});
    for (int i = 0; i < 600 && !fs::exists(ready); ++i) std::this_thread::sleep_for(100ms);
    const std::string text = ReadAll(ready);
    grpc_port_ = JsonPort(text, "port");
    http_port_ = JsonPort(text, "http_port");
    metrics_port_ = JsonPort(text, "metrics_port");
  }
  static void TearDownTestSuite() {
    cluster_->Signal(SIGTERM);
    cluster_->Wait(30s);
    delete cluster_;
    fs::remove_all(*dir_);
    delete dir_;
  }
  void TearDown() override {
    if (HasFailure()) std::fprintf(stderr, "--- cluster.log ---\n%s\n", ReadAll(*dir_ / "cluster.log").c_str());
  }

  static std::string Model() { return (*dir_ / "model").string(); }

  // epic-run's greedy text for PROMPT (what the cluster must answer).
  static std::string EpicRunText(const std::string& prompt, int max_new) {
    std::string out = Capture(std::string(EPIC_RUN_BINARY) + " --model " + Model() + " --threads 1 --prompt " +
                              Quote(prompt) + " --max-new-tokens " + std::to_string(max_new) +
                              " --ignore-eos 2>/dev/null");
    if (!out.empty() && out.back() == '\n') out.pop_back();
    return out;
  }
  static std::vector<int32_t> EpicRunIds(const std::vector<int32_t>& prompt, int max_new) {
    std::string ids;
    for (const int32_t t : prompt) {
      if (!ids.empty()) ids += ',';
      ids += std::to_string(t);
    }
    std::istringstream out(Capture(std::string(EPIC_RUN_BINARY) + " --model " + Model() + " --threads 1 --tokens " +
                                   ids + " --max-new-tokens " + std::to_string(max_new) + " --ignore-eos 2>/dev/null"));
    std::vector<int32_t> result;
    for (int32_t id; out >> id;) result.push_back(id);
    return result;
  }

  v1::ModelInfo Info() {
    auto stub = v1::Epic::NewStub(
        grpc::CreateChannel("127.0.0.1:" + std::to_string(grpc_port_), grpc::InsecureChannelCredentials()));
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + 5s);
    v1::ModelInfo info;
    EXPECT_TRUE(stub->GetModelInfo(&ctx, {}, &info).ok());
    return info;
  }
  bool WaitAllBlocksFree(std::chrono::milliseconds timeout) {
    return testing::WaitAllBlocksFree([&] { return Info(); }, timeout);
  }

  static fs::path* dir_;
  static Process* cluster_;
  static int grpc_port_, http_port_, metrics_port_;
};

fs::path* TextServingTest::dir_ = nullptr;
Process* TextServingTest::cluster_ = nullptr;
int TextServingTest::grpc_port_ = 0;
int TextServingTest::http_port_ = 0;
int TextServingTest::metrics_port_ = 0;

const char kPrompt[] = "The capital of France is";

TEST_F(TextServingTest, CompletionsEqualEpicRunDecoded) {
  ASSERT_GT(http_port_, 0);
  const std::string expected = EpicRunText(kPrompt, 12);
  const HttpAnswer a = Curl(http_port_, "POST", "/v1/completions",
                            json{{"model", "epic-test"}, {"prompt", kPrompt}, {"max_tokens", 12}, {"temperature", 0},
                                 {"ignore_eos", true}}.dump());
  ASSERT_EQ(a.status, 200) << a.body;
  const json answer = a.Json();
  EXPECT_EQ(answer["object"], "text_completion");
  EXPECT_EQ(answer["model"], "epic-test");
  ASSERT_EQ(answer["choices"].size(), 1u);
  EXPECT_EQ(answer["choices"][0]["text"], expected);
  EXPECT_EQ(answer["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(answer["usage"]["completion_tokens"], 12);
  const HttpAnswer tokens = Curl(http_port_, "POST", "/tokenize", json{{"prompt", kPrompt}}.dump());
  ASSERT_EQ(tokens.status, 200) << tokens.body;
  EXPECT_EQ(answer["usage"]["prompt_tokens"], tokens.Json()["count"]);
  EXPECT_EQ(answer["usage"]["total_tokens"], tokens.Json()["count"].get<int>() + 12);

  // The prompt as ids, with the log-probabilities of the sampled tokens.
  const auto ids = tokens.Json()["tokens"].get<std::vector<int32_t>>();
  const HttpAnswer by_ids = Curl(http_port_, "POST", "/v1/completions",
                                 json{{"prompt", ids}, {"max_tokens", 12}, {"temperature", 0}, {"ignore_eos", true},
                                      {"logprobs", 0}}.dump());
  ASSERT_EQ(by_ids.status, 200) << by_ids.body;
  const json by_ids_answer = by_ids.Json();
  EXPECT_EQ(by_ids_answer["choices"][0]["text"], expected);
  const json& lp = by_ids_answer["choices"][0]["logprobs"];
  ASSERT_EQ(lp["token_logprobs"].size(), 12u);
  for (const json& v : lp["token_logprobs"]) EXPECT_LE(v.get<double>(), 0.0);
  EXPECT_EQ(lp["tokens"].size(), 12u);
}

TEST_F(TextServingTest, StreamedDeltasAddUpToTheWholeAnswer) {
  const std::string expected = EpicRunText(kPrompt, 20);
  const HttpAnswer a = Curl(http_port_, "POST", "/v1/completions",
                            json{{"prompt", kPrompt}, {"max_tokens", 20}, {"temperature", 0}, {"ignore_eos", true},
                                 {"stream", true}, {"stream_options", {{"include_usage", true}}}}.dump());
  ASSERT_EQ(a.status, 200) << a.body;
  const std::vector<std::string> events = SseData(a.body);
  ASSERT_GE(events.size(), 3u) << a.body;
  EXPECT_EQ(events.back(), "[DONE]");
  std::string text;
  int finishes = 0;
  json usage;
  for (size_t i = 0; i + 1 < events.size(); ++i) {
    const json chunk = json::parse(events[i]);
    EXPECT_EQ(chunk["object"], "text_completion");
    if (chunk["choices"].empty()) {
      usage = chunk["usage"];
      continue;
    }
    text += chunk["choices"][0]["text"].get<std::string>();
    finishes += !chunk["choices"][0]["finish_reason"].is_null();
  }
  EXPECT_EQ(text, expected);
  EXPECT_EQ(finishes, 1);
  EXPECT_EQ(usage["completion_tokens"], 20);

  // Chat: the role first, content deltas, the finish reason, [DONE].
  const json chat = {{"messages", {{{"role", "system"}, {"content", "Be brief."}}, {{"role", "user"}, {"content", "你好"}}}},
                     {"max_tokens", 10}, {"temperature", 0}, {"ignore_eos", true}};
  const HttpAnswer whole = Curl(http_port_, "POST", "/v1/chat/completions", chat.dump());
  ASSERT_EQ(whole.status, 200) << whole.body;
  EXPECT_EQ(whole.Json()["object"], "chat.completion");
  EXPECT_EQ(whole.Json()["choices"][0]["message"]["role"], "assistant");
  json streamed_chat = chat;
  streamed_chat["stream"] = true;
  const HttpAnswer streamed = Curl(http_port_, "POST", "/v1/chat/completions", streamed_chat.dump());
  ASSERT_EQ(streamed.status, 200) << streamed.body;
  const auto chunks = SseData(streamed.body);
  ASSERT_GE(chunks.size(), 2u);
  EXPECT_EQ(chunks.back(), "[DONE]");
  std::string content;
  for (size_t i = 0; i + 1 < chunks.size(); ++i) {
    const json chunk = json::parse(chunks[i]);
    EXPECT_EQ(chunk["object"], "chat.completion.chunk");
    if (i == 0) {
      EXPECT_EQ(chunk["choices"][0]["delta"]["role"], "assistant");
    }
    content += chunk["choices"][0]["delta"].value("content", "");
  }
  EXPECT_EQ(content, whole.Json()["choices"][0]["message"]["content"]);
}

TEST_F(TextServingTest, ChatOverHttpAndGrpcEqualsEpicRunOnTheRenderedChat) {
  const json messages = {{{"role", "user"}, {"content", "What is 2+2?"}},
                         {{"role", "assistant"}, {"content", "<think>easy</think>4"}},
                         {{"role", "user"}, {"content", "And 3+3? 😀"}}};
  // The rendered chat's ids, as /tokenize gives them: the template wrote the BOS.
  const HttpAnswer tokens = Curl(http_port_, "POST", "/tokenize", json{{"messages", messages}}.dump());
  ASSERT_EQ(tokens.status, 200) << tokens.body;
  const auto ids = tokens.Json()["tokens"].get<std::vector<int32_t>>();
  ASSERT_FALSE(ids.empty());
  EXPECT_EQ(ids[0], 0);
  const std::vector<int32_t> expected_ids = EpicRunIds(ids, 8);
  const HttpAnswer text = Curl(http_port_, "POST", "/detokenize", json{{"tokens", expected_ids}}.dump());
  ASSERT_EQ(text.status, 200);

  const HttpAnswer chat = Curl(http_port_, "POST", "/v1/chat/completions",
                               json{{"messages", messages}, {"max_tokens", 8}, {"temperature", 0},
                                    {"ignore_eos", true}}.dump());
  ASSERT_EQ(chat.status, 200) << chat.body;
  const std::string answer = chat.Json()["choices"][0]["message"]["content"];
  EXPECT_EQ(chat.Json()["usage"]["prompt_tokens"], ids.size());

  // gRPC with messages: the same ids and text.
  auto stub = v1::Epic::NewStub(
      grpc::CreateChannel("127.0.0.1:" + std::to_string(grpc_port_), grpc::InsecureChannelCredentials()));
  v1::GenerateRequest request;
  for (const json& m : messages) {
    v1::ChatMessage* cm = request.add_messages();
    cm->set_role(m["role"]);
    cm->set_content(m["content"]);
  }
  request.set_max_tokens(8);
  request.set_ignore_eos(true);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + 60s);
  auto reader = stub->Generate(&ctx, request);
  std::vector<int32_t> got;
  std::string streamed;
  for (v1::GenerateResponse r; reader->Read(&r);) {
    got.insert(got.end(), r.token_ids().begin(), r.token_ids().end());
    streamed += r.text();
  }
  const grpc::Status status = reader->Finish();
  ASSERT_TRUE(status.ok()) << status.error_code() << ": " << status.error_message();
  EXPECT_EQ(got, expected_ids);
  EXPECT_EQ(streamed, answer);
  // The answer is the text of those ids without special tokens.
  const HttpAnswer plain = Curl(http_port_, "POST", "/v1/completions",
                                json{{"prompt", expected_ids}, {"max_tokens", 1}}.dump());
  EXPECT_EQ(plain.status, 200);
}

TEST_F(TextServingTest, GrpcTextPromptsStreamTextAndStopStringsEndIt) {
  auto stub = v1::Epic::NewStub(
      grpc::CreateChannel("127.0.0.1:" + std::to_string(grpc_port_), grpc::InsecureChannelCredentials()));
  auto run = [&](const std::vector<std::string>& stops, std::vector<int32_t>* ids, v1::GenerateResponse* last) {
    v1::GenerateRequest request;
    request.set_prompt(kPrompt);
    request.set_max_tokens(24);
    request.set_ignore_eos(true);
    for (const std::string& s : stops) request.add_stop(s);
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + 60s);
    auto reader = stub->Generate(&ctx, request);
    std::string text;
    for (v1::GenerateResponse r; reader->Read(&r);) {
      ids->insert(ids->end(), r.token_ids().begin(), r.token_ids().end());
      text += r.text();
      *last = r;
    }
    const grpc::Status status = reader->Finish();
    EXPECT_TRUE(status.ok()) << status.error_code() << ": " << status.error_message();
    return text;
  };
  std::vector<int32_t> ids;
  v1::GenerateResponse last;
  const std::string whole = run({}, &ids, &last);
  EXPECT_EQ(whole, EpicRunText(kPrompt, 24));
  EXPECT_EQ(last.finish_reason(), v1::FINISH_REASON_LENGTH);
  ASSERT_GE(whole.size(), 8u);
  // A stop string from the middle of the answer: the text ends where it begins.
  const std::string stop = whole.substr(whole.size() / 2, 2);
  std::vector<int32_t> cut_ids;
  const std::string cut = run({stop, "never-in-the-answer"}, &cut_ids, &last);
  EXPECT_EQ(cut, whole.substr(0, whole.find(stop)));
  EXPECT_EQ(last.finish_reason(), v1::FINISH_REASON_STOP);
  EXPECT_EQ(last.stop(), stop);
  EXPECT_LT(cut_ids.size(), ids.size());
  EXPECT_EQ(last.usage().completion_tokens(), cut_ids.size());
  // Over HTTP the same stop gives the same text.
  const HttpAnswer a = Curl(http_port_, "POST", "/v1/completions",
                            json{{"prompt", kPrompt}, {"max_tokens", 24}, {"temperature", 0}, {"ignore_eos", true},
                                 {"stop", stop}}.dump());
  ASSERT_EQ(a.status, 200) << a.body;
  EXPECT_EQ(a.Json()["choices"][0]["text"], cut);
  EXPECT_EQ(a.Json()["choices"][0]["finish_reason"], "stop");
  EXPECT_TRUE(WaitAllBlocksFree(5s));
}

TEST_F(TextServingTest, EveryErrorHasOpenAisShapeAndCode) {
  struct Case {
    std::string path, body;
    int status;
    std::string mention;
  };
  const std::vector<Case> cases = {
      {"/v1/completions", "{not json", 400, "JSON"},
      {"/v1/completions", R"({"max_tokens": 4})", 400, "prompt"},
      {"/v1/completions", R"({"prompt": "x", "temperature": "hot"})", 400, "temperature"},
      {"/v1/completions", R"({"prompt": "x", "n": 2})", 400, "n"},
      {"/v1/completions", R"({"prompt": "x", "echo": true})", 400, "echo"},
      {"/v1/completions", R"({"prompt": "x", "max_tokens": 0})", 400, "max_tokens"},
      {"/v1/completions", R"({"prompt": "x", "logprobs": 3})", 400, "logprobs"},
      {"/v1/completions", R"({"prompt": ["a", "b"]})", 400, "prompt"},
      {"/v1/completions", R"({"prompt": [5, 99999]})", 400, "prompt_token_ids[1]"},
      {"/v1/completions", R"({"prompt": "x", "stop": ""})", 400, "stop"},
      {"/v1/completions", R"({"prompt": "x", "max_tokens": 100000})", 400, "max_tokens"},
      {"/v1/chat/completions", R"({"messages": []})", 400, "messages"},
      {"/v1/chat/completions", R"({"messages": [{"content": "hi"}]})", 400, "messages[0].role"},
      {"/v1/chat/completions", R"({"messages": [{"role": "user", "content": "x"}], "tools": []})", 400, "tools"},
      {"/v1/chat/completions", R"({"messages": [{"role": "user", "content": "x"}], "model": "gpt-4"})", 404, "gpt-4"},
      {"/v1/nothing", "{}", 404, "/v1/nothing"},
  };
  for (const Case& c : cases) {
    const HttpAnswer a = Curl(http_port_, "POST", c.path, c.body);
    EXPECT_EQ(a.status, c.status) << c.body << " -> " << a.body;
    const json body = a.Json();
    ASSERT_TRUE(body.contains("error")) << a.body;
    EXPECT_EQ(body["error"]["code"], c.status);
    EXPECT_NE(body["error"]["message"].get<std::string>().find(c.mention), std::string::npos)
        << c.body << " -> " << a.body;
  }
  // Serving goes on.
  EXPECT_EQ(Curl(http_port_, "GET", "/health").status, 200);
  const HttpAnswer models = Curl(http_port_, "GET", "/v1/models");
  ASSERT_EQ(models.status, 200);
  EXPECT_EQ(models.Json()["data"][0]["id"], "epic-test");
  EXPECT_TRUE(WaitAllBlocksFree(5s));
}

TEST_F(TextServingTest, AFullQueueGets429) {
  // Each request needs the whole cache (64 blocks of 16), so one runs, two wait, and the
  // rest are turned away.
  const std::string body = json{{"prompt", kPrompt}, {"max_tokens", kCacheBlocks * kBlockSize - 16},
                                {"temperature", 0}, {"ignore_eos", true}}.dump();
  std::vector<HttpAnswer> answers(6);
  std::vector<std::thread> threads;
  for (size_t i = 0; i < answers.size(); ++i) {
    threads.emplace_back([&, i] { answers[i] = Curl(http_port_, "POST", "/v1/completions", body); });
    std::this_thread::sleep_for(100ms);
  }
  for (auto& t : threads) t.join();
  int ok = 0, busy = 0;
  for (const HttpAnswer& a : answers) {
    ok += a.status == 200;
    if (a.status == 429) {
      ++busy;
      EXPECT_EQ(a.Json()["error"]["type"], "rate_limit_error");
    }
  }
  EXPECT_GE(busy, 1);
  EXPECT_GE(ok, 1);
  EXPECT_EQ(ok + busy, 6);
  EXPECT_TRUE(WaitAllBlocksFree(10s));
}

TEST_F(TextServingTest, AClientThatDisconnectsMidStreamFreesItsBlocks) {
  const std::string body = json{{"prompt", kPrompt}, {"max_tokens", 900}, {"ignore_eos", true}, {"stream", true}}.dump();
  std::string got;
  const int fd = OpenStream(http_port_, "/v1/completions", body, &got);
  ASSERT_GE(fd, 0) << got;
  // The stream has begun and holds blocks; hang up.
  const v1::ModelInfo busy = Info();
  EXPECT_LT(busy.cache().free_blocks(), busy.cache().total_blocks());
  close(fd);
  EXPECT_TRUE(WaitAllBlocksFree(10s)) << "the cancelled stream kept its cache blocks";
}

// The worker job dies mid-stream: the request waits for the relaunched job and the
// stream goes on; its text is the undisturbed run's.
TEST_F(TextServingTest, AJobThatDiesMidStreamResumesAndTheTextIsUnchanged) {
  const std::string body =
      json{{"prompt", kPrompt}, {"max_tokens", 120}, {"temperature", 0}, {"ignore_eos", true}, {"stream", true}}.dump();
  std::string got;
  const int fd = OpenStream(http_port_, "/v1/completions", body, &got);
  ASSERT_GE(fd, 0) << got;
  // The bracket keeps pkill from matching the shell that runs it.
  ASSERT_EQ(std::system(("pkill -9 -f '[e]pic-worker --model " + Model() + "'").c_str()), 0);
  char buf[4096];
  for (ssize_t n; (n = read(fd, buf, sizeof buf)) > 0;) {
    got.append(buf, static_cast<size_t>(n));
    if (got.find("data: [DONE]") != std::string::npos) break;
  }
  close(fd);
  const std::vector<std::string> events = SseData(got);
  ASSERT_GE(events.size(), 2u) << got;
  EXPECT_EQ(events.back(), "[DONE]");
  std::string text;
  for (size_t i = 0; i + 1 < events.size(); ++i) {
    const json chunk = json::parse(events[i], nullptr, false);
    ASSERT_TRUE(chunk.is_object() && chunk.contains("choices")) << events[i];
    text += chunk["choices"][0]["text"].get<std::string>();
  }
  EXPECT_EQ(text, EpicRunText(kPrompt, 120));
  EXPECT_GE(Info().worker_attachments(), 2) << "the job was never killed and relaunched";
}

// `epic chat` as a user types into it: each line a turn, /reset starts over; every answer
// equals the gRPC chat with the same messages.
TEST_F(TextServingTest, EpicChatKeepsTheConversationAndResets) {
  {
    std::ofstream in(*dir_ / "chat.txt");
    in << "Hello!\nWhat next?\n/reset\nHello!\n";
  }
  const std::string out = Capture(std::string(EPIC_BINARY) + " chat --server 127.0.0.1:" + std::to_string(grpc_port_) +
                                  " --max-tokens 6 --system 'Be brief.' < " + (*dir_ / "chat.txt").string() +
                                  " 2>/dev/null");
  // The answer to each turn, by the chat API directly.
  auto answer = [&](const std::vector<std::pair<std::string, std::string>>& turns) {
    auto stub = v1::Epic::NewStub(
        grpc::CreateChannel("127.0.0.1:" + std::to_string(grpc_port_), grpc::InsecureChannelCredentials()));
    v1::GenerateRequest request;
    for (const auto& [role, content] : turns) {
      v1::ChatMessage* m = request.add_messages();
      m->set_role(role);
      m->set_content(content);
    }
    request.set_max_tokens(6);
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + 60s);
    auto reader = stub->Generate(&ctx, request);
    std::string text;
    for (v1::GenerateResponse r; reader->Read(&r);) text += r.text();
    const grpc::Status status = reader->Finish();
    EXPECT_TRUE(status.ok()) << status.error_code() << ": " << status.error_message();
    return text;
  };
  const std::string first = answer({{"system", "Be brief."}, {"user", "Hello!"}});
  const std::string second =
      answer({{"system", "Be brief."}, {"user", "Hello!"}, {"assistant", first}, {"user", "What next?"}});
  // After /reset the conversation starts over: the same answer as the first turn.
  EXPECT_EQ(out, first + "\n" + second + "\n" + first + "\n");
}

TEST_F(TextServingTest, MetricsCountHttpCallsAndTokenization) {
  EXPECT_EQ(Curl(http_port_, "POST", "/v1/completions", R"({"prompt": "hi", "max_tokens": 2})").status, 200);
  const std::string page = testing::HttpGet(metrics_port_, "/metrics");
  EXPECT_NE(page.find(R"(epic:http_requests_total{code="200",route="/v1/completions"})"), std::string::npos) << page;
  EXPECT_NE(page.find("epic:tokenization_seconds_count"), std::string::npos);
}

// A coordinator with a bearer token and no worker job: 401 without the token, 503 with it.
TEST(TextServingAloneTest, NoTokenIs401AndNoWorkerJobIs503) {
  const fs::path dir = fs::temp_directory_path() / ("epic-text-alone-" + std::to_string(getpid()));
  fs::create_directories(dir);
  const std::string mk = std::string(EPIC_MKMODEL_BINARY) + " --preset tiny --out " + (dir / "model").string() +
                         " >/dev/null 2>&1";
  ASSERT_EQ(std::system(mk.c_str()), 0);
  { std::ofstream(dir / "secret") << "s3cret\n"; }
  { std::ofstream(dir / "token") << "let-me-in\n"; }
  {
    Process coordinator({EPIC_COORDINATOR_BINARY, "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0",
                         "--metrics-listen", "off", "--worker-secret-file", (dir / "secret").string(),
                         "--auth-token-file", (dir / "token").string(), "--tokenizer", (dir / "model").string(),
                         "--ready-file", (dir / "ready.json").string()},
                        dir / "coordinator.log");
    for (int i = 0; i < 100 && !fs::exists(dir / "ready.json"); ++i) std::this_thread::sleep_for(100ms);
    const int http = JsonPort(ReadAll(dir / "ready.json"), "http_port");
    ASSERT_GT(http, 0);
    const std::string body = R"({"prompt": "hi", "max_tokens": 2})";
    const HttpAnswer no_token = Curl(http, "POST", "/v1/completions", body);
    EXPECT_EQ(no_token.status, 401) << no_token.body;
    EXPECT_EQ(no_token.Json()["error"]["type"], "authentication_error");
    EXPECT_EQ(Curl(http, "POST", "/v1/completions", body, "wrong").status, 401);
    const HttpAnswer no_job = Curl(http, "POST", "/v1/completions", body, "let-me-in");
    EXPECT_EQ(no_job.status, 503) << no_job.body;
    EXPECT_EQ(Curl(http, "GET", "/health").status, 503);  // open, and honest
    // The tokenizer needs no worker job.
    const HttpAnswer tokens = Curl(http, "POST", "/tokenize", R"({"prompt": "hi"})", "let-me-in");
    EXPECT_EQ(tokens.status, 200) << tokens.body;
    // Found with fuzz/http_body.cc (fuzz/corpus/http_body/crash_deep_*): a body nested
    // 200000 deep crashed the server (printing and copying JSON recurse). It is refused,
    // and the server serves on.
    for (const std::string& path : {"/detokenize", "/tokenize"}) {
      const std::string nested = std::string(200000, '[') + std::string(200000, ']');
      std::ofstream(dir / "deep.json") << (path == "/detokenize" ? R"({"tokens": [)" + nested + "]}"
                                                                  : R"({"messages": [{"role": "user", "content": "x", "x": )" +
                                                                        nested + "}]}");
      const std::string out = Capture("curl -sS -w '\\n%{http_code}' -H 'Content-Type: application/json' "
                                      "-H 'Authorization: Bearer let-me-in' --data-binary @" + (dir / "deep.json").string() +
                                      " http://127.0.0.1:" + std::to_string(http) + path + " 2>&1");
      EXPECT_NE(out.find("the body is nested more than 64 deep"), std::string::npos) << path << ": " << out.substr(0, 300);
      EXPECT_EQ(out.substr(out.rfind('\n') + 1), "400") << path;
    }
    EXPECT_EQ(Curl(http, "POST", "/tokenize", R"({"prompt": "hi"})", "let-me-in").status, 200);
    // A second coordinator on the same HTTP port is refused at start-up, not let to share it.
    const std::string second = Capture(std::string(EPIC_COORDINATOR_BINARY) + " --worker-secret-file " +
                                       (dir / "secret").string() + " --listen 127.0.0.1:0 --metrics-listen off " +
                                       "--http-listen 127.0.0.1:" + std::to_string(http) + " 2>&1; echo rc=$?");
    EXPECT_NE(second.find("address in use"), std::string::npos) << second;
    EXPECT_NE(second.find("rc=2"), std::string::npos) << second;
    coordinator.Signal(SIGTERM);
    EXPECT_NE(coordinator.Wait(20s), -1);
  }
  // A tokenizer the coordinator cannot honour stops it at start-up, naming the problem.
  {
    std::ofstream(dir / "model" / "tokenizer.json") << R"({"model": {"type": "Unigram"}})";
    const std::string out = Capture(std::string(EPIC_COORDINATOR_BINARY) + " --worker-secret-file " +
                                    (dir / "secret").string() + " --listen 127.0.0.1:0 --http-listen off " +
                                    "--metrics-listen off --tokenizer " + (dir / "model").string() + " 2>&1; echo rc=$?");
    EXPECT_NE(out.find("model.type"), std::string::npos) << out;
    EXPECT_NE(out.find("rc=2"), std::string::npos) << out;
  }
  fs::remove_all(dir);
}

}  // namespace
}  // namespace epic
