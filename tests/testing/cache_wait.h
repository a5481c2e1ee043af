// Waiting for a serving cluster to hand every cache block back, as the serving tests do
// after cancelled, stopped or finished requests.
#pragma once

#include <chrono>
#include <functional>
#include <thread>

#include "epic.pb.h"

namespace epic::testing {

// Until INFO (a GetModelInfo call) says every cache block is free and no request runs
// or waits; false when TIMEOUT passes first.
inline bool WaitAllBlocksFree(const std::function<v1::ModelInfo()>& info, std::chrono::milliseconds timeout) {
  const auto end = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    const v1::ModelInfo now = info();
    if (now.cache().free_blocks() == now.cache().total_blocks() && now.requests_running() == 0 &&
        now.requests_waiting() == 0) {
      return true;
    }
    if (std::chrono::steady_clock::now() > end) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
}

}  // namespace epic::testing
