#include "client/client_commands.h"

#include <unistd.h>

#include <chrono>
#include <functional>
#include <iostream>
#include <cstdio>
#include <fstream>
#include <memory>
#include <string>

#include <google/protobuf/util/json_util.h>
#include <grpcpp/grpcpp.h>
#include <nlohmann/json.hpp>

#include "common/text_file.h"
#include "common/token_list.h"
#include "coordinator/load_report.h"
#include "client/report_render.h"
#include "epic.grpc.pb.h"
#include "health.grpc.pb.h"

namespace epic::coordinator {

namespace {

// What every subcommand needs to reach a server.
struct Connection {
  std::string server = "127.0.0.1:50051";
  std::string auth_token_file;
  std::string tls_ca;
  double timeout = 0;  // seconds; 0: none

  void AddFlags(CLI::App* cmd) {
    cmd->add_option("--server", server, "the coordinator, HOST:PORT")->capture_default_str();
    cmd->add_option("--auth-token-file", auth_token_file, "file holding the server's bearer token");
    cmd->add_option("--tls-ca", tls_ca, "PEM of the CA that signed the server's certificate (default: plaintext)");
    cmd->add_option("--timeout", timeout, "deadline of the call in seconds (0: none)")
        ->check(CLI::NonNegativeNumber)->capture_default_str();
  }

  StatusOr<std::shared_ptr<grpc::Channel>> Channel() const {
    std::shared_ptr<grpc::ChannelCredentials> creds = grpc::InsecureChannelCredentials();
    if (!tls_ca.empty()) {
      auto pem = ReadTextFile(tls_ca);
      if (!pem.ok()) return InvalidArgumentError("--tls-ca " + pem.status().message());
      grpc::SslCredentialsOptions ssl;
      ssl.pem_root_certs = std::move(pem).value();
      creds = grpc::SslCredentials(ssl);
    }
    return grpc::CreateChannel(server, creds);
  }

  Status Prepare(grpc::ClientContext* ctx) const {
    if (timeout > 0) {
      ctx->set_deadline(std::chrono::system_clock::now() +
                        std::chrono::milliseconds(static_cast<int64_t>(timeout * 1000)));
    }
    if (!auth_token_file.empty()) {
      auto token = ReadSecretFile(auth_token_file);
      if (!token.ok()) return InvalidArgumentError("--auth-token-file " + token.status().message());
      ctx->AddMetadata("authorization", "Bearer " + *token);
    }
    return OkStatus();
  }
};

const char* CodeName(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::OK: return "OK";
    case grpc::StatusCode::CANCELLED: return "CANCELLED";
    case grpc::StatusCode::UNKNOWN: return "UNKNOWN";
    case grpc::StatusCode::INVALID_ARGUMENT: return "INVALID_ARGUMENT";
    case grpc::StatusCode::DEADLINE_EXCEEDED: return "DEADLINE_EXCEEDED";
    case grpc::StatusCode::NOT_FOUND: return "NOT_FOUND";
    case grpc::StatusCode::ALREADY_EXISTS: return "ALREADY_EXISTS";
    case grpc::StatusCode::PERMISSION_DENIED: return "PERMISSION_DENIED";
    case grpc::StatusCode::RESOURCE_EXHAUSTED: return "RESOURCE_EXHAUSTED";
    case grpc::StatusCode::FAILED_PRECONDITION: return "FAILED_PRECONDITION";
    case grpc::StatusCode::ABORTED: return "ABORTED";
    case grpc::StatusCode::OUT_OF_RANGE: return "OUT_OF_RANGE";
    case grpc::StatusCode::UNIMPLEMENTED: return "UNIMPLEMENTED";
    case grpc::StatusCode::INTERNAL: return "INTERNAL";
    case grpc::StatusCode::UNAVAILABLE: return "UNAVAILABLE";
    case grpc::StatusCode::DATA_LOSS: return "DATA_LOSS";
    case grpc::StatusCode::UNAUTHENTICATED: return "UNAUTHENTICATED";
    default: return "UNKNOWN";
  }
}

int Fail(const char* command, const grpc::Status& s) {
  std::fprintf(stderr, "epic %s: %s: %s\n", command, CodeName(s.error_code()), s.error_message().c_str());
  return 1;
}

int Fail(const char* command, const Status& s) {
  std::fprintf(stderr, "epic %s: %s\n", command, s.ToString().c_str());
  return 2;
}

struct GenerateFlags {
  Connection connection;
  std::string tokens;
  std::string prompt;
  bool text = false;  // --prompt given: print text
  std::string stop;
  std::vector<std::string> stop_text;
  uint32_t max_tokens = 16;
  float temperature = 0;
  float top_p = 1;
  int32_t top_k = 0;
  uint64_t seed = 0;
  bool ignore_eos = false;
  bool logprobs = false;
  bool quiet = false;
  std::string request_id;
};

// Streams REQUEST's generation, each response to ON_RESPONSE as it arrives; LAST gets
// the final one (finish reason, usage). Returns the call's status. A problem here
// before any call (a bad --tls-ca or --auth-token-file) goes to LOCAL instead, so that
// callers report it as every subcommand does (exit 2).
grpc::Status Stream(const Connection& c, const v1::GenerateRequest& request,
                    const std::function<void(const v1::GenerateResponse&)>& on_response, v1::GenerateResponse* last,
                    Status* local) {
  auto channel = c.Channel();
  if (!channel.ok()) {
    *local = channel.status();
    return grpc::Status::OK;
  }
  auto stub = v1::Epic::NewStub(*channel);
  grpc::ClientContext ctx;
  if (const Status s = c.Prepare(&ctx); !s.ok()) {
    *local = s;
    return grpc::Status::OK;
  }
  auto reader = stub->Generate(&ctx, request);
  v1::GenerateResponse response;
  while (reader->Read(&response)) {
    on_response(response);
    if (response.finish_reason() != v1::FINISH_REASON_UNSPECIFIED) *last = response;
  }
  return reader->Finish();
}

void FillSampling(const GenerateFlags& f, v1::GenerateRequest* request) {
  request->set_max_tokens(f.max_tokens);
  request->mutable_sampling()->set_temperature(f.temperature);
  request->mutable_sampling()->set_top_p(f.top_p);
  request->mutable_sampling()->set_top_k(f.top_k);
  request->mutable_sampling()->set_seed(f.seed);
  request->set_ignore_eos(f.ignore_eos);
  request->set_logprobs(f.logprobs);
  request->set_request_id(f.request_id);
  for (const std::string& s : f.stop_text) request->add_stop(s);
}

int Generate(const GenerateFlags& f) {
  v1::GenerateRequest request;
  if (f.text) {
    request.set_prompt(f.prompt);
  } else {
    auto prompt = ParseTokenList("--tokens", f.tokens);
    if (!prompt.ok()) return Fail("generate", prompt.status());
    request.mutable_prompt_token_ids()->Add(prompt->begin(), prompt->end());
  }
  FillSampling(f, &request);
  if (!f.stop.empty()) {
    auto stop = ParseTokenList("--stop", f.stop);
    if (!stop.ok()) return Fail("generate", stop.status());
    request.mutable_stop_token_ids()->Add(stop->begin(), stop->end());
  }
  std::string all;
  v1::GenerateResponse last;
  Status local;
  const grpc::Status s = Stream(f.connection, request, [&](const v1::GenerateResponse& response) {
    if (f.text) {
      // The text streams on stdout as it comes.
      std::fwrite(response.text().data(), 1, response.text().size(), stdout);
      std::fflush(stdout);
    }
    for (int i = 0; i < response.token_ids_size(); ++i) {
      const std::string id = std::to_string(response.token_ids(i));
      if (!all.empty()) all += ' ';
      all += id;
      if (!f.quiet && !f.text) {
        std::string piece = id;
        if (f.logprobs && i < response.logprobs_size()) piece += "(" + std::to_string(response.logprobs(i)) + ")";
        std::fprintf(stderr, "%s ", piece.c_str());
        std::fflush(stderr);
      }
    }
  }, &last, &local);
  if (!local.ok()) return Fail("generate", local);
  if (f.text) {
    std::fputc('\n', stdout);
    std::fflush(stdout);
  }
  if (!f.quiet && !f.text && !all.empty()) std::fputc('\n', stderr);
  if (!s.ok()) return Fail("generate", s);
  if (!f.quiet) {
    const std::string stop = last.stop().empty() ? "" : " at stop string \"" + last.stop() + "\"";
    std::fprintf(stderr, "epic generate: %s%s after %u tokens (prompt %u); first token %.3f s\n",
                 last.finish_reason() == v1::FINISH_REASON_STOP ? "stopped" : "reached max_tokens", stop.c_str(),
                 last.usage().completion_tokens(), last.usage().prompt_tokens(),
                 last.usage().time_to_first_token_seconds());
  }
  if (!f.text) std::printf("%s\n", all.c_str());
  return 0;
}

// An interactive chat in the terminal: each line is a user turn; the answer streams
// back and joins the conversation. /reset starts over; Ctrl-D quits.
int Chat(const GenerateFlags& f, const std::string& system) {
  const bool terminal = isatty(STDIN_FILENO);
  std::vector<std::pair<std::string, std::string>> turns;  // (role, content)
  auto reset = [&] {
    turns.clear();
    if (!system.empty()) turns.emplace_back("system", system);
  };
  reset();
  if (terminal) std::fprintf(stderr, "epic chat: %s; /reset starts over, Ctrl-D quits\n", f.connection.server.c_str());
  std::string line;
  for (;;) {
    if (terminal) {
      std::fputs("you> ", stderr);
      std::fflush(stderr);
    }
    if (!std::getline(std::cin, line)) break;
    if (line == "/reset") {
      reset();
      if (terminal) std::fputs("(conversation cleared)\n", stderr);
      continue;
    }
    if (line.empty()) continue;
    turns.emplace_back("user", line);
    v1::GenerateRequest request;
    for (const auto& [role, content] : turns) {
      v1::ChatMessage* m = request.add_messages();
      m->set_role(role);
      m->set_content(content);
    }
    FillSampling(f, &request);
    std::string answer;
    v1::GenerateResponse last;
    Status local;
    const grpc::Status s = Stream(f.connection, request, [&](const v1::GenerateResponse& response) {
      answer += response.text();
      std::fwrite(response.text().data(), 1, response.text().size(), stdout);
      std::fflush(stdout);
    }, &last, &local);
    if (!local.ok()) return Fail("chat", local);
    std::fputc('\n', stdout);
    std::fflush(stdout);
    if (!s.ok()) {
      Fail("chat", s);
      turns.pop_back();  // the turn did not happen; the user may send it again
      continue;
    }
    turns.emplace_back("assistant", answer);
  }
  return 0;
}

int Health(const Connection& c, const std::string& service) {
  auto channel = c.Channel();
  if (!channel.ok()) return Fail("health", channel.status());
  auto stub = grpc::health::v1::Health::NewStub(*channel);
  grpc::ClientContext ctx;
  if (const Status s = c.Prepare(&ctx); !s.ok()) return Fail("health", s);
  if (c.timeout <= 0) ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  grpc::health::v1::HealthCheckRequest request;
  request.set_service(service);
  grpc::health::v1::HealthCheckResponse response;
  const grpc::Status s = stub->Check(&ctx, request, &response);
  if (!s.ok()) return Fail("health", s);
  const bool serving = response.status() == grpc::health::v1::HealthCheckResponse::SERVING;
  std::printf("%s\n", grpc::health::v1::HealthCheckResponse::ServingStatus_Name(response.status()).c_str());
  return serving ? 0 : 1;
}

template <typename Response>
int PrintJson(const char* command, const Response& response) {
  std::string json;
  google::protobuf::util::JsonPrintOptions options;
  options.add_whitespace = true;
  options.preserve_proto_field_names = true;
  options.always_print_primitive_fields = true;
  (void)google::protobuf::util::MessageToJsonString(response, &json, options);
  std::printf("%s", json.c_str());
  (void)command;
  return 0;
}

int Info(const Connection& c) {
  auto channel = c.Channel();
  if (!channel.ok()) return Fail("info", channel.status());
  auto stub = v1::Epic::NewStub(*channel);
  grpc::ClientContext ctx;
  if (const Status s = c.Prepare(&ctx); !s.ok()) return Fail("info", s);
  v1::ModelInfo info;
  const grpc::Status s = stub->GetModelInfo(&ctx, v1::GetModelInfoRequest(), &info);
  if (!s.ok()) return Fail("info", s);
  return PrintJson("info", info);
}

int Load(const Connection& c) {
  auto channel = c.Channel();
  if (!channel.ok()) return Fail("load", channel.status());
  auto stub = v1::Epic::NewStub(*channel);
  grpc::ClientContext ctx;
  if (const Status s = c.Prepare(&ctx); !s.ok()) return Fail("load", s);
  v1::LoadReport report;
  const grpc::Status s = stub->GetLoadReport(&ctx, v1::GetLoadReportRequest(), &report);
  if (!s.ok()) return Fail("load", s);
  return PrintJson("load", report);
}

struct ReportFlags {
  Connection connection;
  std::string input;
  int ranks = 0;
  int redundant_slots = 0;
  int groups = 1;
  std::string format = "text";
  std::string out;
  CLI::App* command = nullptr;  // to tell which flags were given
};

// The report as the chosen format; json is checked against the schema too, so that a
// saved report can be trusted by whatever reads it next.
StatusOr<std::string> Render(const nlohmann::json& report, const std::string& format) {
  if (format == "json") {
    EPIC_RETURN_IF_ERROR(ValidateLoadReport(report));
    return report.dump(1) + "\n";
  }
  return format == "html" ? RenderHtml(report) : RenderText(report);
}

StatusOr<nlohmann::json> ParseJson(const std::string& text, const std::string& what) {
  try {
    return nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    return InvalidArgumentError(what + ": not valid JSON: " + e.what());
  }
}

// A saved report ("schema") as it is, or a loads file ("loads") built into one.
StatusOr<nlohmann::json> ReportFromFile(const ReportFlags& f) {
  EPIC_ASSIGN_OR_RETURN(const std::string text, ReadTextFile(f.input));
  EPIC_ASSIGN_OR_RETURN(const nlohmann::json j, ParseJson(text, f.input));
  if (j.is_object() && j.contains("schema")) {
    if (f.command->count("--ranks") + f.command->count("--redundant-slots") + f.command->count("--groups") > 0) {
      std::fprintf(stderr, "epic report: %s is a saved report; --ranks, --redundant-slots and --groups are ignored\n",
                   f.input.c_str());
    }
    return j;
  }
  if (!j.is_object() || !j.contains("loads")) {
    return InvalidArgumentError(f.input + ": neither a load report (\"schema\") nor a loads file (\"loads\")");
  }
  if (f.command->count("--ranks") == 0) return InvalidArgumentError(f.input + " is a loads file: give --ranks N");
  auto in = ReportInputFromLoads(j, f.ranks, f.redundant_slots, f.groups);
  if (!in.ok()) return InvalidArgumentError(f.input + ": " + in.status().message());
  auto report = BuildLoadReport(*in);
  if (!report.ok()) return Status(report.status().code(), f.input + ": " + report.status().message());
  return report;
}

int Report(const ReportFlags& f) {
  const bool from_server = f.command->count("--server") > 0;
  if (from_server == !f.input.empty()) {
    return Fail("report", InvalidArgumentError("give exactly one of --server ADDR and --input FILE"));
  }
  nlohmann::json report;
  if (from_server) {
    auto channel = f.connection.Channel();
    if (!channel.ok()) return Fail("report", channel.status());
    auto stub = v1::Epic::NewStub(*channel);
    grpc::ClientContext ctx;
    if (const Status s = f.connection.Prepare(&ctx); !s.ok()) return Fail("report", s);
    v1::LoadReport response;
    const grpc::Status s = stub->GetLoadReport(&ctx, v1::GetLoadReportRequest(), &response);
    if (!s.ok()) return Fail("report", s);
    if (response.json().empty()) {
      return Fail("report",
                  FailedPreconditionError(f.connection.server + " sent no report (LoadReport.json is empty)"));
    }
    auto j = ParseJson(response.json(), f.connection.server + "'s report");
    if (!j.ok()) return Fail("report", j.status());
    report = std::move(*j);
  } else {
    auto j = ReportFromFile(f);
    if (!j.ok()) return Fail("report", j.status());
    report = std::move(*j);
  }
  auto rendered = Render(report, f.format);
  if (!rendered.ok()) return Fail("report", rendered.status());
  if (f.out.empty()) {
    std::fwrite(rendered->data(), 1, rendered->size(), stdout);
    return 0;
  }
  std::ofstream file(f.out, std::ios::binary);
  file << *rendered;
  file.close();
  if (!file) return Fail("report", DataLossError(f.out + ": write failed"));
  return 0;
}

int Rebalance(const Connection& c, bool dry_run, int redundant_slots) {
  auto channel = c.Channel();
  if (!channel.ok()) return Fail("rebalance", channel.status());
  auto stub = v1::Epic::NewStub(*channel);
  grpc::ClientContext ctx;
  if (const Status s = c.Prepare(&ctx); !s.ok()) return Fail("rebalance", s);
  v1::RebalanceRequest request;
  request.set_dry_run(dry_run);
  if (redundant_slots >= 0) request.set_redundant_slots_per_rank(redundant_slots);
  v1::RebalanceResponse r;
  const grpc::Status s = stub->Rebalance(&ctx, request, &r);
  if (!s.ok()) return Fail("rebalance", s);
  std::string what = r.applied() ? "applied" : "not applied";
  if (!r.applied() && !r.reason().empty()) what += " (" + r.reason() + ")";
  std::printf("%s: imbalance %.3f -> %.3f, %lld expert copies %s, %.1f MiB loaded, %.3f s, from %lld steps\n",
              what.c_str(), r.imbalance_before(), r.imbalance_after(), static_cast<long long>(r.experts_moved()),
              r.applied() ? "moved" : "to move", static_cast<double>(r.bytes_loaded()) / (1024.0 * 1024.0),
              r.seconds(), static_cast<long long>(r.window_steps()));
  return 0;
}

}  // namespace

std::function<int()> AddClientCommands(CLI::App& app) {
  // Owned by the returned closures' shared state.
  auto gen = std::make_shared<GenerateFlags>();
  CLI::App* generate = app.add_subcommand(
      "generate", "stream a generation from a server; prints the generated ids on one line (stdout), "
                  "streaming them on stderr as they arrive, or with --prompt streams the text on stdout. "
                  "On error: exits 1 printing the gRPC status code");
  gen->connection.AddFlags(generate);
  auto* tokens = generate->add_option("--tokens", gen->tokens, "prompt token ids, comma-separated, e.g. 5,17,300");
  auto* prompt = generate->add_option("--prompt", gen->prompt,
                                      "the prompt as text (the server tokenizes it); the text streams on stdout");
  tokens->excludes(prompt);
  generate->add_option("--max-tokens", gen->max_tokens, "tokens to generate at most")->capture_default_str();
  generate->add_option("--temperature", gen->temperature, "0 is greedy; > 0 samples")->capture_default_str();
  generate->add_option("--top-p", gen->top_p, "sample within this probability mass, in (0, 1]")->capture_default_str();
  generate->add_option("--top-k", gen->top_k, "sample among the k most likely tokens (0: all)")->capture_default_str();
  generate->add_option("--seed", gen->seed, "random seed for sampling")->capture_default_str();
  generate->add_option("--stop", gen->stop, "stop token ids, comma-separated");
  generate->add_option("--stop-text", gen->stop_text, "a stop string: the text ends where it begins (repeatable)");
  generate->add_flag("--ignore-eos", gen->ignore_eos, "keep generating past the model's eos tokens");
  generate->add_flag("--logprobs", gen->logprobs, "show each token's log-probability (stderr)");
  generate->add_flag("--quiet", gen->quiet, "print only the final line");
  generate->add_option("--request-id", gen->request_id, "an id for the server's logs");

  auto chat_flags = std::make_shared<GenerateFlags>();
  auto system = std::make_shared<std::string>();
  chat_flags->max_tokens = 512;
  CLI::App* chat = app.add_subcommand(
      "chat", "an interactive chat with the model in the terminal: type a turn, the answer streams back; the "
              "conversation goes on through the checkpoint's chat template. /reset starts over, Ctrl-D quits");
  chat_flags->connection.AddFlags(chat);
  chat->add_option("--system", *system, "a system prompt for the conversation");
  chat->add_option("--max-tokens", chat_flags->max_tokens, "tokens per answer at most")->capture_default_str();
  chat->add_option("--temperature", chat_flags->temperature, "0 is greedy; > 0 samples")->capture_default_str();
  chat->add_option("--top-p", chat_flags->top_p, "sample within this probability mass, in (0, 1]")->capture_default_str();
  chat->add_option("--top-k", chat_flags->top_k, "sample among the k most likely tokens (0: all)")->capture_default_str();
  chat->add_option("--seed", chat_flags->seed, "random seed for sampling")->capture_default_str();
  chat->add_option("--stop-text", chat_flags->stop_text, "a stop string (repeatable)");

  auto conn = std::make_shared<Connection>();
  auto health_service = std::make_shared<std::string>();
  CLI::App* health = app.add_subcommand("health", "ask grpc.health.v1 whether the server is serving "
                                                  "(exit 0: SERVING; prints the status)");
  conn->AddFlags(health);
  health->add_option("--service", *health_service, "service name to ask about ('' is the whole server)");

  auto info_conn = std::make_shared<Connection>();
  CLI::App* info = app.add_subcommand("info", "print the model, ranks, placement and cache use (JSON)");
  info_conn->AddFlags(info);

  auto load_conn = std::make_shared<Connection>();
  CLI::App* load = app.add_subcommand("load", "print the expert loads measured since the worker job attached (JSON)");
  load_conn->AddFlags(load);

  auto rep = std::make_shared<ReportFlags>();
  CLI::App* report = app.add_subcommand(
      "report", "the load-balance report (docs/load_balance.md): from a server's statistics window, or offline "
                "from a loads file or a saved report; as a text table, JSON or one HTML page");
  rep->command = report;
  rep->connection.AddFlags(report);
  // No default server here: a report comes from exactly one of --server and --input.
  CLI::Option* server = report->get_option("--server")->default_str("")->description(
      "the coordinator, HOST:PORT (or --input)");
  CLI::Option* input = report->add_option(
      "--input", rep->input,
      "offline instead of --server: a saved report (JSON with \"schema\") to render again, or a loads file "
      "({\"loads\": ...}, as epic-run --loads-out writes; needs --ranks) placed contiguously and planned");
  input->excludes(server);
  report->add_option("--ranks", rep->ranks, "ranks to spread a loads file's experts over")
      ->check(CLI::PositiveNumber)->needs(input);
  report->add_option("--redundant-slots", rep->redundant_slots,
                     "replica slots per rank for the planned placement of a loads file")
      ->check(CLI::NonNegativeNumber)->capture_default_str()->needs(input);
  report->add_option("--groups", rep->groups,
                     "routing groups (config.json n_group) of a loads file's experts; must divide them "
                     "(groups shape a plan across nodes only, and an offline report plans for one node)")
      ->check(CLI::PositiveNumber)->capture_default_str()->needs(input);
  report->add_option("--format", rep->format, "text (a terminal table), json (the report itself) or html "
                                              "(one self-contained page with charts)")
      ->check(CLI::IsMember({"text", "json", "html"}))->capture_default_str();
  report->add_option("--out", rep->out, "file to write (default: stdout)");

  auto rebalance_conn = std::make_shared<Connection>();
  auto dry_run = std::make_shared<bool>(false);
  auto redundant_slots = std::make_shared<int>(-1);
  CLI::App* rebalance = app.add_subcommand(
      "rebalance", "plan an expert placement from the server's statistics window and switch the workers to it; "
                   "prints whether it was applied, the imbalance before and after, and what moved");
  rebalance_conn->AddFlags(rebalance);
  rebalance->add_flag("--dry-run", *dry_run, "plan and report only; move nothing");
  rebalance->add_option("--redundant-slots", *redundant_slots,
                        "replica slots per rank in the new placement (-1: the coordinator's --redundant-slots)")
      ->check(CLI::Range(-1, 1 << 16))->capture_default_str();

  return [=]() -> int {
    if (generate->parsed()) {
      if (gen->tokens.empty() && generate->count("--prompt") == 0) {
        return Fail("generate", InvalidArgumentError("give the prompt as --tokens or --prompt"));
      }
      gen->text = generate->count("--prompt") > 0;
      return Generate(*gen);
    }
    if (chat->parsed()) return Chat(*chat_flags, *system);
    if (health->parsed()) return Health(*conn, *health_service);
    if (info->parsed()) return Info(*info_conn);
    if (load->parsed()) return Load(*load_conn);
    if (report->parsed()) return Report(*rep);
    if (rebalance->parsed()) return Rebalance(*rebalance_conn, *dry_run, *redundant_slots);
    return -1;
  };
}

}  // namespace epic::coordinator
