// A working tokenizer for random checkpoints: byte-level BPE in the layout DeepSeek
// publishes (tokenizer.json + tokenizer_config.json), sized to the model's vocabulary,
// with DeepSeek's special tokens and a DeepSeek-style chat template, so that a model
// made by epic-mkmodel takes text end to end.
#pragma once

#include <cstdint>
#include <filesystem>

#include <nlohmann/json.hpp>

#include "common/status.h"

namespace epic::text {

struct TokenizerFiles {
  nlohmann::json tokenizer;  // tokenizer.json
  nlohmann::json config;     // tokenizer_config.json
};

// Every id in [0, VOCAB_SIZE) is a token: the byte alphabet (the 243 bytes that occur in
// UTF-8 first), the special tokens (BOS and EOS at the given ids), and merges learnt from
// a small built-in corpus of English, Chinese and code, then filler merges of
// existing tokens. VOCAB_SIZE must hold the specials and the 243 bytes.
StatusOr<TokenizerFiles> MakeByteLevelTokenizer(int64_t vocab_size, int64_t bos_id, int64_t eos_id);

// Writes both files into DIR.
Status WriteTokenizerFiles(const TokenizerFiles& files, const std::filesystem::path& dir);

}  // namespace epic::text
