// The `epic` client's gRPC subcommands: generate, chat, health, info, load, report, rebalance.
#pragma once

#include <functional>

#include <CLI/CLI.hpp>

namespace epic::coordinator {

// Adds the subcommands to APP; returns the function that runs the one parsed, or
// nullptr if none of them was.
std::function<int()> AddClientCommands(CLI::App& app);

}  // namespace epic::coordinator
