#include "client/text_commands.h"

#include <cstdio>
#include <iostream>
#include <iterator>
#include <memory>
#include <string>

#include <nlohmann/json.hpp>

#include "text/tokenizer.h"

namespace epic::coordinator {
namespace {

struct TextFlags {
  std::string dir;
  bool jsonl = false;
  bool no_special = false;
};

int Fail(const char* command, const std::string& message) {
  std::fprintf(stderr, "epic %s: %s\n", command, message.c_str());
  return 2;
}

std::string Join(const std::vector<int32_t>& ids) {
  std::string out;
  for (size_t i = 0; i < ids.size(); ++i) out += (i ? "," : "") + std::to_string(ids[i]);
  return out;
}

int Tokenize(const TextFlags& f) {
  auto tokenizer = text::Tokenizer::Load(f.dir);
  if (!tokenizer.ok()) return Fail("tokenize", tokenizer.status().ToString());
  auto encode = [&](const std::string& text) {
    return tokenizer->Encode(text, /*add_special_tokens=*/!f.no_special, /*parse_special=*/!f.no_special);
  };
  if (!f.jsonl) {
    const std::string text((std::istreambuf_iterator<char>(std::cin)), std::istreambuf_iterator<char>());
    auto ids = encode(text);
    if (!ids.ok()) return Fail("tokenize", ids.status().message());
    std::printf("%s\n", Join(*ids).c_str());
    return 0;
  }
  std::string line;
  for (int n = 1; std::getline(std::cin, line); ++n) {
    const nlohmann::json value = nlohmann::json::parse(line, nullptr, false);
    if (value.is_discarded() || !value.is_string()) {
      return Fail("tokenize", "line " + std::to_string(n) + ": want one JSON string per line");
    }
    auto ids = encode(value.get<std::string>());
    if (!ids.ok()) return Fail("tokenize", "line " + std::to_string(n) + ": " + ids.status().message());
    std::printf("%s\n", nlohmann::json(*ids).dump().c_str());
  }
  return 0;
}

int Detokenize(const TextFlags& f) {
  auto tokenizer = text::Tokenizer::Load(f.dir);
  if (!tokenizer.ok()) return Fail("detokenize", tokenizer.status().ToString());
  auto check = [&](int64_t id, const std::string& where) -> std::string {
    if (id < 0 || id >= tokenizer->size()) {
      return where + std::to_string(id) + " is not a token id of this tokenizer (0.." +
             std::to_string(tokenizer->size() - 1) + ")";
    }
    return "";
  };
  if (!f.jsonl) {
    // Ids separated by commas or whitespace, as `epic tokenize` prints them.
    std::vector<int32_t> ids;
    std::string item;
    auto flush = [&]() -> std::string {
      if (item.empty()) return "";
      size_t used = 0;
      long long id = -1;
      try {
        id = std::stoll(item, &used);
      } catch (const std::exception&) {
      }
      if (used != item.size()) return "'" + item + "' is not a token id";
      if (std::string e = check(id, ""); !e.empty()) return e;
      ids.push_back(static_cast<int32_t>(id));
      item.clear();
      return "";
    };
    for (int c; (c = std::cin.get()) != EOF;) {
      if (c == ',' || std::isspace(c)) {
        if (std::string e = flush(); !e.empty()) return Fail("detokenize", e);
      } else {
        item.push_back(static_cast<char>(c));
      }
    }
    if (std::string e = flush(); !e.empty()) return Fail("detokenize", e);
    const std::string text = tokenizer->Decode(ids, /*skip_special_tokens=*/f.no_special);
    std::fwrite(text.data(), 1, text.size(), stdout);
    std::fputc('\n', stdout);
    return 0;
  }
  std::string line;
  for (int n = 1; std::getline(std::cin, line); ++n) {
    const nlohmann::json value = nlohmann::json::parse(line, nullptr, false);
    if (value.is_discarded() || !value.is_array()) {
      return Fail("detokenize", "line " + std::to_string(n) + ": want one JSON list of ids per line");
    }
    std::vector<int32_t> ids;
    for (const nlohmann::json& id : value) {
      if (!id.is_number_integer()) return Fail("detokenize", "line " + std::to_string(n) + ": " + id.dump() + " is not a token id");
      if (std::string e = check(id.get<int64_t>(), "line " + std::to_string(n) + ": "); !e.empty()) {
        return Fail("detokenize", e);
      }
      ids.push_back(id.get<int32_t>());
    }
    std::printf("%s\n", nlohmann::json(tokenizer->Decode(ids, f.no_special)).dump().c_str());
  }
  return 0;
}

}  // namespace

std::function<int()> AddTextCommands(CLI::App& app) {
  auto tok = std::make_shared<TextFlags>();
  CLI::App* tokenize = app.add_subcommand(
      "tokenize", "read text on stdin and print its token ids (comma-separated) with a checkpoint's tokenizer");
  tokenize->add_option("--tokenizer", tok->dir,
                       "checkpoint directory, or a folder holding tokenizer.json (+ tokenizer_config.json)")
      ->required();
  tokenize->add_flag("--jsonl", tok->jsonl, "one JSON string per input line, one JSON list of ids per output line");
  tokenize->add_flag("--no-special", tok->no_special,
                     "no BOS, and special tokens written in the text are encoded as plain text");

  auto detok = std::make_shared<TextFlags>();
  CLI::App* detokenize = app.add_subcommand(
      "detokenize", "read token ids on stdin (separated by commas or whitespace) and print their text");
  detokenize->add_option("--tokenizer", detok->dir,
                         "checkpoint directory, or a folder holding tokenizer.json (+ tokenizer_config.json)")
      ->required();
  detokenize->add_flag("--jsonl", detok->jsonl, "one JSON list of ids per input line, one JSON string per output line");
  detokenize->add_flag("--no-special", detok->no_special, "leave special tokens (BOS, EOS, ...) out of the text");

  return [=]() -> int {
    if (tokenize->parsed()) return Tokenize(*tok);
    if (detokenize->parsed()) return Detokenize(*detok);
    return -1;
  };
}

}  // namespace epic::coordinator
