// A chat template from the input, parsed as a checkpoint's tokenizer_config.json is at
// start-up and rendered as a request's messages are: a template it cannot render must be
// refused with an error, never crash, hang or grow without bound.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include <nlohmann/json.hpp>

#include "fuzz/fuzz_support.h"
#include "text/chat_template.h"

namespace {

// What TextCodec passes: a system prompt, a user turn, an assistant turn with R1-style
// reasoning, another user turn, a message with null content, and the tokens.
const nlohmann::json& Context(bool add_generation_prompt) {
  static const nlohmann::json* contexts = [] {
    const nlohmann::json messages = nlohmann::json::array({
        {{"role", "system"}, {"content", "You are helpful."}},
        {{"role", "user"}, {"content", "Hi 你好 {{ not a template }}"}},
        {{"role", "assistant"}, {"content", "<think>reasoning</think>Hello!"}},
        {{"role", "user"}, {"content", "Bye"}},
        {{"role", "tool"}, {"content", nullptr}},
    });
    auto* both = new nlohmann::json[2];
    for (int i = 0; i < 2; ++i) {
      both[i] = {{"messages", messages},
                 {"add_generation_prompt", i == 1},
                 {"bos_token", "<｜begin▁of▁sentence｜>"},
                 {"eos_token", "<｜end▁of▁sentence｜>"},
                 {"tools", nullptr}};
    }
    return both;
  }();
  return contexts[add_generation_prompt ? 1 : 0];
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto parsed = epic::text::ChatTemplate::Parse(std::string_view(reinterpret_cast<const char*>(data), size));
  if (!parsed.ok()) {
    EPIC_FUZZ_CHECK(!parsed.status().message().empty());
    return 0;
  }
  // One render (with the generation prompt for inputs of odd length): a template may
  // spend its whole budget of loop iterations.
  auto rendered = parsed->Render(Context(size % 2 == 1));
  if (!rendered.ok()) EPIC_FUZZ_CHECK(!rendered.status().message().empty());
  return 0;
}
