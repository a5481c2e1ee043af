// Tokenizer speed: encode MB/s on mixed English, Chinese and code, one thread, against
// the 5 MB/s target (Hugging Face's Rust tokenizers, the peer users know, is not
// packaged here to measure beside it); decode and streaming decode MB/s too.
//   tokenizer_bench [--tokenizer DIR] [--megabytes M] [--repeats R]
// Without --tokenizer it times the tokenizer epic-mkmodel bundles at V2-Lite's vocabulary
// (102400 ids, ~100k merges); give a real DeepSeek checkpoint's directory to time that.
#include <cstdio>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "bench/timing.h"
#include "text/detokenizer.h"
#include "text/tokenizer.h"
#include "text/tokenizer_writer.h"

namespace {

// Paragraphs in the mix chat traffic has: prose, Chinese, code, numbers, markup.
const char* const kSamples[] = {
    "The quick brown fox jumps over the lazy dog. Inference servers batch requests so that every weight read "
    "from memory serves many tokens at once; the latent cache keeps 576 values per token per layer.\n",
    "深度求索发布的混合专家模型在每个词元上只激活少数专家，因此推理成本远低于同等规模的稠密模型。我们今天讨论如何在多台机器上部署它。\n",
    "def route(scores, k):\n    top = sorted(range(len(scores)), key=lambda i: -scores[i])[:k]\n"
    "    return {i: scores[i] / sum(scores[j] for j in top) for i in top}\n",
    "for (int64_t i = 0; i < n; ++i) {\n  out[i] = std::max(0.0f, a[i] * b[i] + bias[i]);  // ReLU\n}\n",
    "Prices rose 3.75% in 2024, from $1,299.00 to $1,347.71 (see table 12, rows 7-19). Call +1-555-0100.\n",
    "<p>Hello, <b>world</b>! Émilie's café — naïve résumé… «quotes» 😀👍🏽</p>\n",
    "日本語のテキストも少し混ざります。カタカナとひらがな、そして漢字。\n",
};

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"tokenizer_bench: encode and decode MB/s, one thread, on mixed English/Chinese/code text"};
  std::string dir;
  double megabytes = 4;
  int repeats = 5;
  app.add_option("--tokenizer", dir, "a checkpoint directory (default: the bundled tokenizer at 102400 ids)");
  app.add_option("--megabytes", megabytes, "size of the text to encode")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--repeats", repeats, "timed runs (the median is reported)")->check(CLI::PositiveNumber)->capture_default_str();
  CLI11_PARSE(app, argc, argv);

  epic::StatusOr<epic::text::Tokenizer> tokenizer = epic::InvalidArgumentError("unset");
  if (dir.empty()) {
    auto files = epic::text::MakeByteLevelTokenizer(102400, 100000, 100001);
    if (!files.ok()) return std::fprintf(stderr, "%s\n", files.status().ToString().c_str()), 1;
    tokenizer = epic::text::Tokenizer::FromJson(files->tokenizer.dump(), files->config.dump());
  } else {
    tokenizer = epic::text::Tokenizer::Load(dir);
  }
  if (!tokenizer.ok()) return std::fprintf(stderr, "%s\n", tokenizer.status().ToString().c_str()), 1;

  std::string text;
  for (size_t i = 0; text.size() < megabytes * 1e6; ++i) text += kSamples[i % std::size(kSamples)];
  const double mb = text.size() / 1e6;

  std::vector<double> encode_s, decode_s, stream_s;
  std::vector<int32_t> ids;
  for (int r = 0; r < repeats; ++r) {
    auto t = epic::bench::Clock::now();
    auto encoded = tokenizer->Encode(text, false);
    encode_s.push_back(epic::bench::Since(t));
    if (!encoded.ok()) return std::fprintf(stderr, "%s\n", encoded.status().ToString().c_str()), 1;
    ids = std::move(encoded).value();
    t = epic::bench::Clock::now();
    const std::string back = tokenizer->Decode(ids);
    decode_s.push_back(epic::bench::Since(t));
    if (back != text) return std::fprintf(stderr, "decode(encode(text)) != text\n"), 1;
    t = epic::bench::Clock::now();
    epic::text::StreamDecoder stream(*tokenizer);
    size_t streamed = 0;
    for (const int32_t id : ids) streamed += stream.Add(id).size();
    streamed += stream.Finish().size();
    stream_s.push_back(epic::bench::Since(t));
    if (streamed != text.size()) return std::fprintf(stderr, "streamed text differs in size\n"), 1;
  }
  const double encode = mb / epic::bench::Median(encode_s);
  constexpr double kTarget = 5.0;
  std::printf("tokenizer_bench: %s, %.1f MB of mixed text, %zu tokens (%.2f bytes/token), median of %d\n",
              dir.empty() ? "bundled tokenizer, 102400 ids" : dir.c_str(), mb, ids.size(),
              static_cast<double>(text.size()) / ids.size(), repeats);
  std::printf("encode            %8.2f MB/s   %.2fx the 5 MB/s target\n", encode, encode / kTarget);
  std::printf("decode            %8.2f MB/s\n", mb / epic::bench::Median(decode_s));
  std::printf("streaming decode  %8.2f MB/s   (%.0f ns per token)\n", mb / epic::bench::Median(stream_s),
              epic::bench::Median(stream_s) / ids.size() * 1e9);
  return 0;
}
