// The `epic` client's text subcommands, which need no server: tokenize and detokenize
// with a checkpoint's tokenizer, so that it can be used and tested on its own.
#pragma once

#include <functional>

#include <CLI/CLI.hpp>

namespace epic::coordinator {

// Adds the subcommands to APP; returns the function that runs the one parsed, or
// nullptr if none of them was.
std::function<int()> AddTextCommands(CLI::App& app);

}  // namespace epic::coordinator
