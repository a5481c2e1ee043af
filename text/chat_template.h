// Hugging Face chat templates: the smallest Jinja interpreter that renders the DeepSeek
// V2, V2.5, V3 and R1 templates byte for byte as transformers' apply_chat_template does.
//
// transformers compiles a template with jinja2's ImmutableSandboxedEnvironment
// (trim_blocks, lstrip_blocks, loopcontrols), a `raise_exception` global and a `tojson`
// filter (json.dumps with ensure_ascii=False). ChatTemplate follows those semantics:
// undefined names render empty and are falsy, `none` renders "None", booleans "True" and
// "False", dicts answer attribute access by key. What it cannot render (macros, includes,
// unknown filters, tests, functions or methods) is refused when the template is parsed,
// so a checkpoint whose template needs more fails at load, not at the first request.
#pragma once

#include <memory>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "common/status.h"

namespace epic::text {

namespace chat_template_internal {
struct Program;
}  // namespace chat_template_internal

// A chat template (the `chat_template` of tokenizer_config.json), parsed once and
// rendered for each request. Cheap to copy; safe to render from several threads.
class ChatTemplate {
 public:
  // Parses SOURCE. A construct it cannot render is an INVALID_ARGUMENT error naming it
  // and its line, e.g. "chat template line 3: unsupported filter 'wordcount'".
  static StatusOr<ChatTemplate> Parse(std::string_view source);

  // Renders with CONTEXT (a JSON object) as the template's variables, as transformers'
  // apply_chat_template does: {"messages": [{"role": ..., "content": ...}, ...],
  // "add_generation_prompt": bool, "bos_token": "...", "eos_token": "...", ...}.
  // raise_exception(msg) in the template becomes an INVALID_ARGUMENT error carrying msg;
  // every error names the template line.
  StatusOr<std::string> Render(const nlohmann::json& context) const;

 private:
  explicit ChatTemplate(std::shared_ptr<const chat_template_internal::Program> program)
      : program_(std::move(program)) {}

  std::shared_ptr<const chat_template_internal::Program> program_;
};

// epic's own DeepSeek-V3-style template, which epic-mkmodel bundles with random
// checkpoints: bos, the system prompts joined by blank lines, <｜User｜>/<｜Assistant｜>
// turns, <｜end▁of▁sentence｜> after each assistant turn with the reasoning before
// </think> dropped (R1 style), and <｜Assistant｜> appended for add_generation_prompt.
std::string_view DefaultDeepSeekChatTemplate();

}  // namespace epic::text
