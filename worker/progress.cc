#include "worker/progress.h"

#include <unistd.h>

#include <cstdio>

namespace epic {

namespace {
// Work smaller than this finishes too fast for a progress line to help.
constexpr int64_t kQuietBytes = 256ll << 20;
}  // namespace

ProgressLine::ProgressLine(std::string what)
    : what_(std::move(what)), start_(std::chrono::steady_clock::now()), last_(start_),
      tty_(::isatty(STDERR_FILENO) != 0) {}

void ProgressLine::Update(int64_t done, int64_t total) {
  done_ = done;
  total_ = total;
  if (total < kQuietBytes) return;
  const auto now = std::chrono::steady_clock::now();
  const double since_last = std::chrono::duration<double>(now - last_).count();
  // A terminal gets a line redrawn 4 times a second; a log gets a line every 5 s.
  if (since_last < (tty_ ? 0.25 : 5.0) && done < total) return;
  last_ = now;
  printed_ = true;
  const double seconds = std::chrono::duration<double>(now - start_).count();
  const double gib = 1024.0 * 1024.0 * 1024.0;
  std::fprintf(stderr, "%s%s: %.2f / %.2f GiB (%.0f%%), %.1f s%s", tty_ ? "\r" : "", what_.c_str(),
               done / gib, total / gib, 100.0 * done / (total > 0 ? total : 1), seconds,
               tty_ ? "" : "\n");
  std::fflush(stderr);
}

void ProgressLine::Finish() {
  if (!printed_) return;
  if (done_ < total_ || !tty_) {
    last_ = {};
  }
  if (tty_) std::fprintf(stderr, "\n");
  printed_ = false;
}

}  // namespace epic
