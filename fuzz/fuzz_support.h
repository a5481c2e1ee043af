// What the fuzz targets share: a scratch directory for the readers that take a path, the
// small tokenizer (and its checkpoint-style directory) the text targets encode with, and
// the check that turns a broken invariant into a crash the fuzzer reports.
//
// Each target is one LLVMFuzzerTestOneInput over the project's real entry points; bad
// input must come back as a Status, so anything else (a sanitizer report, an abort, a
// failed EPIC_FUZZ_CHECK, a timeout or running out of memory) is a bug.
#pragma once

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>

#include "text/tokenizer.h"
#include "text/tokenizer_writer.h"

// Aborts, naming the invariant, when COND is false.
#define EPIC_FUZZ_CHECK(cond)                                                          \
  do {                                                                                 \
    if (!(cond)) {                                                                     \
      std::fprintf(stderr, "%s:%d: fuzz invariant failed: %s\n", __FILE__, __LINE__, #cond); \
      std::abort();                                                                    \
    }                                                                                  \
  } while (0)

namespace epic::fuzz {

// This process's scratch directory (under $TMPDIR, else /tmp), made on first use and
// removed at a normal exit.
inline const std::filesystem::path& ScratchDir() {
  static const std::filesystem::path* dir = [] {
    const char* tmp = std::getenv("TMPDIR");
    std::string pattern = std::string(tmp && *tmp ? tmp : "/tmp") + "/epic-fuzz-XXXXXX";
    if (::mkdtemp(pattern.data()) == nullptr) {
      std::perror("epic fuzz: mkdtemp");
      std::abort();
    }
    auto* path = new std::filesystem::path(pattern);
    std::atexit([] {
      std::error_code ec;
      std::filesystem::remove_all(ScratchDir(), ec);
    });
    return path;
  }();
  return *dir;
}

// Writes BYTES to PATH, replacing what was there.
inline void WriteFile(const std::filesystem::path& path, std::string_view bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  EPIC_FUZZ_CHECK(out.good());
}

// The tokenizer of the text targets: epic-mkmodel's byte-level BPE at a vocabulary of
// kSmallVocab, BOS id 0, EOS id 1, with its DeepSeek-style chat template.
inline constexpr int64_t kSmallVocab = 512;

inline const text::TokenizerFiles& SmallTokenizerFiles() {
  static const text::TokenizerFiles* files = [] {
    auto made = text::MakeByteLevelTokenizer(kSmallVocab, 0, 1);
    EPIC_FUZZ_CHECK(made.ok());
    return new text::TokenizerFiles(std::move(made).value());
  }();
  return *files;
}

inline const text::Tokenizer& SmallTokenizer() {
  static const text::Tokenizer* tokenizer = [] {
    auto t = text::Tokenizer::FromJson(SmallTokenizerFiles().tokenizer.dump(), SmallTokenizerFiles().config.dump());
    EPIC_FUZZ_CHECK(t.ok());
    return new text::Tokenizer(std::move(t).value());
  }();
  return *tokenizer;
}

// A directory holding the small tokenizer's tokenizer.json and tokenizer_config.json, as
// the coordinator's --tokenizer reads it.
inline const std::filesystem::path& SmallTokenizerDir() {
  static const std::filesystem::path* dir = [] {
    auto* path = new std::filesystem::path(ScratchDir() / "tokenizer");
    std::filesystem::create_directories(*path);
    EPIC_FUZZ_CHECK(text::WriteTokenizerFiles(SmallTokenizerFiles(), *path).ok());
    return path;
  }();
  return *dir;
}

}  // namespace epic::fuzz
