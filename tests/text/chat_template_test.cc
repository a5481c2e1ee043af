// ChatTemplate against python3-jinja2 set up as transformers sets it up
// (tests/text/jinja_peer.py): every template under tests/text/templates/ and the
// default template, over many message lists, must render byte for byte alike.
#include "text/chat_template.h"

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "tests/testing/temp_dir.h"

namespace epic::text {
namespace {

using nlohmann::json;
namespace fs = std::filesystem;

const fs::path kTemplateDir = fs::path(EPIC_SOURCE_DIR) / "tests/text/templates";

std::string ReadFile(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

// jinja2's rendering of SOURCE for each context, from one python process.
// Each result is {"ok": true, "text": ...} or {"ok": false, "type": ..., "error": ...}.
json PeerRender(const std::string& source, const std::vector<json>& contexts) {
  testing::TempDir dir("jinja-peer");
  {
    std::ofstream job(dir / "job.json", std::ios::binary);
    job << json{{"template", source}, {"contexts", contexts}}.dump();
  }
  std::string command = std::string(EPIC_PYTHON) + " " + EPIC_SOURCE_DIR + "/tests/text/jinja_peer.py " +
                        (dir / "job.json").string() + " > " + (dir / "out.json").string();
  EXPECT_EQ(std::system(command.c_str()), 0) << command;
  return json::parse(ReadFile(dir / "out.json"));
}

json Message(const std::string& role, json content) { return {{"role", role}, {"content", std::move(content)}}; }

json ToolCall(const std::string& name, json arguments) {
  return {{"type", "function"}, {"function", {{"name", name}, {"arguments", std::move(arguments)}}}};
}

// Message lists in the shapes chat clients send, crossed with add_generation_prompt
// (absent, false, true) and special tokens (given or not).
std::vector<json> Contexts() {
  const json think_answer = Message("assistant", "<think>\nThe user greets me.\n</think>\n\nHello! How can I help?");
  const json tool_turn = {{"role", "assistant"}, {"content", nullptr},
                          {"tool_calls", {ToolCall("get_weather", R"({"city": "Paris"})"),
                                          ToolCall("get_time", R"({"tz": "CET"})")}}};
  const json tool_turn_with_text = {{"role", "assistant"}, {"content", "Let me check."},
                                    {"tool_calls", {ToolCall("lookup", R"({"q": "上海"})")}}};
  const json tool_turn_dict_args = {{"role", "assistant"}, {"content", ""},
                                    {"tool_calls", {ToolCall("search", {{"query", "jinja"}, {"k", 3}})}}};
  const std::vector<json> conversations = {
      {Message("user", "Hello")},
      {Message("system", "You are a helpful assistant."), Message("user", "Hi there.")},
      {Message("system", "Be brief."), Message("user", "What is 2+2?"), Message("assistant", "4"),
       Message("user", "And 3+3?")},
      {Message("system", "First rule."), Message("system", "Second rule."), Message("user", "Go.")},
      {Message("user", "Hi."), think_answer, Message("user", "Tell me a joke.")},
      {Message("system", "Only a system prompt.")},
      json::array(),
      {Message("user", ""), Message("assistant", ""), Message("user", "")},
      {Message("system", "你是一个乐于助人的助手。"), Message("user", "你好，世界！🌍👋🏽"),
       Message("assistant", "こんにちは 😀 — naïve café, مرحبا, Ελληνικά"), Message("user", "\u200bzero\u00a0width\u3000")},
      {Message("user", "  leading and trailing  \n\nsecond paragraph\n\tindented\r\nwindows line  "),
       Message("assistant", "\n\nstarts with newlines\n")},
      {Message("user", "Weather in Paris?"), tool_turn, Message("tool", R"({"temp": 21})"),
       Message("tool", "{\"time\": \"12:00\"}"), Message("assistant", "It is 21°C at noon."), Message("user", "Thanks")},
      {Message("user", "Look it up"), tool_turn_with_text, Message("tool", "found")},
      {Message("user", "Search"), tool_turn_dict_args, Message("tool", "[]")},
      {Message("user", "Template-like text: {{ not_a_var }} {% if x %} {# c #}"),
       Message("assistant", "Quotes \"double\" and 'single' and back\\slash \\n")},
      {Message("user", "a"), Message("assistant", "<think>one</think>two</think>three"), Message("user", "b"),
       Message("assistant", "no reasoning here"), Message("user", "c"), Message("assistant", "</think>"),
       Message("user", "d"), Message("assistant", "x")},
      {Message("user", "Call tools"), Message("tool", "orphan tool output")},
      {Message("user", "odd role next"), Message("developer", "unknown role")},
      {Message("user", "missing content next"), {{"role", "assistant"}}},
      {Message("user", "null content"), Message("assistant", nullptr)},
  };
  std::vector<json> contexts;
  for (const json& messages : conversations) {
    for (int prompt = 0; prompt < 3; ++prompt) {
      for (bool tokens : {true, false}) {
        json context = {{"messages", messages}};
        if (prompt > 0) context["add_generation_prompt"] = prompt == 2;
        if (tokens) {
          context["bos_token"] = "<｜begin▁of▁sentence｜>";
          context["eos_token"] = "<｜end▁of▁sentence｜>";
          context["tools"] = json::array({{{"type", "function"},
                                           {"function", {{"name", "get_weather"}, {"description", "Weather — météo"},
                                                         {"parameters", {{"type", "object"}, {"required", {"city"}}}}}}}});
          context["user_name"] = "  Ada  ";
        }
        contexts.push_back(std::move(context));
      }
    }
  }
  return contexts;
}

// Renders SOURCE over every context with epic and with jinja2 and compares.
void ExpectMatchesJinja(const std::string& name, const std::string& source, int min_rendered) {
  SCOPED_TRACE(name);
  auto parsed = ChatTemplate::Parse(source);
  ASSERT_TRUE(parsed.ok()) << parsed.status().ToString();
  const std::vector<json> contexts = Contexts();
  const json peer = PeerRender(source, contexts);
  ASSERT_EQ(peer.size(), contexts.size());
  int rendered = 0;
  for (size_t k = 0; k < contexts.size(); ++k) {
    SCOPED_TRACE("context " + contexts[k].dump());
    auto ours = parsed->Render(contexts[k]);
    if (peer[k]["ok"].get<bool>()) {
      ASSERT_TRUE(ours.ok()) << ours.status().ToString();
      EXPECT_EQ(*ours, peer[k]["text"].get<std::string>());
      ++rendered;
    } else {
      EXPECT_FALSE(ours.ok()) << "jinja2 failed with " << peer[k]["error"] << " but epic rendered:\n" << *ours;
      if (!ours.ok() && peer[k]["type"] == "TemplateError") {
        // raise_exception: the template's own message comes through.
        EXPECT_NE(ours.status().message().find(peer[k]["error"].get<std::string>()), std::string::npos)
            << ours.status().ToString();
      }
    }
  }
  // Most contexts must render: a template that fails everywhere would compare nothing.
  EXPECT_GE(rendered, min_rendered);
  std::cout << name << ": " << rendered << " of " << contexts.size()
            << " contexts rendered identically, the rest failed in both\n";
}

TEST(ChatTemplateTest, OwnTemplatesMatchJinja) {
  if (std::string(EPIC_PYTHON).empty()) GTEST_SKIP() << "no /usr/bin/python3 (with python3-jinja2) to compare with";
  const int total = static_cast<int>(Contexts().size());
  int templates = 0;
  for (const auto& entry : fs::directory_iterator(kTemplateDir)) {
    if (entry.path().extension() != ".jinja") continue;
    ExpectMatchesJinja(entry.path().filename().string(), ReadFile(entry.path()), total / 2);
    ++templates;
  }
  EXPECT_GE(templates, 5);
}

TEST(ChatTemplateTest, DefaultTemplateMatchesJinja) {
  if (std::string(EPIC_PYTHON).empty()) GTEST_SKIP() << "no /usr/bin/python3 (with python3-jinja2) to compare with";
  ExpectMatchesJinja("default", std::string(DefaultDeepSeekChatTemplate()), Contexts().size() / 2);
}

// Published templates (DeepSeek's own) cannot live in this repository; point
// EPIC_EXTRA_CHAT_TEMPLATES at a folder of *.jinja files to check them too.
TEST(ChatTemplateTest, ExtraTemplatesMatchJinja) {
  const char* dir = std::getenv("EPIC_EXTRA_CHAT_TEMPLATES");
  if (!dir) GTEST_SKIP() << "EPIC_EXTRA_CHAT_TEMPLATES is not set";
  if (std::string(EPIC_PYTHON).empty()) GTEST_SKIP() << "no /usr/bin/python3 (with python3-jinja2) to compare with";
  int templates = 0;
  for (const auto& entry : fs::directory_iterator(dir)) {
    if (entry.path().extension() != ".jinja") continue;
    ExpectMatchesJinja(entry.path().filename().string(), ReadFile(entry.path()), 1);
    ++templates;
  }
  EXPECT_GT(templates, 0);
}

std::string RenderOrDie(std::string_view source, const json& context) {
  auto parsed = ChatTemplate::Parse(source);
  EXPECT_TRUE(parsed.ok()) << parsed.status().ToString();
  if (!parsed.ok()) return "";
  auto rendered = parsed->Render(context);
  EXPECT_TRUE(rendered.ok()) << rendered.status().ToString();
  return rendered.ok() ? *rendered : "";
}

TEST(ChatTemplateTest, DefaultTemplatePinned) {
  const json context = {
      {"messages", {Message("system", "Be kind."), Message("system", "Be brief."), Message("user", "Hi"),
                    Message("assistant", "<think>greeting</think>Hello!"), Message("user", "Bye")}},
      {"bos_token", "<｜begin▁of▁sentence｜>"},
      {"add_generation_prompt", true}};
  EXPECT_EQ(RenderOrDie(DefaultDeepSeekChatTemplate(), context),
            "<｜begin▁of▁sentence｜>Be kind.\n\nBe brief.<｜User｜>Hi<｜Assistant｜>Hello!<｜end▁of▁sentence｜>"
            "<｜User｜>Bye<｜Assistant｜>");
  json no_prompt = context;
  no_prompt.erase("add_generation_prompt");
  no_prompt["messages"] = {Message("user", "只有用户")};
  EXPECT_EQ(RenderOrDie(DefaultDeepSeekChatTemplate(), no_prompt), "<｜begin▁of▁sentence｜><｜User｜>只有用户");
}

TEST(ChatTemplateTest, V2StylePinned) {
  const std::string source = ReadFile(kTemplateDir / "deepseek_v2_style.jinja");
  const json context = {{"messages", {Message("system", "Sys"), Message("user", "Q1"), Message("assistant", "A1"),
                                      Message("user", "Q2")}},
                        {"bos_token", "<s>"}, {"eos_token", "</s>"}, {"add_generation_prompt", true}};
  EXPECT_EQ(RenderOrDie(source, context), "<s>Sys\n\nUser: Q1\n\nAssistant: A1</s>User: Q2\n\nAssistant:");
}

TEST(ChatTemplateTest, WhitespaceControlPinned) {
  const json context = {{"items", {"a", "b"}}};
  // trim_blocks eats the newline after a block tag; lstrip_blocks the indentation before it.
  EXPECT_EQ(RenderOrDie("{% for x in items %}\n  {% if x %}\n[{{ x }}]\n  {% endif %}\n{% endfor %}\n", context),
            "[a]\n[b]\n");
  EXPECT_EQ(RenderOrDie("a  {%- if true -%}  b  {%- endif -%}  c", context), "abc");
  EXPECT_EQ(RenderOrDie("  {%+ if true %}x{% endif +%}\ny", context), "  x\ny");
  EXPECT_EQ(RenderOrDie("a {# note #}\n  {# indented #}\nb\n", context), "a b");
  EXPECT_EQ(RenderOrDie("{{ none }} {{ true }} {{ missing }}|{{ 1.0 }} {{ [1, 'x'] }}", context), "None True |1.0 [1, 'x']");
  EXPECT_EQ(RenderOrDie("{% generation %}kept{% endgeneration %}", context), "kept");
}

TEST(ChatTemplateTest, RaiseExceptionIsAnError) {
  auto parsed = ChatTemplate::Parse("line one\n{% if messages | length == 0 %}\n"
                                    "{{ raise_exception('Conversation must not be empty') }}\n{% endif %}");
  ASSERT_TRUE(parsed.ok()) << parsed.status().ToString();
  auto rendered = parsed->Render({{"messages", json::array()}});
  ASSERT_FALSE(rendered.ok());
  EXPECT_EQ(rendered.status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(rendered.status().message(), "chat template line 3: Conversation must not be empty");
  EXPECT_TRUE(parsed->Render({{"messages", {Message("user", "x")}}}).ok());
}

TEST(ChatTemplateTest, RenderErrorsNameTheLine) {
  auto parsed = ChatTemplate::Parse("ok\n{{ 'a' + messages }}");
  ASSERT_TRUE(parsed.ok());
  auto rendered = parsed->Render({{"messages", json::array()}});
  ASSERT_FALSE(rendered.ok());
  EXPECT_EQ(rendered.status().message().rfind("chat template line 2: ", 0), 0u) << rendered.status().message();
  auto undefined = ChatTemplate::Parse("{{ nothing.attr }}");
  ASSERT_TRUE(undefined.ok());
  auto result = undefined->Render(json::object());
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(result.status().message(), "chat template line 1: 'nothing' is undefined");
  EXPECT_FALSE(ChatTemplate::Parse("{{ x }}")->Render(json::array()).ok());
}

TEST(ChatTemplateTest, UnsupportedConstructsFailAtParse) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"a\nb\n{{ text | wordcount }}", "chat template line 3: unsupported filter 'wordcount'"},
      {"{% macro greet(name) %}hi{% endmacro %}", "chat template line 1: unsupported tag 'macro'"},
      {"\n{% include 'other.jinja' %}", "chat template line 2: unsupported tag 'include'"},
      {"{% if x %}\nopen", "chat template line 2: unexpected end of template, missing '{% endif %}'"},
      {"{% for m in messages %}", "chat template line 1: unexpected end of template, missing '{% endfor %}'"},
      {"x\n{{ unclosed", "chat template line 2: unexpected end of template, expected '}}'"},
      {"{# never closed", "chat template line 1: missing end of comment tag"},
      {"{{ 'unterminated }}", "chat template line 1: unterminated string literal"},
      {"{{ lipsum(3) }}", "chat template line 1: unsupported function 'lipsum'"},
      {"{{ 'a'.format(1) }}", "chat template line 1: unsupported method 'format'"},
      {"{{ x is divisibleby 3 }}", "chat template line 1: unsupported test 'divisibleby'"},
      {"{% endif %}", "chat template line 1: unexpected tag 'endif'"},
      {"{% for m in messages if m %}{% endfor %}", "chat template line 1: unsupported construct 'for ... if' (loop filter)"},
      // Found by fuzz/chat_template.cc (fuzz/corpus/chat_template/crash_empty_subscript.jinja):
      // an empty subscript was evaluated as a null expression.
      {"{{ 0[] }}", "chat template line 1: expected an index inside '[]'"},
  };
  for (const auto& [source, message] : cases) {
    auto parsed = ChatTemplate::Parse(source);
    ASSERT_FALSE(parsed.ok()) << source;
    EXPECT_EQ(parsed.status().code(), StatusCode::kInvalidArgument);
    EXPECT_EQ(parsed.status().message(), message) << source;
  }
}

TEST(ChatTemplateTest, CopiesShareTheParsedTemplate) {
  auto parsed = ChatTemplate::Parse("{{ greeting }}, {{ name | default('you') }}");
  ASSERT_TRUE(parsed.ok());
  ChatTemplate copy = *parsed;
  ChatTemplate moved = std::move(*parsed);
  EXPECT_EQ(*copy.Render({{"greeting", "Hi"}}), "Hi, you");
  EXPECT_EQ(*moved.Render({{"greeting", "Yo"}, {"name", "Bo"}}), "Yo, Bo");
}

// Damaged templates and odd contexts give errors or text, never a crash (ASan checks the
// memory side in the sanitizer build).
TEST(ChatTemplateTest, DamagedTemplatesAndOddContextsNeverCrash) {
  const std::string good(DefaultDeepSeekChatTemplate());
  const json contexts[] = {
      {{"messages", json::array({{{"role", "user"}, {"content", "hi"}}})}, {"add_generation_prompt", true},
       {"bos_token", "<s>"}},
      {{"messages", json::array({{{"role", "user"}, {"content", 5}}, {{"role", 3}}})}},
      {{"messages", "not a list"}},
      json::object(),
  };
  std::mt19937 rng(17);
  int parsed = 0;
  for (int i = 0; i < 3000; ++i) {
    std::string damaged = good;
    for (int k = 1 + rng() % 3; k > 0; --k) {
      const size_t at = rng() % damaged.size();
      switch (rng() % 3) {
        case 0: damaged[at] = "{}%#-+()[]'\" .|~=!x"[rng() % 20]; break;
        case 1: damaged.erase(at, 1 + rng() % 8); break;
        default: damaged.insert(at, std::string(1, "{}%#'\"|"[rng() % 8])); break;
      }
    }
    auto t = ChatTemplate::Parse(damaged);
    if (!t.ok()) {
      ASSERT_EQ(t.status().code(), StatusCode::kInvalidArgument);
      ASSERT_NE(t.status().message().find("line"), std::string::npos) << t.status().message();
      continue;
    }
    ++parsed;
    for (const json& context : contexts) (void)t->Render(context);
  }
  EXPECT_GT(parsed, 0);
}

// Found with fuzz/chat_template.cc (fuzz/corpus/chat_template/crash_int_*, timeout_*,
// oom_*): integer arithmetic past int64 (undefined behaviour; Python's ints would grow), a
// huge exponent looped over, and strings, lists and loops without end. Each is now an
// error naming its line, as jinja2's sandbox refuses a range() past 100000 items.
TEST(ChatTemplateTest, ArithmeticAndSizesPastTheLimitsAreErrors) {
  const std::vector<std::pair<std::string, std::string>> refused = {
      {"{{ 9223372036854775807 + 1 }}", "integer overflow in +"},
      {"{{ -9223372036854775807 - 2 }}", "integer overflow in -"},
      {"\n{{ 9999999999 * 9999999999 }}", "line 2: integer overflow in *"},
      {"{{ (-9223372036854775807 - 1) // -1 }}", "integer overflow in //"},
      {"{{ (-9223372036854775807 - 1) % -1 }}", "integer overflow in %"},
      {"{{ 3 ** 100000000000 }}", "integer overflow in **"},
      {"{{ 'ab' * 10000000000 }}", "a string too long"},
      {"{{ [1, 2] * 10000000000 }}", "a list too long"},
      {"{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
       "a string of more than 16777216 bytes"},
      {"{% for i in range(100001) %}{% endfor %}", "range too big"},
      {"{% for a in range(1000) %}{% for b in range(1000) %}{% endfor %}{% endfor %}",
       "more than 100000 loop iterations"},
  };
  for (const auto& [source, message] : refused) {
    SCOPED_TRACE(source);
    auto parsed = ChatTemplate::Parse(source);
    ASSERT_TRUE(parsed.ok()) << parsed.status().ToString();
    auto rendered = parsed->Render(json::object());
    ASSERT_FALSE(rendered.ok());
    EXPECT_EQ(rendered.status().code(), StatusCode::kInvalidArgument);
    EXPECT_NE(rendered.status().message().find(message), std::string::npos) << rendered.status().message();
  }
  // Within the limits, as Python computes it.
  const std::vector<std::pair<std::string, std::string>> rendered = {
      {"{{ 1 ** 100000000000 }} {{ (-1) ** 100000000001 }} {{ 0 ** 100000000000 }} {{ 0 ** 0 }}", "1 -1 0 1"},
      {"{{ 2 ** 62 }} {{ -9223372036854775807 - 1 }} {{ 7 // -2 }} {{ -7 % 3 }}",
       "4611686018427387904 -9223372036854775808 -4 2"},
      {"{{ '' * 10000000000 }}|{{ ([] * 10000000000) | length }}|{{ 'ab' * 3 }}", "|0|ababab"},
      {"{{ range(9223372036854775805, 9223372036854775807, 5) | list }}", "[9223372036854775805]"},
      {"{{ range(100000) | length }}", "100000"},
  };
  for (const auto& [source, text] : rendered) {
    SCOPED_TRACE(source);
    auto parsed = ChatTemplate::Parse(source);
    ASSERT_TRUE(parsed.ok()) << parsed.status().ToString();
    auto out = parsed->Render(json::object());
    ASSERT_TRUE(out.ok()) << out.status().ToString();
    EXPECT_EQ(*out, text);
  }
}

// Found with fuzz/chat_template.cc (fuzz/corpus/chat_template/crash_deep_*,
// crash_namespace_cycle): the parser, the evaluator, printing and the destructors recurse,
// so a template or a value nested a few thousand deep, or a namespace holding itself,
// overflowed the stack. Nesting past 128 is an error, and a namespace holds none.
TEST(ChatTemplateTest, NestingPastTheLimitIsAnError) {
  auto repeat = [](const std::string& s, int n) {
    std::string out;
    for (int k = 0; k < n; ++k) out += s;
    return out;
  };
  const std::vector<std::pair<std::string, std::string>> unparsable = {
      {"{{ " + repeat("(", 5000) + "1" + repeat(")", 5000) + " }}", "nested more than 128 deep"},
      {"{{ " + repeat("not ", 5000) + "true }}", "nested more than 128 deep"},
      {"{{ " + repeat("-", 5000) + "1 }}", "nested more than 128 deep"},
      {"{{ " + repeat("[", 5000) + repeat("]", 5000) + " }}", "nested more than 128 deep"},
      {"{{ 1" + repeat(" + 1", 5000) + " }}", "expression nested more than 128 deep"},
      {"{{ 1" + repeat("|string", 5000) + " }}", "expression nested more than 128 deep"},
      {repeat("{% if true %}", 5000) + "x" + repeat("{% endif %}", 5000), "nested more than 128 deep"},
  };
  for (const auto& [source, message] : unparsable) {
    SCOPED_TRACE(source.substr(0, 40));
    auto parsed = ChatTemplate::Parse(source);
    ASSERT_FALSE(parsed.ok());
    EXPECT_NE(parsed.status().message().find(message), std::string::npos) << parsed.status().message();
  }
  // Fifty of each is fine.
  for (const std::string& source : {"{{ " + repeat("(", 50) + "1" + repeat(")", 50) + " }}",
                                    "{{ 1" + repeat(" + 1", 50) + " }}",
                                    repeat("{% if true %}", 50) + "x" + repeat("{% endif %}", 50)}) {
    auto parsed = ChatTemplate::Parse(source);
    ASSERT_TRUE(parsed.ok()) << parsed.status().ToString();
    EXPECT_TRUE(parsed->Render(json::object()).ok());
  }

  const std::vector<std::pair<std::string, std::string>> unrenderable = {
      {"{% set ns = namespace(l=[]) %}\n{% for i in range(5000) %}{% set ns.l = [ns.l] %}{% endfor %}{{ ns.l }}",
       "line 2: a value nested more than 128 deep"},
      {"{% set ns = namespace(l=1) %}{% for i in range(5000) %}{% set ns.l = {'a': ns.l} %}{% endfor %}",
       "a value nested more than 128 deep"},
      {"{% set ns = namespace(a=1) %}{% set ns.me = ns %}{{ ns }}", "a namespace cannot hold a namespace"},
      {"{% set ns = namespace(a=1) %}{% set ns.l = [1, [ns]] %}", "a namespace cannot hold a namespace"},
  };
  for (const auto& [source, message] : unrenderable) {
    SCOPED_TRACE(source);
    auto parsed = ChatTemplate::Parse(source);
    ASSERT_TRUE(parsed.ok()) << parsed.status().ToString();
    auto rendered = parsed->Render(json::object());
    ASSERT_FALSE(rendered.ok());
    EXPECT_NE(rendered.status().message().find(message), std::string::npos) << rendered.status().message();
  }
  json deep = json::array();
  for (int k = 0; k < 5000; ++k) deep = json::array({deep});
  auto rendered = ChatTemplate::Parse("{{ messages }}")->Render({{"messages", deep}});
  ASSERT_FALSE(rendered.ok());
  EXPECT_NE(rendered.status().message().find("the context is nested more than 128 deep"), std::string::npos)
      << rendered.status().message();
}

}  // namespace
}  // namespace epic::text
