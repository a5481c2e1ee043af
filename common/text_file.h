// Small files the command lines name: certificates, secrets, tokens, reports.
#pragma once

#include <fstream>
#include <sstream>
#include <string>

#include "common/status.h"

namespace epic {

// The whole of PATH. NOT_FOUND "PATH: cannot read it" when it cannot be read.
inline StatusOr<std::string> ReadTextFile(const std::string& path) {
  std::ifstream f(path);
  std::stringstream text;
  text << f.rdbuf();
  if (!f) return NotFoundError(path + ": cannot read it");
  return text.str();
}

// A secret or token kept in a file: its text without trailing whitespace (an editor's
// final newline), read the same way by every process that shares the file.
inline StatusOr<std::string> ReadSecretFile(const std::string& path) {
  EPIC_ASSIGN_OR_RETURN(std::string text, ReadTextFile(path));
  while (!text.empty() && (text.back() == '\n' || text.back() == '\r' || text.back() == ' ' || text.back() == '\t')) {
    text.pop_back();
  }
  return text;
}

}  // namespace epic
