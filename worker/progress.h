// A progress line on stderr for long work (loading or writing weights): at most a
// few updates a second, and only when stderr is a terminal or the work is large.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

namespace epic {

class ProgressLine {
 public:
  explicit ProgressLine(std::string what);
  // DONE of TOTAL bytes.
  void Update(int64_t done, int64_t total);
  // Ends the line, printing the final figure if anything was printed.
  void Finish();

 private:
  std::string what_;
  std::chrono::steady_clock::time_point start_;
  std::chrono::steady_clock::time_point last_;
  bool tty_ = false;
  bool printed_ = false;
  int64_t done_ = 0;
  int64_t total_ = 0;
};

}  // namespace epic
