#include "coordinator/http_server.h"

#include <httplib.h>
#include <netdb.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <random>
#include <thread>

#include <nlohmann/json.hpp>

#include "coordinator/rpc.h"

namespace epic::coordinator {
namespace {

using nlohmann::json;

// Whether HOST:PORT is free. cpp-httplib binds with SO_REUSEPORT, so a second server on
// a busy port would silently share it (and its callers) with the first: ask first,
// without that option.
bool PortIsFree(const std::string& host, int port) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE;
  addrinfo* found = nullptr;
  if (getaddrinfo(host.empty() ? nullptr : host.c_str(), std::to_string(port).c_str(), &hints, &found) != 0) {
    return true;  // let the real bind report it
  }
  bool free = true;
  for (addrinfo* a = found; a != nullptr && free; a = a->ai_next) {
    const int fd = socket(a->ai_family, a->ai_socktype, a->ai_protocol);
    if (fd < 0) continue;
    const int yes = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof yes);  // TIME_WAIT is no owner
    free = bind(fd, a->ai_addr, a->ai_addrlen) == 0;
    close(fd);
  }
  freeaddrinfo(found);
  return free;
}

// An error as OpenAI sends it, with the HTTP status it goes with.
struct HttpError {
  int status;
  std::string message;
  std::string type;
  std::string param;
};

HttpError BadField(const std::string& param, const std::string& message) {
  return {400, param + ": " + message, "invalid_request_error", param};
}

HttpError FromStatus(const Status& s) {
  switch (s.code()) {
    case StatusCode::kInvalidArgument: return {400, s.message(), "invalid_request_error", ""};
    case StatusCode::kFailedPrecondition: return {400, s.message(), "invalid_request_error", ""};
    case StatusCode::kUnauthenticated: return {401, s.message(), "authentication_error", ""};
    case StatusCode::kNotFound: return {404, s.message(), "not_found_error", ""};
    case StatusCode::kResourceExhausted: return {429, s.message(), "rate_limit_error", ""};
    case StatusCode::kUnavailable: return {503, s.message(), "service_unavailable", ""};
    case StatusCode::kDeadlineExceeded: return {504, s.message(), "timeout", ""};
    case StatusCode::kCancelled: return {499, s.message(), "cancelled", ""};
    default: return {500, s.message(), "internal_error", ""};
  }
}

json ErrorBody(const HttpError& e) {
  return {{"error",
           {{"message", e.message},
            {"type", e.type},
            {"param", e.param.empty() ? json(nullptr) : json(e.param)},
            {"code", e.status}}}};
}

void Reply(httplib::Response& res, int status, const json& body) {
  res.status = status;
  res.set_content(body.dump(-1, ' ', false, json::error_handler_t::replace), "application/json");
}

void ReplyError(httplib::Response& res, const HttpError& e) { Reply(res, e.status, ErrorBody(e)); }

std::string RandomId(const char* prefix) {
  static thread_local std::mt19937_64 rng(std::random_device{}());
  char hex[33];
  std::snprintf(hex, sizeof hex, "%016llx%016llx", static_cast<unsigned long long>(rng()),
                static_cast<unsigned long long>(rng()));
  return std::string(prefix) + hex;
}

int64_t UnixSeconds() {
  return std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

const char* FinishReasonName(v1::FinishReason r) {
  return r == v1::FINISH_REASON_LENGTH ? "length" : "stop";
}

// Fields of a request body, read with the checks every field needs: a wrong type or a
// value out of range is a 400 naming the field.
class Fields {
 public:
  explicit Fields(const json& body) : body_(body) {}
  const json* Get(const char* key) const {
    const auto it = body_.find(key);
    return it == body_.end() || it->is_null() ? nullptr : &*it;
  }
  std::optional<HttpError> Number(const char* key, double lo, double hi, double* out) const {
    if (const json* v = Get(key)) {
      if (!v->is_number()) return BadField(key, "must be a number");
      const double x = v->get<double>();
      if (!(x >= lo && x <= hi)) {
        return BadField(key, "must be in [" + json(lo).dump() + ", " + json(hi).dump() + "], not " + v->dump());
      }
      *out = x;
    }
    return std::nullopt;
  }
  std::optional<HttpError> Integer(const char* key, int64_t lo, int64_t hi, int64_t* out) const {
    if (const json* v = Get(key)) {
      if (!v->is_number_integer()) return BadField(key, "must be an integer");
      const int64_t x = v->get<int64_t>();
      if (x < lo || x > hi) {
        return BadField(key, "must be in [" + std::to_string(lo) + ", " + std::to_string(hi) + "], not " + v->dump());
      }
      *out = x;
    }
    return std::nullopt;
  }
  std::optional<HttpError> Bool(const char* key, bool* out) const {
    if (const json* v = Get(key)) {
      if (!v->is_boolean()) return BadField(key, "must be true or false");
      *out = v->get<bool>();
    }
    return std::nullopt;
  }

 private:
  const json& body_;
};

#define EPIC_HTTP_CHECK(expr)                  \
  do {                                         \
    if (auto epic_http_error_ = (expr)) return *epic_http_error_; \
  } while (0)

// What a completion or chat call asks for, beyond the prompt.
struct CallSpec {
  bool stream = false;
  bool include_usage = false;
  bool logprobs = false;
  bool chat = false;
};

}  // namespace

struct HttpServer::Impl {
  HttpOptions options;
  HttpBackend backend;
  httplib::Server server;
  std::thread thread;
  int port = 0;

  bool Authorized(const httplib::Request& req) const {
    return options.auth_token.empty() ||
           SecretsMatch(req.get_header_value("Authorization"), "Bearer " + options.auth_token);
  }

  // The body as a JSON object, or the error to send.
  std::optional<HttpError> ParseBody(const httplib::Request& req, json* body) const {
    // Parsing is iterative, but copying, printing and templating a value recurse over it:
    // a body nested 200000 deep crashed the server (fuzz/corpus/http_body/crash_deep_*).
    constexpr int kMaxDepth = 64;
    bool too_deep = false;
    auto keep = [&](int depth, json::parse_event_t, json&) {
      if (depth > kMaxDepth) too_deep = true;
      return !too_deep;  // once too deep, nothing more is kept
    };
    *body = json::parse(req.body, keep, false);
    if (too_deep) {
      return HttpError{400, "the body is nested more than " + std::to_string(kMaxDepth) + " deep", "invalid_request_error", ""};
    }
    if (body->is_discarded()) return HttpError{400, "the body is not valid JSON", "invalid_request_error", ""};
    if (!body->is_object()) return HttpError{400, "the body must be a JSON object", "invalid_request_error", ""};
    return std::nullopt;
  }

  std::optional<HttpError> CheckModel(const json& body) const {
    const auto it = body.find("model");
    if (it == body.end() || it->is_null()) return std::nullopt;
    if (!it->is_string()) return BadField("model", "must be a string");
    if (it->get<std::string>() != options.model_name) {
      return HttpError{404, "The model `" + it->get<std::string>() + "` does not exist (this server serves `" +
                                options.model_name + "`)",
                       "not_found_error", "model"};
    }
    return std::nullopt;
  }

  std::optional<HttpError> NeedText() const {
    if (backend.text) return std::nullopt;
    return HttpError{400, "this coordinator has no tokenizer, so it takes token ids only (start it with --tokenizer DIR)",
                     "invalid_request_error", ""};
  }

  // Message contents as the chat template reads them: a string, or the text parts of a list.
  std::optional<HttpError> ReadMessages(const json& body, json* messages) const {
    const auto it = body.find("messages");
    if (it == body.end() || !it->is_array() || it->empty()) {
      return BadField("messages", "must be a non-empty list of {\"role\", \"content\"}");
    }
    *messages = json::array();
    for (size_t i = 0; i < it->size(); ++i) {
      const json& m = (*it)[i];
      const std::string at = "messages[" + std::to_string(i) + "]";
      if (!m.is_object()) return BadField(at, "must be an object");
      const auto role = m.find("role");
      if (role == m.end() || !role->is_string() || role->get<std::string>().empty()) {
        return BadField(at + ".role", "must be a non-empty string");
      }
      json message = m;
      const auto content = m.find("content");
      if (content == m.end() || content->is_null()) {
        message["content"] = nullptr;
      } else if (content->is_array()) {
        std::string text;
        for (size_t k = 0; k < content->size(); ++k) {
          const json& part = (*content)[k];
          if (!part.is_object() || part.value("type", "") != "text" || !part.contains("text") ||
              !part["text"].is_string()) {
            return BadField(at + ".content[" + std::to_string(k) + "]", "only {\"type\": \"text\", \"text\": ...} parts are supported");
          }
          text += (k ? "\n" : "") + part["text"].get<std::string>();
        }
        message["content"] = text;
      } else if (!content->is_string()) {
        return BadField(at + ".content", "must be a string, a list of text parts, or null");
      }
      messages->push_back(std::move(message));
    }
    return std::nullopt;
  }

  // The sampling and stopping fields shared by completions and chats, into REQUEST.
  std::optional<HttpError> ReadSampling(const Fields& f, bool chat, v1::GenerateRequest* request,
                                        CallSpec* spec) const {
    double temperature = 1.0, top_p = 1.0;
    int64_t top_k = -1, seed = 0, n = 1;
    EPIC_HTTP_CHECK(f.Number("temperature", 0.0, 2.0, &temperature));
    EPIC_HTTP_CHECK(f.Number("top_p", 1e-9, 1.0, &top_p));
    EPIC_HTTP_CHECK(f.Integer("top_k", -1, 1 << 30, &top_k));
    EPIC_HTTP_CHECK(f.Integer("seed", INT64_MIN, INT64_MAX, &seed));
    EPIC_HTTP_CHECK(f.Integer("n", 1, 1, &n));
    for (const char* key : {"presence_penalty", "frequency_penalty"}) {
      double penalty = 0.0;
      EPIC_HTTP_CHECK(f.Number(key, -2.0, 2.0, &penalty));
      if (penalty != 0.0) return BadField(key, "is not supported (only 0)");
    }
    if (const json* v = f.Get("logit_bias"); v && !(v->is_object() && v->empty())) {
      return BadField("logit_bias", "is not supported");
    }
    if (f.Get("tools") || f.Get("tool_choice") || f.Get("functions")) {
      return BadField(f.Get("tools") ? "tools" : f.Get("tool_choice") ? "tool_choice" : "functions",
                      "tool calls are not supported");
    }
    if (const json* v = f.Get("response_format"); v && !(v->is_object() && v->value("type", "") == "text")) {
      return BadField("response_format", "only {\"type\": \"text\"} is supported (no JSON mode)");
    }
    request->mutable_sampling()->set_temperature(static_cast<float>(temperature));
    if (f.Get("top_p")) request->mutable_sampling()->set_top_p(static_cast<float>(top_p));
    request->mutable_sampling()->set_top_k(static_cast<int32_t>(std::max<int64_t>(top_k, 0)));
    request->mutable_sampling()->set_seed(static_cast<uint64_t>(seed));

    const char* max_key = chat && f.Get("max_completion_tokens") ? "max_completion_tokens" : "max_tokens";
    int64_t max_tokens = 0;
    EPIC_HTTP_CHECK(f.Integer(max_key, 1, UINT32_MAX, &max_tokens));
    request->set_max_tokens(static_cast<uint32_t>(max_tokens));  // 0: fill in once the prompt is known

    if (const json* stop = f.Get("stop")) {
      if (stop->is_string()) {
        request->add_stop(stop->get<std::string>());
      } else if (stop->is_array() && stop->size() <= 4) {
        for (const json& s : *stop) {
          if (!s.is_string()) return BadField("stop", "must be a string or a list of up to 4 strings");
          request->add_stop(s.get<std::string>());
        }
      } else {
        return BadField("stop", "must be a string or a list of up to 4 strings");
      }
      for (const std::string& s : request->stop()) {
        if (s.empty()) return BadField("stop", "must not hold an empty string");
      }
    }
    if (const json* ids = f.Get("stop_token_ids")) {
      if (!ids->is_array()) return BadField("stop_token_ids", "must be a list of token ids");
      for (const json& id : *ids) {
        if (!id.is_number_integer()) return BadField("stop_token_ids", "must be a list of token ids");
        request->add_stop_token_ids(id.get<int32_t>());
      }
    }
    bool ignore_eos = false;
    EPIC_HTTP_CHECK(f.Bool("ignore_eos", &ignore_eos));
    request->set_ignore_eos(ignore_eos);
    EPIC_HTTP_CHECK(f.Bool("stream", &spec->stream));
    if (const json* so = f.Get("stream_options")) {
      if (!so->is_object()) return BadField("stream_options", "must be an object");
      if (!spec->stream) return BadField("stream_options", "is only allowed with stream: true");
      EPIC_HTTP_CHECK(Fields(*so).Bool("include_usage", &spec->include_usage));
    }
    if (chat) {
      EPIC_HTTP_CHECK(f.Bool("logprobs", &spec->logprobs));
      int64_t top = 0;
      EPIC_HTTP_CHECK(f.Integer("top_logprobs", 0, 0, &top));
    } else if (f.Get("logprobs")) {
      int64_t k = 0;
      EPIC_HTTP_CHECK(f.Integer("logprobs", 0, 0, &k));
      spec->logprobs = true;
    }
    request->set_logprobs(spec->logprobs);
    return std::nullopt;
  }

  // The prompt of a completion: text, or token ids.
  std::optional<HttpError> ReadPrompt(const Fields& f, v1::GenerateRequest* request) const {
    const json* prompt = f.Get("prompt");
    if (!prompt) return BadField("prompt", "is required");
    if (prompt->is_array() && prompt->size() == 1 && (*prompt)[0].is_string()) prompt = &(*prompt)[0];
    if (prompt->is_string()) {
      if (auto e = NeedText()) return e;
      request->set_prompt(prompt->get<std::string>());
      return std::nullopt;
    }
    if (prompt->is_array() && !prompt->empty()) {
      for (const json& id : *prompt) {
        if (!id.is_number_integer()) {
          return BadField("prompt", "must be a string or a list of token ids (one prompt: n > 1 and batches are not supported)");
        }
        request->add_prompt_token_ids(id.get<int32_t>());
      }
      return std::nullopt;
    }
    return BadField("prompt", "must be a string or a non-empty list of token ids");
  }

  // Sets max_tokens when the caller left it out: 16 for a completion (as OpenAI), the
  // rest of the context for a chat.
  std::optional<HttpError> DefaultMaxTokens(v1::GenerateRequest* request, bool chat) const {
    if (request->max_tokens() > 0) return std::nullopt;
    if (!chat) {
      request->set_max_tokens(16);
      return std::nullopt;
    }
    const auto model = backend.model ? backend.model() : std::nullopt;
    if (!model) return HttpError{503, "no worker job is attached", "service_unavailable", ""};
    // What the context and the whole cache budget leave after the prompt.
    const SchedulerOptions& cache = backend.scheduler->options();
    const int64_t room = std::min<int64_t>(model->max_position_embeddings(), cache.num_blocks * cache.block_size);
    const int64_t left = room - request->prompt_token_ids_size();
    if (left < 1) {
      return BadField("messages", "the prompt (" + std::to_string(request->prompt_token_ids_size()) +
                                      " tokens) leaves no room to answer in " + std::to_string(room) +
                                      " tokens (the model's context or the cache budget)");
    }
    request->set_max_tokens(static_cast<uint32_t>(left));
    return std::nullopt;
  }

  // A chunk of a stream, or the body of a whole answer, in OpenAI's shape.
  json Choice(const CallSpec& spec, const std::string& text, const v1::GenerateResponse* tokens,
              const char* finish, bool first) const {
    json choice = {{"index", 0}, {"finish_reason", finish ? json(finish) : json(nullptr)}};
    json logprobs = nullptr;
    if (spec.logprobs && tokens && tokens->token_ids_size() > 0) {
      const text::Tokenizer* t = backend.text ? &backend.text->tokenizer() : nullptr;
      if (spec.chat) {
        json content = json::array();
        for (int i = 0; i < tokens->token_ids_size(); ++i) {
          const std::string bytes = t ? std::string(t->TokenBytes(tokens->token_ids(i))) : "";
          json b = json::array();
          for (const char c : bytes) b.push_back(static_cast<int>(static_cast<uint8_t>(c)));
          content.push_back({{"token", t ? t->IdToToken(tokens->token_ids(i)) : std::to_string(tokens->token_ids(i))},
                             {"logprob", i < tokens->logprobs_size() ? tokens->logprobs(i) : 0.0f},
                             {"bytes", b},
                             {"top_logprobs", json::array()}});
        }
        logprobs = {{"content", content}};
      } else {
        json names = json::array(), values = json::array();
        for (int i = 0; i < tokens->token_ids_size(); ++i) {
          names.push_back(t ? t->IdToToken(tokens->token_ids(i)) : std::to_string(tokens->token_ids(i)));
          values.push_back(i < tokens->logprobs_size() ? tokens->logprobs(i) : 0.0f);
        }
        logprobs = {{"tokens", names}, {"token_logprobs", values}, {"top_logprobs", nullptr}};
      }
    }
    choice["logprobs"] = logprobs;
    if (spec.chat) {
      json message = json::object();
      if (first) message["role"] = "assistant";
      if (!text.empty() || !spec.stream || first) message["content"] = text;
      choice[spec.stream ? "delta" : "message"] = message;
    } else {
      choice["text"] = text;
    }
    return choice;
  }

  static json Usage(const v1::Usage& u) {
    return {{"prompt_tokens", u.prompt_tokens()},
            {"completion_tokens", u.completion_tokens()},
            {"total_tokens", u.prompt_tokens() + u.completion_tokens()},
            {"prompt_tokens_details", {{"cached_tokens", u.cached_tokens()}}}};
  }

  void Generate(const httplib::Request& req, httplib::Response& res, bool chat) {
    json body;
    if (auto e = ParseBody(req, &body)) return ReplyError(res, *e);
    if (auto e = CheckModel(body)) return ReplyError(res, *e);
    const Fields f(body);
    v1::GenerateRequest request;
    CallSpec spec;
    spec.chat = chat;
    if (const json* echo = f.Get("echo"); echo && *echo != false) return ReplyError(res, BadField("echo", "only false is supported"));
    if (const json* best_of = f.Get("best_of"); best_of && *best_of != 1) {
      return ReplyError(res, BadField("best_of", "only 1 is supported"));
    }
    if (const json* suffix = f.Get("suffix"); suffix && *suffix != "") return ReplyError(res, BadField("suffix", "is not supported"));
    if (auto e = ReadSampling(f, chat, &request, &spec)) return ReplyError(res, *e);
    if (chat) {
      if (auto e = NeedText()) return ReplyError(res, *e);
      json messages;
      if (auto e = ReadMessages(body, &messages)) return ReplyError(res, *e);
      bool add_generation_prompt = true;
      if (auto e = f.Bool("add_generation_prompt", &add_generation_prompt)) return ReplyError(res, *e);
      const auto start = Clock::now();
      auto ids = backend.text->EncodeChat(messages, add_generation_prompt);
      if (!ids.ok()) return ReplyError(res, FromStatus(ids.status()));
      if (backend.metrics) backend.metrics->Tokenized(std::chrono::duration<double>(Clock::now() - start).count());
      request.mutable_prompt_token_ids()->Add(ids->begin(), ids->end());
    } else {
      if (auto e = ReadPrompt(f, &request)) return ReplyError(res, *e);
      if (request.has_prompt()) {
        auto seconds = backend.text->Tokenize(&request);
        if (!seconds.ok()) return ReplyError(res, FromStatus(seconds.status()));
        if (backend.metrics) backend.metrics->Tokenized(*seconds);
      }
    }
    if (auto e = DefaultMaxTokens(&request, chat)) return ReplyError(res, *e);
    auto started = Generation::Start(backend.scheduler, backend.text, request, backend.metrics);
    if (!started.ok()) return ReplyError(res, FromStatus(started.status()));
    std::shared_ptr<Generation> g(std::move(started).value());

    const std::string id = RandomId(chat ? "chatcmpl-" : "cmpl-");
    const int64_t created = UnixSeconds();
    const json head = {{"id", id},
                       {"object", chat ? (spec.stream ? "chat.completion.chunk" : "chat.completion") : "text_completion"},
                       {"created", created},
                       {"model", options.model_name}};
    if (!spec.stream) {
      std::string text;
      v1::GenerateResponse all;
      v1::GenerateResponse last;
      while (!g->finished()) {
        std::optional<v1::GenerateResponse> r = g->Next(std::chrono::milliseconds(100));
        if (!r) continue;
        text += r->text();
        all.mutable_token_ids()->MergeFrom(r->token_ids());
        all.mutable_logprobs()->MergeFrom(r->logprobs());
        if (g->finished()) last = *r;
      }
      if (!g->status().ok()) return ReplyError(res, FromStatus(g->status()));
      json answer = head;
      answer["choices"] = json::array({Choice(spec, text, &all, FinishReasonName(last.finish_reason()), true)});
      answer["usage"] = Usage(last.usage());
      return Reply(res, 200, answer);
    }

    // Server-sent events: one chunk per response, the finish reason, usage if asked, [DONE].
    auto first = std::make_shared<bool>(true);
    res.set_header("Cache-Control", "no-cache");
    res.set_chunked_content_provider(
        "text/event-stream",
        [this, g, spec, head, first](size_t, httplib::DataSink& sink) {
          auto send = [&](const json& data) {
            const std::string event =
                "data: " + data.dump(-1, ' ', false, json::error_handler_t::replace) + "\n\n";
            return sink.write(event.data(), event.size());
          };
          while (!g->finished()) {
            if (!sink.is_writable()) {
              g->Cancel();
              return false;
            }
            std::optional<v1::GenerateResponse> r = g->Next(std::chrono::milliseconds(100));
            if (!r) {
              if (spec.chat && *first) {
                // An empty first chunk with the role, as OpenAI opens a chat stream.
                json chunk = head;
                chunk["choices"] = json::array({Choice(spec, "", nullptr, nullptr, true)});
                *first = false;
                if (!send(chunk)) {
                  g->Cancel();
                  return false;
                }
              }
              continue;
            }
            if (g->finished() && !g->status().ok()) {
              send(ErrorBody(FromStatus(g->status())));
              break;
            }
            const char* finish = g->finished() ? FinishReasonName(r->finish_reason()) : nullptr;
            if (r->token_ids_size() > 0 || !r->text().empty() || finish) {
              json chunk = head;
              chunk["choices"] = json::array({Choice(spec, r->text(), r.operator->(), finish, *first)});
              if (spec.include_usage) chunk["usage"] = nullptr;
              *first = false;
              if (!send(chunk)) {
                g->Cancel();
                return false;
              }
            }
            if (g->finished() && spec.include_usage) {
              json chunk = head;
              chunk["choices"] = json::array();
              chunk["usage"] = Usage(r->usage());
              if (!send(chunk)) return false;
            }
          }
          const std::string done = "data: [DONE]\n\n";
          sink.write(done.data(), done.size());
          sink.done();
          return true;
        },
        [g](bool) {
          if (!g->finished()) g->Cancel();
        });
  }

  void Tokenize(const httplib::Request& req, httplib::Response& res) {
    json body;
    if (auto e = ParseBody(req, &body)) return ReplyError(res, *e);
    if (auto e = CheckModel(body)) return ReplyError(res, *e);
    if (auto e = NeedText()) return ReplyError(res, *e);
    const Fields f(body);
    bool add_special = true, add_generation_prompt = true;
    if (auto e = f.Bool("add_special_tokens", &add_special)) return ReplyError(res, *e);
    if (auto e = f.Bool("add_generation_prompt", &add_generation_prompt)) return ReplyError(res, *e);
    StatusOr<std::vector<int32_t>> ids = InvalidArgumentError("unset");
    if (f.Get("messages")) {
      json messages;
      if (auto e = ReadMessages(body, &messages)) return ReplyError(res, *e);
      // The template wrote the special tokens unless the caller asks for them again.
      ids = backend.text->EncodeChat(messages, add_generation_prompt, f.Get("add_special_tokens") && add_special);
      if (!ids.ok()) return ReplyError(res, FromStatus(ids.status()));
    } else if (const json* prompt = f.Get("prompt"); prompt && prompt->is_string()) {
      ids = backend.text->tokenizer().Encode(prompt->get<std::string>(), add_special);
      if (!ids.ok()) return ReplyError(res, BadField("prompt", ids.status().message()));
    } else {
      return ReplyError(res, BadField("prompt", "must be a string (or give messages)"));
    }
    json answer = {{"count", ids->size()}, {"tokens", *ids}};
    if (const auto model = backend.model ? backend.model() : std::nullopt) {
      answer["max_model_len"] = model->max_position_embeddings();
    }
    Reply(res, 200, answer);
  }

  void Detokenize(const httplib::Request& req, httplib::Response& res) {
    json body;
    if (auto e = ParseBody(req, &body)) return ReplyError(res, *e);
    if (auto e = CheckModel(body)) return ReplyError(res, *e);
    if (auto e = NeedText()) return ReplyError(res, *e);
    const json* tokens = Fields(body).Get("tokens");
    if (!tokens || !tokens->is_array()) return ReplyError(res, BadField("tokens", "must be a list of token ids"));
    std::vector<int32_t> ids;
    for (const json& id : *tokens) {
      if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() >= backend.text->tokenizer().size()) {
        return ReplyError(res, BadField("tokens", id.dump() + " is not a token id of this tokenizer"));
      }
      ids.push_back(id.get<int32_t>());
    }
    Reply(res, 200, {{"prompt", backend.text->tokenizer().Decode(ids)}});
  }

  void Models(httplib::Response& res) {
    json model = {{"id", options.model_name}, {"object", "model"}, {"created", UnixSeconds()}, {"owned_by", "epic"},
                  {"root", options.model_name}, {"parent", nullptr}};
    if (const auto m = backend.model ? backend.model() : std::nullopt) {
      model["max_model_len"] = m->max_position_embeddings();
    }
    Reply(res, 200, {{"object", "list"}, {"data", json::array({model})}});
  }
};

HttpServer::HttpServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

HttpServer::~HttpServer() { Stop(); }

void HttpServer::Stop() {
  if (!impl_ || !impl_->thread.joinable()) return;
  impl_->server.stop();
  impl_->thread.join();
}

int HttpServer::port() const { return impl_->port; }

StatusOr<std::unique_ptr<HttpServer>> HttpServer::Start(const HttpOptions& options, HttpBackend backend) {
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  impl->backend = std::move(backend);
  const size_t colon = options.listen.rfind(':');
  int port = -1;
  try {
    if (colon != std::string::npos) port = std::stoi(options.listen.substr(colon + 1));
  } catch (const std::exception&) {
  }
  if (colon == std::string::npos || port < 0 || port > 65535) {
    return InvalidArgumentError("--http-listen " + options.listen + ": want HOST:PORT");
  }
  std::string host = options.listen.substr(0, colon);
  if (host.size() > 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
  Impl* s = impl.get();
  const int threads = std::max(1, options.threads);
  s->server.new_task_queue = [threads] { return new httplib::ThreadPool(static_cast<size_t>(threads)); };

  // Every route but /health needs the bearer token when one is set.
  s->server.set_pre_routing_handler([s](const httplib::Request& req, httplib::Response& res) {
    if (req.path == "/health" || s->Authorized(req)) return httplib::Server::HandlerResponse::Unhandled;
    ReplyError(res, {401, "this server needs 'Authorization: Bearer <token>'", "authentication_error", ""});
    return httplib::Server::HandlerResponse::Handled;
  });
  s->server.Get("/health", [s](const httplib::Request&, httplib::Response& res) {
    const SchedulerStats stats = s->backend.scheduler->Stats();
    if (stats.attached && !stats.draining) {
      res.status = 200;
      return;
    }
    ReplyError(res, {503, stats.draining ? "the coordinator is draining" : "no worker job is attached",
                     "service_unavailable", ""});
  });
  s->server.Get("/v1/models", [s](const httplib::Request&, httplib::Response& res) { s->Models(res); });
  // A body field of an unexpected JSON type that slipped past the checks is still the
  // caller's mistake: 400, not 500.
  auto guarded = [](auto handler) {
    return [handler](const httplib::Request& req, httplib::Response& res) {
      try {
        handler(req, res);
      } catch (const json::exception& e) {
        ReplyError(res, {400, std::string("a field has the wrong type: ") + e.what(), "invalid_request_error", ""});
      }
    };
  };
  s->server.Post("/v1/completions",
                 guarded([s](const httplib::Request& req, httplib::Response& res) { s->Generate(req, res, false); }));
  s->server.Post("/v1/chat/completions",
                 guarded([s](const httplib::Request& req, httplib::Response& res) { s->Generate(req, res, true); }));
  s->server.Post("/tokenize",
                 guarded([s](const httplib::Request& req, httplib::Response& res) { s->Tokenize(req, res); }));
  s->server.Post("/detokenize",
                 guarded([s](const httplib::Request& req, httplib::Response& res) { s->Detokenize(req, res); }));
  s->server.set_error_handler([](const httplib::Request& req, httplib::Response& res) {
    if (!res.body.empty()) return;
    if (res.status == 404) {
      ReplyError(res, {404, "no route " + req.method + " " + req.path, "not_found_error", ""});
    } else {
      ReplyError(res, {res.status, "HTTP " + std::to_string(res.status), "invalid_request_error", ""});
    }
  });
  s->server.set_exception_handler([](const httplib::Request&, httplib::Response& res, std::exception_ptr ep) {
    std::string what = "unknown error";
    try {
      std::rethrow_exception(ep);
    } catch (const std::exception& e) {
      what = e.what();
    } catch (...) {
    }
    ReplyError(res, {500, "internal error: " + what, "internal_error", ""});
  });
  s->server.set_logger([s](const httplib::Request& req, const httplib::Response& res) {
    if (!s->backend.metrics) return;
    static const char* const kRoutes[] = {"/health", "/v1/models", "/v1/completions", "/v1/chat/completions",
                                          "/tokenize", "/detokenize"};
    std::string route = "other";
    for (const char* r : kRoutes) {
      if (req.path == r) route = r;
    }
    s->backend.metrics->HttpRequest(route, res.status);
  });

  if (port == 0) {
    s->port = s->server.bind_to_any_port(host);
  } else if (PortIsFree(host, port) && s->server.bind_to_port(host, port)) {
    s->port = port;
  }
  if (s->port <= 0) return UnavailableError("--http-listen " + options.listen + ": cannot listen there (address in use, or not an address)");
  s->thread = std::thread([s] { s->server.listen_after_bind(); });
  return std::unique_ptr<HttpServer>(new HttpServer(std::move(impl)));
}

}  // namespace epic::coordinator
