#include "coordinator/generation.h"

namespace epic::coordinator {

StatusOr<std::shared_ptr<const TextCodec>> TextCodec::Load(const std::string& dir) {
  EPIC_ASSIGN_OR_RETURN(text::Tokenizer tokenizer, text::Tokenizer::Load(dir));
  std::optional<text::ChatTemplate> chat_template;
  if (!tokenizer.chat_template().empty()) {
    auto parsed = text::ChatTemplate::Parse(tokenizer.chat_template());
    if (!parsed.ok()) {
      return Status(parsed.status().code(), dir + "/tokenizer_config.json: " + parsed.status().message());
    }
    chat_template = std::move(parsed).value();
  }
  return std::shared_ptr<const TextCodec>(new TextCodec(std::move(tokenizer), std::move(chat_template)));
}

StatusOr<std::string> TextCodec::RenderChat(const nlohmann::json& messages, bool add_generation_prompt) const {
  if (!chat_template_) {
    return FailedPreconditionError("the checkpoint's tokenizer_config.json has no chat_template: send a prompt instead");
  }
  const nlohmann::json context = {{"messages", messages},
                                  {"add_generation_prompt", add_generation_prompt},
                                  {"bos_token", tokenizer_.bos_token()},
                                  {"eos_token", tokenizer_.eos_token()},
                                  {"tools", nullptr}};  // transformers passes tools=None when there are none
  auto rendered = chat_template_->Render(context);
  if (!rendered.ok()) return InvalidArgumentError("messages: " + rendered.status().message());
  return rendered;
}

StatusOr<std::vector<int32_t>> TextCodec::EncodeChat(const nlohmann::json& messages, bool add_generation_prompt,
                                                    bool add_special_tokens) const {
  EPIC_ASSIGN_OR_RETURN(const std::string rendered, RenderChat(messages, add_generation_prompt));
  auto ids = tokenizer_.Encode(rendered, add_special_tokens);
  if (!ids.ok()) return InvalidArgumentError("messages: " + ids.status().message());
  return ids;
}

Status CheckPromptForm(const v1::GenerateRequest& request) {
  const int forms = (request.prompt_token_ids_size() > 0) + request.has_prompt() + (request.messages_size() > 0);
  if (forms == 0) return InvalidArgumentError("give the prompt as prompt_token_ids, prompt or messages");
  if (forms > 1) return InvalidArgumentError("give only one of prompt_token_ids, prompt and messages");
  return OkStatus();
}

StatusOr<double> TextCodec::Tokenize(v1::GenerateRequest* request) const {
  const auto start = Clock::now();
  std::vector<int32_t> ids;
  if (request->has_prompt()) {
    auto encoded = tokenizer_.Encode(request->prompt(), /*add_special_tokens=*/true);
    if (!encoded.ok()) return InvalidArgumentError("prompt: " + encoded.status().message());
    ids = std::move(encoded).value();
  } else if (request->messages_size() > 0) {
    nlohmann::json messages = nlohmann::json::array();
    for (int i = 0; i < request->messages_size(); ++i) {
      const v1::ChatMessage& m = request->messages(i);
      if (m.role().empty()) return InvalidArgumentError("messages[" + std::to_string(i) + "].role is empty");
      messages.push_back({{"role", m.role()}, {"content", m.content()}});
    }
    EPIC_ASSIGN_OR_RETURN(ids, EncodeChat(messages, /*add_generation_prompt=*/true));
  } else {
    return 0.0;
  }
  if (ids.empty()) return InvalidArgumentError(std::string(request->has_prompt() ? "prompt" : "messages") +
                                               " gives no tokens");
  request->clear_prompt();
  request->clear_messages();
  request->mutable_prompt_token_ids()->Add(ids.begin(), ids.end());
  return std::chrono::duration<double>(Clock::now() - start).count();
}

StatusOr<std::unique_ptr<Generation>> Generation::Start(Scheduler* scheduler, std::shared_ptr<const TextCodec> text,
                                                         v1::GenerateRequest request, Metrics* metrics) {
  EPIC_RETURN_IF_ERROR(CheckPromptForm(request));
  const bool wants_text = request.has_prompt() || request.messages_size() > 0 || request.stop_size() > 0;
  if (wants_text && !text) {
    return FailedPreconditionError("this coordinator has no tokenizer, so it takes token ids only "
                                   "(start it with --tokenizer DIR)");
  }
  for (int i = 0; i < request.stop_size(); ++i) {
    if (request.stop(i).empty()) return InvalidArgumentError("stop[" + std::to_string(i) + "] is empty");
  }
  if (text && request.prompt_token_ids_size() == 0) {
    EPIC_ASSIGN_OR_RETURN(const double seconds, text->Tokenize(&request));
    if (metrics) metrics->Tokenized(seconds);
  }
  std::unique_ptr<Generation> g(new Generation());
  g->scheduler_ = scheduler;
  g->text_ = text;
  g->request_ = std::move(request);
  g->start_ = Clock::now();
  if (text) {
    g->decoder_.emplace(text->tokenizer(), /*skip_special_tokens=*/true);
    g->stops_.emplace(std::vector<std::string>(g->request_.stop().begin(), g->request_.stop().end()));
  }
  g->stream_ = std::make_shared<RequestStream>();
  EPIC_ASSIGN_OR_RETURN(g->id_, scheduler->Submit(g->request_, g->stream_));
  return g;
}

Generation::~Generation() {
  if (!finished_) Cancel();
}

void Generation::Cancel() {
  if (finished_) return;
  scheduler_->Cancel(id_);
  finished_ = true;
  status_ = CancelledError("the caller went away");
}

std::optional<v1::GenerateResponse> Generation::Next(std::chrono::milliseconds timeout) {
  if (finished_) return std::nullopt;
  std::vector<RequestEvent> events;
  stream_->Wait(&events, timeout);
  if (events.empty()) return std::nullopt;
  v1::GenerateResponse response;
  response.set_request_id(request_.request_id());
  std::string text;
  const RequestEvent* last = nullptr;
  for (const RequestEvent& e : events) {
    if (stops_ && stops_->stopped()) break;
    for (size_t i = 0; i < e.tokens.size() && !(stops_ && stops_->stopped()); ++i) {
      if (completion_tokens_ == 0) first_token_seconds_ = std::chrono::duration<double>(Clock::now() - start_).count();
      response.add_token_ids(e.tokens[i]);
      if (i < e.logprobs.size()) response.add_logprobs(e.logprobs[i]);
      ++completion_tokens_;
      if (decoder_) text += stops_->Add(decoder_->Add(e.tokens[i]));
    }
    if (e.final) last = &e;
  }
  const bool stopped = stops_ && stops_->stopped();
  if (decoder_ && last && !stopped) text += stops_->Add(decoder_->Finish()) + stops_->Finish();
  response.set_text(std::move(text));
  if (last == nullptr && !stopped) return response;

  finished_ = true;
  if (stopped) {
    // A stop string ended it before the scheduler did: free its blocks now.
    if (!last) scheduler_->Cancel(id_, "stop");
    response.set_finish_reason(v1::FINISH_REASON_STOP);
    response.set_stop(stops_->matched());
  } else if (last->error.ok()) {
    response.set_finish_reason(last->finish_reason);
  } else {
    status_ = last->error;
    return response;
  }
  v1::Usage* usage = response.mutable_usage();
  usage->set_prompt_tokens(static_cast<uint32_t>(request_.prompt_token_ids_size()));
  usage->set_completion_tokens(static_cast<uint32_t>(completion_tokens_));
  usage->set_time_to_first_token_seconds(last ? last->time_to_first_token : first_token_seconds_);
  if (last) usage->set_cached_tokens(static_cast<uint32_t>(last->cached_tokens));
  usage->set_total_seconds(std::chrono::duration<double>(Clock::now() - start_).count());
  return response;
}

}  // namespace epic::coordinator
