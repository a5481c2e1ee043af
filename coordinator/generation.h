// The text side of serving and one generation as its caller sees it. Workers never see
// text: the coordinator tokenizes prompts and chats with the checkpoint's tokenizer and
// chat template, and turns sampled ids back into text deltas, ending a generation at its
// stop strings. The gRPC and HTTP front ends both serve through Generation.
#pragma once

#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/status.h"
#include "coordinator/metrics.h"
#include "coordinator/scheduler.h"
#include "text/chat_template.h"
#include "text/detokenizer.h"
#include "text/tokenizer.h"

namespace epic::coordinator {

// The checkpoint's tokenizer and chat template, loaded once at start-up.
class TextCodec {
 public:
  // DIR: a checkpoint directory or one holding tokenizer.json (+ tokenizer_config.json).
  // A tokenizer or chat template this build cannot honour is an error naming what.
  static StatusOr<std::shared_ptr<const TextCodec>> Load(const std::string& dir);

  const text::Tokenizer& tokenizer() const { return tokenizer_; }
  bool has_chat_template() const { return chat_template_.has_value(); }

  // MESSAGES ([{"role": ..., "content": ...}]) through the chat template, with the
  // generation prompt appended when asked, then to ids. The template writes the BOS
  // token itself, so ADD_SPECIAL_TOKENS is false but where a caller asks otherwise (as
  // vLLM encodes a rendered chat). INVALID_ARGUMENT for what the template refuses.
  StatusOr<std::vector<int32_t>> EncodeChat(const nlohmann::json& messages, bool add_generation_prompt,
                                            bool add_special_tokens = false) const;
  // Fills REQUEST's prompt_token_ids from its prompt text or messages and clears those.
  // A request with ids is left as it is. Returns the seconds tokenizing took.
  StatusOr<double> Tokenize(v1::GenerateRequest* request) const;

 private:
  TextCodec(text::Tokenizer tokenizer, std::optional<text::ChatTemplate> chat_template)
      : tokenizer_(std::move(tokenizer)), chat_template_(std::move(chat_template)) {}
  StatusOr<std::string> RenderChat(const nlohmann::json& messages, bool add_generation_prompt) const;

  text::Tokenizer tokenizer_;
  std::optional<text::ChatTemplate> chat_template_;
};

// Checks that REQUEST gives its prompt exactly one way; INVALID_ARGUMENT naming the fields.
Status CheckPromptForm(const v1::GenerateRequest& request);

// One generation: submitted to the scheduler, its events turned into responses carrying
// ids, text deltas (when TEXT is set) and, last, the finish reason and usage. A stop
// string ends it early (the request is cancelled in the scheduler, its blocks freed).
// Destroying an unfinished generation cancels it.
class Generation {
 public:
  // TEXT may be null (ids only). Text prompts need it: FAILED_PRECONDITION without.
  // METRICS (optional) counts the tokenization time.
  static StatusOr<std::unique_ptr<Generation>> Start(Scheduler* scheduler, std::shared_ptr<const TextCodec> text,
                                                      v1::GenerateRequest request, Metrics* metrics = nullptr);
  ~Generation();

  // The next response, waiting up to TIMEOUT for one; nullopt when nothing came. After
  // the final one (finished() is true) there are no more; STATUS says how it ended.
  std::optional<v1::GenerateResponse> Next(std::chrono::milliseconds timeout);
  bool finished() const { return finished_; }
  const Status& status() const { return status_; }
  // The caller went away or gave up.
  void Cancel();

 private:
  Generation() = default;

  Scheduler* scheduler_ = nullptr;
  std::shared_ptr<const TextCodec> text_;
  v1::GenerateRequest request_;
  uint64_t id_ = 0;
  std::shared_ptr<RequestStream> stream_;
  std::optional<text::StreamDecoder> decoder_;
  std::optional<text::StopStrings> stops_;
  int64_t completion_tokens_ = 0;
  Clock::time_point start_;
  double first_token_seconds_ = 0.0;
  bool finished_ = false;
  Status status_;
};

}  // namespace epic::coordinator
